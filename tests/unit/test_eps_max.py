"""eps_mode="max": the backward is the derivative of the forward it computes.

The forward normalizes with 1/sqrt(max(var, eps)); where var < eps that is a
constant and the variance term vanishes from dx. Checked against central finite
differences of the same forward in float64 (autodiff of max(var, eps)), on
channels below, above and far from eps.
"""

from __future__ import annotations

import numpy as np

from bnserver.core.config import Kind, ModuleConfig, SyncSpec
from bnserver.engine import Engine
from bnserver.state.registry import ModuleKey


def _engine(eps: float) -> tuple[Engine, ModuleKey]:
    engine = Engine()
    key = ModuleKey("bn")
    config = ModuleConfig(
        Kind.SYNC_BATCH_NORM, 3, eps=eps, sync=SyncSpec("g", 0, 1, eps_mode="max")
    )
    engine.create(key, config)
    return engine, key


def _vjp(engine: Engine, key: ModuleKey, x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    _, handle = engine.forward(key, x, keep_for_backward=True)
    return engine.backward(key, handle, dy).grad_input


def test_the_issue_example_matches_autodiff_of_max() -> None:
    """x=[0,.2,.4,.1], dy=[1,-2,.5,3], eps=0.1, one channel of a (4, 3) batch."""
    engine, key = _engine(0.1)
    x = np.zeros((4, 3))
    x[:, 0] = [0, 0.2, 0.4, 0.1]
    x[:, 1:] = [[0, 5], [3, -5], [-3, 1], [1, 0]]
    dy = np.zeros((4, 3))
    dy[:, 0] = [1, -2, 0.5, 3]
    dx = _vjp(engine, key, x, dy)
    np.testing.assert_allclose(dx[:, 0], [1.186, -8.301, -0.395, 7.510], atol=5e-4)


def test_gradient_equals_finite_differences_of_the_forward() -> None:
    eps = 0.05
    rng = np.random.default_rng(3)
    # channel 0: var far below eps; 1: var just above eps; 2: var far above eps
    x = np.stack(
        [
            rng.normal(0.3, 0.01, 6),
            rng.normal(-1.0, 1.0, 6) * 0.25,
            rng.normal(2.0, 3.0, 6),
        ],
        axis=1,
    )
    var = x.var(axis=0)
    assert var[0] < eps and var[2] > eps
    dy = rng.standard_normal(x.shape)
    engine, key = _engine(eps)
    engine.registry.get(key).set_training(True)

    def loss(z: np.ndarray) -> float:
        y, _ = engine.forward(key, z)  # trains, but normalization uses batch statistics
        return float((dy * y).sum())

    numeric = np.zeros_like(x)
    h = 1e-6
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (loss(up) - loss(down)) / (2 * h)
    dx = _vjp(engine, key, x, dy)
    np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-7)


def test_additive_mode_is_unchanged() -> None:
    """The gate applies to eps_mode "max" only: "additive" keeps the variance term."""
    engine = Engine()
    key = ModuleKey("bn")
    engine.create(key, ModuleConfig(Kind.SYNC_BATCH_NORM, 1, eps=0.1, sync=SyncSpec("g", 0, 1)))
    x = np.array([[0.0], [0.2], [0.4], [0.1]])
    dy = np.array([[1.0], [-2.0], [0.5], [3.0]])
    dx = _vjp(engine, key, x, dy)
    mean, var = x.mean(), x.var()
    xhat = (x - mean) / np.sqrt(var + 0.1)
    want = (dy - dy.mean() - xhat * (dy * xhat).mean()) / np.sqrt(var + 0.1)
    np.testing.assert_allclose(dx, want, rtol=1e-12)
