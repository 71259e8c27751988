"""A 64 MiB tensor in one call, and many threads sharing one Client and one module."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from bnclient import Client

EPS = 1e-5


def run_threads(targets: list[Callable[[], None]], timeout: float = 60.0) -> None:
    """Start every target at once (behind a barrier); re-raise the first failure."""
    barrier = threading.Barrier(len(targets))
    failures: list[BaseException] = []

    def wrap(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                barrier.wait(timeout)
                target()
            except BaseException as exc:
                failures.append(exc)
                barrier.abort()

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if failures:
        raise failures[0]


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel float64 (mean, biased var, n) of an (N, C, H, W) array, two-pass."""
    axes = (0, 2, 3)
    n = x.size // x.shape[1]
    mean = x.mean(axis=axes, dtype=np.float64)
    var = np.empty(x.shape[1])
    for c in range(x.shape[1]):
        dev = x[:, c].astype(np.float64) - mean[c]
        var[c] = np.dot(dev.ravel(), dev.ravel()) / n
    return mean, var, n


def running_after(steps: int, mean, var, n, momentum: float = 0.9, rm=0.0, rv=1.0):
    """`steps` running-stat updates with the same batch, in float64."""
    rm = np.full_like(mean, rm)
    rv = np.full_like(mean, rv)
    for _ in range(steps):
        rm = momentum * rm + (1 - momentum) * mean
        rv = momentum * rv + (1 - momentum) * var * n / (n - 1)
    return rm, rv


def test_64_mib_tensor_in_one_call(client: Client, name: str) -> None:
    shape = (16, 64, 128, 128)  # 2**24 float32 values: 64 MiB
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    loc = np.linspace(-100.0, 100.0, 64, dtype=np.float32).reshape(1, 64, 1, 1)
    scale = np.linspace(0.1, 10.0, 64, dtype=np.float32).reshape(1, 64, 1, 1)
    x *= scale
    x += loc
    assert x.nbytes == 64 << 20

    bn = client.batch_norm_2d(name, 64)
    y = bn(x)
    assert y.shape == shape and y.dtype == np.float32

    mean, var, n = channel_stats(x)
    state = bn.state_dict()
    rm, rv = running_after(1, mean, var, n)
    np.testing.assert_allclose(state["running_mean"].reshape(-1), rm, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state["running_var"].reshape(-1), rv, rtol=1e-6)

    # the output is normalized per channel: mean 0, variance var / (var + eps)
    y_mean, y_var, _ = channel_stats(y)
    np.testing.assert_allclose(y_mean, 0.0, atol=1e-5)
    np.testing.assert_allclose(y_var, var / (var + EPS), rtol=1e-5)
    # and element by element, on a slice of every channel
    part = (slice(None), slice(None), slice(0, 8), slice(None))
    expected = (x[part].astype(np.float64) - mean.reshape(1, -1, 1, 1)) / np.sqrt(
        var.reshape(1, -1, 1, 1) + EPS
    )
    np.testing.assert_allclose(y[part], expected, rtol=1e-5, atol=1e-5)
    client.delete_module(name)


def test_threads_sharing_one_client_and_module(client: Client, server, name: str) -> None:
    """8 threads x 10 training forwards of one batch equal 80 sequential updates.

    Meanwhile 2 threads run eval forwards on a second module, whose state must not move.
    """
    rng = np.random.default_rng(1)
    # many channels: the running-stat update then spans long vectors, where numpy releases
    # the GIL, so an unsynchronized read-modify-write would lose updates
    c = 2048
    scale = np.linspace(1.0, 6.0, c).reshape(1, c, 1, 1)
    x = (rng.standard_normal((4, c, 3, 3)) * scale + 3).astype(np.float32)
    mean, var, n = channel_stats(x)
    expected_y = (x - mean.reshape(1, c, 1, 1)) / np.sqrt(var.reshape(1, c, 1, 1) + EPS)

    train_bn = client.batch_norm_2d(name, c)
    eval_bn = client.batch_norm_2d(name + ".eval", c)
    frozen = {
        "weight": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "bias": rng.uniform(-1.0, 1.0, c).astype(np.float32),
        "running_mean": rng.uniform(-1.0, 1.0, c).astype(np.float32),
        "running_var": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }
    eval_bn.load_state_dict(frozen)
    eval_bn.eval()
    eval_expected = (x.astype(np.float64) - frozen["running_mean"].reshape(1, c, 1, 1)) / np.sqrt(
        frozen["running_var"].reshape(1, c, 1, 1).astype(np.float64) + EPS
    ) * frozen["weight"].reshape(1, c, 1, 1) + frozen["bias"].reshape(1, c, 1, 1)
    eval_before = eval_bn.state_dict()

    outputs: list[np.ndarray] = []
    lock = threading.Lock()

    def trainer() -> None:
        for _ in range(10):
            y = train_bn(x)
            with lock:
                outputs.append(y)

    def evaluator() -> None:
        # a second Client too: proxies on other channels must see the same module
        with Client(server.address) as other:
            mine = other.batch_norm_2d(name + ".eval", c)
            for proxy in (eval_bn, mine) * 10:
                np.testing.assert_allclose(proxy(x), eval_expected, rtol=1e-5, atol=1e-5)

    run_threads([trainer] * 8 + [evaluator] * 2)

    assert len(outputs) == 80
    for y in outputs:
        np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
    rm, rv = running_after(80, mean, var, n)
    state = train_bn.state_dict()
    np.testing.assert_allclose(state["running_mean"].reshape(-1), rm, rtol=1e-6)
    np.testing.assert_allclose(state["running_var"].reshape(-1), rv, rtol=1e-6)
    # one update more or fewer would be visible at this tolerance
    for steps in (79, 81):
        _, other_rv = running_after(steps, mean, var, n)
        assert not np.allclose(state["running_var"].reshape(-1), other_rv, rtol=1e-6)
    assert train_bn.training
    assert not eval_bn.training
    for key, value in eval_before.items():
        assert np.array_equal(eval_bn.state_dict()[key], value), key
    client.delete_module(name)
    client.delete_module(name + ".eval")


def test_eval_calls_interleaved_with_training(client: Client, name: str) -> None:
    """Alternating train and eval on one module: eval uses the current running stats only."""
    rng = np.random.default_rng(2)
    c = 4
    bn = client.batch_norm_1d(name, c, momentum=0.7)
    rm, rv = np.zeros(c), np.ones(c)
    for step in range(6):
        x = (rng.standard_normal((32, c, 3)) * (step + 1) - step).astype(np.float32)
        bn.train()
        bn(x)
        mean, var, n = channel_stats(x[..., None])
        rm = 0.7 * rm + 0.3 * mean
        rv = 0.7 * rv + 0.3 * var * n / (n - 1)
        bn.eval()
        state = bn.state_dict()
        probe = rng.standard_normal((5, c, 3)).astype(np.float32)
        got = bn(probe)
        stored_rm = state["running_mean"].reshape(1, c, 1).astype(np.float64)
        stored_rv = state["running_var"].reshape(1, c, 1).astype(np.float64)
        np.testing.assert_allclose(
            got, (probe - stored_rm) / np.sqrt(stored_rv + EPS), rtol=1e-5, atol=1e-5
        )
        after = bn.state_dict()
        for key, value in state.items():
            assert np.array_equal(after[key], value), key
    np.testing.assert_allclose(bn.running_mean.reshape(-1), rm, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bn.running_var.reshape(-1), rv, rtol=1e-6)
    client.delete_module(name)


def test_threads_doing_vjp_on_one_module(client: Client, name: str) -> None:
    """Concurrent forward/backward pairs each get the gradients of their own input."""
    c = 3
    bn = client.batch_norm_2d(name, c)
    bn.eval()  # running stats stay (0, 1): every pair is independent of the others

    def worker(seed: int) -> Callable[[], None]:
        def run() -> None:
            rng = np.random.default_rng(seed)
            for _ in range(5):
                x = rng.standard_normal((2, c, 4, 4)).astype(np.float32) * (seed + 1)
                dy = rng.standard_normal(x.shape).astype(np.float32)
                y, vjp = bn.vjp(x)
                np.testing.assert_allclose(y, x / np.sqrt(1 + EPS), rtol=1e-6)
                dx, dweight, dbias = vjp(dy)
                np.testing.assert_allclose(dx, dy / np.sqrt(1 + EPS), rtol=1e-6)
                xhat = x.astype(np.float64) / np.sqrt(1 + EPS)
                np.testing.assert_allclose(
                    dweight.reshape(-1), (dy * xhat).sum(axis=(0, 2, 3)), rtol=1e-4, atol=1e-4
                )
                np.testing.assert_allclose(
                    dbias.reshape(-1), dy.sum(axis=(0, 2, 3), dtype=np.float64), rtol=1e-5
                )

        return run

    run_threads([worker(s) for s in range(8)])
    client.delete_module(name)
