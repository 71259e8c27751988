"""SyncBatchNorm hard cases against a float64 whole-batch reference.

Every test runs its ranks in parallel threads through the SDK, rank r on server
r % 3 of the shared cluster, all ranks under the same module name. The
reference is plain BatchNorm computed in float64 on the concatenation of the
ranks' batches.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import pytest

from bnclient import (
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    SyncBatchNorm,
)
from tests.cluster.conftest import SYNC_TIMEOUT, Cluster, run_ranks

F64 = np.float64
MOMENTUM = 0.9
EPS = 1e-5
#: Bound on each rank's thread: a round fails within SYNC_TIMEOUT, plus slack.
RANK_TIMEOUT = 20.0
#: Bound on each SDK call.
CALL_TIMEOUT = 20.0


# -- reference ---------------------------------------------------------------


def _axes(x: np.ndarray) -> tuple[int, ...]:
    return (0, *range(2, x.ndim))


def _pc(v: np.ndarray, ndim: int) -> np.ndarray:
    """(C,) -> (1, C, 1, ...) for broadcasting against an ndim-D input."""
    return np.asarray(v, dtype=F64).reshape((1, -1) + (1,) * (ndim - 2))


class Reference:
    """Whole-batch BatchNorm in float64, with MegEngine's running-stat update."""

    def __init__(self, c: int, weight: np.ndarray | None = None, bias: np.ndarray | None = None):
        self.weight = np.ones(c) if weight is None else np.asarray(weight, F64)
        self.bias = np.zeros(c) if bias is None else np.asarray(bias, F64)
        self.running_mean = np.zeros(c)
        self.running_var = np.ones(c)

    def stats(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        x64 = x.astype(F64)
        mean = x64.mean(axis=_axes(x))
        dev = x64 - _pc(mean, x.ndim)
        return mean, (dev * dev).mean(axis=_axes(x)), x.size // x.shape[1]

    def xhat(self, x: np.ndarray, eps: float = EPS, eps_mode: str = "additive") -> np.ndarray:
        mean, var, _ = self.stats(x)
        denom = np.maximum(var, eps) if eps_mode == "max" else var + eps
        return (x.astype(F64) - _pc(mean, x.ndim)) / np.sqrt(_pc(denom, x.ndim))

    def train_step(self, x: np.ndarray, eps: float = EPS, eps_mode: str = "additive") -> np.ndarray:
        """Output for batch statistics; updates the running statistics."""
        mean, var, n = self.stats(x)
        y = self.xhat(x, eps, eps_mode) * _pc(self.weight, x.ndim) + _pc(self.bias, x.ndim)
        self.running_mean = MOMENTUM * self.running_mean + (1 - MOMENTUM) * mean
        self.running_var = MOMENTUM * self.running_var + (1 - MOMENTUM) * var * n / (n - 1)
        return y

    def eval_step(self, x: np.ndarray, eps: float = EPS) -> np.ndarray:
        """Output normalized with the running statistics."""
        scale = self.weight / np.sqrt(self.running_var + eps)
        return (x.astype(F64) - _pc(self.running_mean, x.ndim)) * _pc(scale, x.ndim) + _pc(
            self.bias, x.ndim
        )

    def grads(
        self, x: np.ndarray, dy: np.ndarray, eps: float = EPS
    ) -> tuple[np.ndarray, np.ndarray]:
        """dx of the whole batch, and its xhat (for the local dweight)."""
        _, var, n = self.stats(x)
        xhat = self.xhat(x, eps)
        dy64 = dy.astype(F64)
        mean_dy = dy64.sum(axis=_axes(x)) / n
        mean_dy_xhat = (dy64 * xhat).sum(axis=_axes(x)) / n
        gain = self.weight / np.sqrt(var + eps)
        dx = _pc(gain, x.ndim) * (dy64 - _pc(mean_dy, x.ndim) - xhat * _pc(mean_dy_xhat, x.ndim))
        return dx, xhat


def close(actual: Any, expected: Any, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.asarray(actual, F64), expected, rtol=tol, atol=tol)


def split(x: np.ndarray, sizes: Sequence[int], axis: int = 0) -> list[np.ndarray]:
    """Consecutive slices of `x` along `axis` with the given sizes (which may be 0)."""
    assert sum(sizes) == x.shape[axis]
    bounds = np.cumsum([0, *sizes])
    return [
        np.ascontiguousarray(np.take(x, range(lo, hi), axis=axis))
        for lo, hi in itertools.pairwise(bounds)
    ]


def vec(a: np.ndarray | None) -> np.ndarray:
    assert a is not None
    return np.asarray(a).reshape(-1)


# -- cluster helpers ------------------------------------------------------------


@pytest.fixture
def clients(cluster: Cluster) -> Iterator[list[Client]]:
    """One SDK client per server of the shared cluster."""
    cs = [Client(a, timeout=CALL_TIMEOUT) for a in cluster.addresses]
    yield cs
    for c in cs:
        c.close()


@pytest.fixture
def name(group: str) -> str:
    """The module name every rank of the test's group uses (unique across tests)."""
    return f"{group}.bn"


def make_ranks(
    clients: list[Client], name: str, group: str, world: int, c: int, **kw: Any
) -> list[SyncBatchNorm]:
    """Rank r of `group` on server r % len(clients), all named `name`."""
    return [
        clients[r % len(clients)].sync_batch_norm(
            name, c, group=group, rank=r, world_size=world, **kw
        )
        for r in range(world)
    ]


def parallel(fns: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run the ranks' calls at once; every one must succeed."""
    results = run_ranks(fns, timeout=RANK_TIMEOUT)
    failures = [(r, res) for r, res in enumerate(results) if isinstance(res, BaseException)]
    assert not failures, f"ranks failed: {failures}"
    return results


def forward_all(mods: Sequence[SyncBatchNorm], xs: Sequence[np.ndarray]) -> list[np.ndarray]:
    return parallel([lambda m=m, x=x: m(x) for m, x in zip(mods, xs, strict=True)])


def check_running(mods: Sequence[SyncBatchNorm], ref: Reference) -> None:
    for m in mods:
        state = m.state_dict()
        close(vec(state["running_mean"]), ref.running_mean)
        close(vec(state["running_var"]), ref.running_var)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- (a) different batch sizes per rank -----------------------------------------


def test_different_batch_sizes_per_rank(clients: list[Client], name: str, group: str) -> None:
    c, sizes = 4, [5, 2, 1]
    mods = make_ranks(clients, name, group, 3, c)
    ref = Reference(c)
    g = rng(0)
    for step in range(3):
        x = (g.standard_normal((sum(sizes), c, 3, 2)) * (step + 1) + step).astype(np.float32)
        ys = forward_all(mods, split(x, sizes))
        expected = ref.train_step(x)
        for y, e in zip(ys, split(expected, sizes), strict=True):
            assert y.dtype == np.float32 and y.shape == e.shape
            close(y, e)
        # running_var unbiased with the GLOBAL n (48), not each rank's.
        check_running(mods, ref)


# -- (b) a rank with an empty batch ---------------------------------------------------


def test_rank_with_empty_batch(clients: list[Client], name: str, group: str) -> None:
    c, sizes = 3, [4, 0, 3]
    mods = make_ranks(clients, name, group, 3, c)
    ref = Reference(c)
    g = rng(1)
    for _ in range(2):
        x = g.standard_normal((sum(sizes), c, 2, 5)).astype(np.float32)
        ys = forward_all(mods, split(x, sizes))
        expected = ref.train_step(x)
        assert ys[1].shape == (0, c, 2, 5) and ys[1].dtype == np.float32
        for y, e in zip(ys, split(expected, sizes), strict=True):
            assert y.shape == e.shape
            close(y, e)
        check_running(mods, ref)
    states = [m.state_dict() for m in mods]
    for s in states[1:]:
        for k in ("running_mean", "running_var"):
            np.testing.assert_array_equal(s[k], states[0][k])


def test_rank_with_empty_batch_backward(clients: list[Client], name: str, group: str) -> None:
    """The empty rank takes part in the backward round too; its dx is empty."""
    c, sizes = 3, [0, 6]
    mods = make_ranks(clients, name, group, 2, c)
    g = rng(2)
    x = g.standard_normal((sum(sizes), c, 4)).astype(np.float32)
    dy = g.standard_normal(x.shape).astype(np.float32)
    ref = Reference(c)
    outs = parallel(
        [lambda m=m, xi=xi: m.vjp(xi) for m, xi in zip(mods, split(x, sizes), strict=True)]
    )
    grads = parallel(
        [lambda o=o, d=d: o[1](d) for o, d in zip(outs, split(dy, sizes), strict=True)]
    )
    dx_ref, xhat = ref.grads(x, dy)
    dx0, dw0, db0 = grads[0]
    assert dx0.shape == (0, c, 4)
    close(vec(dw0), np.zeros(c))
    close(vec(db0), np.zeros(c))
    dx1, dw1, db1 = grads[1]
    close(dx1, dx_ref[0:6])
    close(vec(dw1), (dy.astype(F64) * xhat).sum(axis=(0, 2)))
    close(vec(db1), dy.astype(F64).sum(axis=(0, 2)))


# -- (c) a global count of 1 ---------------------------------------------------------


def test_global_count_of_one_is_invalid_everywhere(
    clients: list[Client], name: str, group: str
) -> None:
    c = 3
    mods = make_ranks(clients, name, group, 2, c)
    before = [m.state_dict() for m in mods]
    xs = [np.ones((1, c), np.float32), np.zeros((0, c), np.float32)]
    results = run_ranks(
        [lambda m=m, x=x: m(x) for m, x in zip(mods, xs, strict=True)], RANK_TIMEOUT
    )
    for r, res in enumerate(results):
        assert isinstance(res, InvalidArgumentError), f"rank {r}: {res!r}"
        assert res.code == grpc.StatusCode.INVALID_ARGUMENT
    for m, s in zip(mods, before, strict=True):
        after = m.state_dict()
        for k in s:
            np.testing.assert_array_equal(after[k], s[k])
        close(vec(after["running_mean"]), np.zeros(c))
        close(vec(after["running_var"]), np.ones(c))


def test_one_sample_per_rank_is_fine_globally(clients: list[Client], name: str, group: str) -> None:
    """Each rank alone would have n = 1; the group's n = 2 is valid."""
    c = 2
    mods = make_ranks(clients, name, group, 2, c)
    x = np.array([[1.0, -3.0], [3.0, 5.0]], np.float32)
    ref = Reference(c)
    ys = forward_all(mods, split(x, [1, 1]))
    expected = ref.train_step(x)
    close(np.concatenate(ys), expected)
    check_running(mods, ref)


# -- (d) large means ---------------------------------------------------------------------


def test_large_means_are_exact(clients: list[Client], name: str, group: str) -> None:
    c, sizes = 4, [6, 3, 7]
    std = np.array([1.0, 0.01, 10.0, 3.0])
    mean = 1e4 * std * np.array([1.0, -1.0, 1.0, 1.0])  # mean / std = 1e4
    mods = make_ranks(clients, name, group, 3, c)
    ref = Reference(c)
    g = rng(3)
    for _ in range(2):
        x64 = g.standard_normal((sum(sizes), c, 5, 5)) * _pc(std, 4) + _pc(mean, 4)
        x = x64.astype(np.float32)
        ys = forward_all(mods, split(x, sizes))
        expected = ref.train_step(x)
        for y, e in zip(ys, split(expected, sizes), strict=True):
            close(y, e)
        check_running(mods, ref)


# -- (e) world_size 1 ----------------------------------------------------------------------


def test_world_size_one_is_a_local_batch_norm_2d(
    clients: list[Client], name: str, group: str
) -> None:
    c = 5
    client = clients[0]
    sync = client.sync_batch_norm(name, c, group=group, rank=0, world_size=1)
    local = client.batch_norm_2d(f"{name}.local", c)
    g = rng(4)
    params = {
        "weight": g.standard_normal(c).astype(np.float32),
        "bias": g.standard_normal(c).astype(np.float32),
    }
    sync.load_state_dict(params, strict=False)
    local.load_state_dict(params, strict=False)
    for _ in range(3):
        x = (g.standard_normal((4, c, 3, 3)) * 2 + 1).astype(np.float32)
        dy = g.standard_normal(x.shape).astype(np.float32)
        y_s, vjp_s = sync.vjp(x)
        y_l, vjp_l = local.vjp(x)
        np.testing.assert_array_equal(y_s, y_l)
        for a, b in zip(vjp_s(dy), vjp_l(dy), strict=True):
            np.testing.assert_array_equal(a, b)
    s_sync, s_local = sync.state_dict(), local.state_dict()
    assert s_sync.keys() == s_local.keys()
    for k in s_sync:
        np.testing.assert_array_equal(s_sync[k], s_local[k])
    sync.eval()
    local.eval()
    x = g.standard_normal((2, c, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(sync(x), local(x))


# -- (f) 2-D and 3-D inputs -------------------------------------------------------------------


@pytest.mark.parametrize("tail", [(), (7,)], ids=["2d", "3d"])
def test_2d_and_3d_inputs(
    clients: list[Client], name: str, group: str, tail: tuple[int, ...]
) -> None:
    c, sizes = 6, [3, 5]
    mods = make_ranks(clients, name, group, 2, c)
    ref = Reference(c)
    g = rng(5)
    for _ in range(2):
        x = (g.standard_normal((sum(sizes), c, *tail)) * 3 - 2).astype(np.float32)
        ys = forward_all(mods, split(x, sizes))
        expected = ref.train_step(x)
        for y, e in zip(ys, split(expected, sizes), strict=True):
            assert y.shape == e.shape
            close(y, e)
        check_running(mods, ref)


# -- (g) gradients ---------------------------------------------------------------------------------


def test_gradients_equal_whole_batch_gradients(
    clients: list[Client], name: str, group: str
) -> None:
    c, sizes = 4, [3, 5]
    g = rng(6)
    weight = g.uniform(0.5, 2.0, c).astype(np.float32)
    bias = g.standard_normal(c).astype(np.float32)
    mods = make_ranks(clients, name, group, 2, c)
    for m in mods:
        m.load_state_dict({"weight": weight, "bias": bias}, strict=False)
    ref = Reference(c, weight, bias)
    for _ in range(2):
        x = (g.standard_normal((sum(sizes), c, 3, 4)) * 2 + 0.5).astype(np.float32)
        dy = g.standard_normal(x.shape).astype(np.float32)
        outs = parallel(
            [lambda m=m, xi=xi: m.vjp(xi) for m, xi in zip(mods, split(x, sizes), strict=True)]
        )
        dx_ref, xhat = ref.grads(x, dy)
        expected_y = ref.train_step(x)
        for (y, _), e in zip(outs, split(expected_y, sizes), strict=True):
            close(y, e)
        grads = parallel(
            [lambda o=o, d=d: o[1](d) for o, d in zip(outs, split(dy, sizes), strict=True)]
        )
        for (dx, dw, db), dx_e, dy_r, xhat_r in zip(
            grads, split(dx_ref, sizes), split(dy, sizes), split(xhat, sizes), strict=True
        ):
            close(dx, dx_e)
            # dweight and dbias are LOCAL: this rank's slice, with the GLOBAL xhat.
            close(vec(dw), (dy_r.astype(F64) * xhat_r).sum(axis=(0, 2, 3)))
            close(vec(db), dy_r.astype(F64).sum(axis=(0, 2, 3)))
            assert dw is not None and dw.shape == (1, c, 1, 1)
        check_running(mods, ref)


# -- (h) running statistics need no peer; track_running_stats=False does ---------------------


def _loaded_state(c: int, seed: int) -> dict[str, np.ndarray]:
    g = rng(seed)
    return {
        "weight": g.uniform(0.5, 2.0, c).astype(np.float32),
        "bias": g.standard_normal(c).astype(np.float32),
        "running_mean": g.standard_normal(c).astype(np.float32),
        "running_var": g.uniform(0.5, 3.0, c).astype(np.float32),
    }


def _ref_from_state(state: dict[str, np.ndarray]) -> Reference:
    ref = Reference(state["weight"].size, state["weight"], state["bias"])
    ref.running_mean = state["running_mean"].astype(F64)
    ref.running_var = state["running_var"].astype(F64)
    return ref


def _alone(fn: Callable[[], Any], bound: float = 1.5) -> Any:
    """Run one rank's call alone; it must finish well before the sync timeout."""
    start = time.monotonic()
    (result,) = run_ranks([fn], timeout=RANK_TIMEOUT)
    elapsed = time.monotonic() - start
    assert not isinstance(result, BaseException), f"lone rank failed: {result!r}"
    assert elapsed < bound, f"lone rank took {elapsed:.2f} s (waited for a peer?)"
    return result


def test_eval_with_running_stats_needs_no_peer(
    clients: list[Client], name: str, group: str
) -> None:
    c = 3
    rank0 = clients[0].sync_batch_norm(name, c, group=group, rank=0, world_size=2)
    state = _loaded_state(c, 7)
    rank0.load_state_dict(state)
    rank0.eval()
    ref = _ref_from_state(state)
    x = rng(8).standard_normal((4, c, 2, 2)).astype(np.float32)
    close(_alone(lambda: rank0(x)), ref.eval_step(x))
    dy = rng(9).standard_normal(x.shape).astype(np.float32)
    _, vjp = _alone(lambda: rank0.vjp(x))
    dx, dw, db = _alone(lambda: vjp(dy))
    inv_std = 1 / np.sqrt(state["running_var"].astype(F64) + EPS)
    close(dx, dy.astype(F64) * _pc(state["weight"].astype(F64) * inv_std, 4))
    xhat = (x.astype(F64) - _pc(state["running_mean"], 4)) * _pc(inv_std, 4)
    close(vec(dw), (dy.astype(F64) * xhat).sum(axis=(0, 2, 3)))
    close(vec(db), dy.astype(F64).sum(axis=(0, 2, 3)))
    after = rank0.state_dict()
    for k in state:
        np.testing.assert_array_equal(vec(after[k]), state[k])


def test_freeze_needs_no_peer(clients: list[Client], name: str, group: str) -> None:
    c = 3
    rank1 = clients[1].sync_batch_norm(name, c, group=group, rank=1, world_size=2, freeze=True)
    assert rank1.training
    state = _loaded_state(c, 10)
    rank1.load_state_dict(state)
    ref = _ref_from_state(state)
    x = rng(11).standard_normal((5, c, 3)).astype(np.float32)
    close(_alone(lambda: rank1(x)), ref.eval_step(x))
    dy = rng(12).standard_normal(x.shape).astype(np.float32)
    _, vjp = _alone(lambda: rank1.vjp(x))
    dx, dw, db = _alone(lambda: vjp(dy))
    gain = state["weight"].astype(F64) / np.sqrt(state["running_var"].astype(F64) + EPS)
    close(dx, dy.astype(F64) * _pc(gain, 3))
    assert dw is None and db is None
    after = rank1.state_dict()
    for k in state:
        np.testing.assert_array_equal(vec(after[k]), state[k])


def test_eval_without_running_stats_synchronizes(
    clients: list[Client], name: str, group: str
) -> None:
    c, sizes = 3, [2, 4]
    mods = make_ranks(clients, name, group, 2, c, track_running_stats=False)
    for m in mods:
        m.eval()
        assert set(m.state_dict()) == {"weight", "bias"}
    x = (rng(13).standard_normal((sum(sizes), c, 3, 3)) + 4).astype(np.float32)
    ys = forward_all(mods, split(x, sizes))
    expected = Reference(c).train_step(x)
    for y, e in zip(ys, split(expected, sizes), strict=True):
        close(y, e)
    # Alone, the rank waits for its peer: the round times out.
    start = time.monotonic()
    (res,) = run_ranks([lambda: mods[0](split(x, sizes)[0])], timeout=RANK_TIMEOUT)
    elapsed = time.monotonic() - start
    assert isinstance(res, DeadlineExceededError), repr(res)
    assert "[1]" in res.details
    assert SYNC_TIMEOUT - 0.5 < elapsed < SYNC_TIMEOUT + 5


# -- (i) eps_mode="max" --------------------------------------------------------------------------


def test_eps_mode_max(clients: list[Client], name: str, group: str) -> None:
    c, sizes = 3, [4, 4]
    std = np.array([1e-3, 1.0, 2.0])  # channel 0: var 1e-6 < eps
    mods = make_ranks(clients, name, group, 2, c, eps_mode="max")
    assert all(m.eps_mode == "max" for m in mods)
    ref_max, ref_add = Reference(c), Reference(c)
    g = rng(14)
    x = (g.standard_normal((sum(sizes), c, 4, 4)) * _pc(std, 4)).astype(np.float32)
    ys = forward_all(mods, split(x, sizes))
    y = np.concatenate(ys)
    close(y, ref_max.train_step(x, eps_mode="max"))
    additive = ref_add.train_step(x, eps_mode="additive")
    # Channel 0 tells the modes apart; the others agree.
    assert np.abs(y[:, 0] - additive[:, 0]).max() > 1e-3
    close(y[:, 1:], additive[:, 1:], tol=1e-4)
    # Running statistics do not depend on the eps mode.
    check_running(mods, ref_max)
