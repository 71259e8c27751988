"""16 threads x 50 training forwards on one module: exactly 800 sequential updates."""

from __future__ import annotations

import threading

import numpy as np

from bnclient import Client

THREADS, CALLS, C = 16, 50, 512
MOMENTUM = 0.99  # slow blending: a lost or doubled update still shows after 800 steps


def _sequential(x: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Running stats after `steps` identical updates, blended in float64 then rounded to
    float32 each step (as the server stores them)."""
    x64 = x.astype(np.float64)
    n = x.size // C
    mean = x64.mean(axis=0)
    var = x64.var(axis=0) * n / (n - 1)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    for _ in range(steps):
        rm = (MOMENTUM * rm.astype(np.float64) + (1 - MOMENTUM) * mean).astype(np.float32)
        rv = (MOMENTUM * rv.astype(np.float64) + (1 - MOMENTUM) * var).astype(np.float32)
    return rm, rv


def test_sixteen_threads_lose_no_update(server, name) -> None:
    x = (np.random.default_rng(0).standard_normal((4, C)) * 3 + 7).astype(np.float32)
    with Client(server.address) as client:
        bn = client.batch_norm_1d(name, C, momentum=MOMENTUM)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(CALLS):
                    bn(x)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        rm, rv = bn.running_mean.ravel(), bn.running_var.ravel()
    want_m, want_v = _sequential(x, THREADS * CALLS)
    np.testing.assert_array_equal(rm, want_m)
    np.testing.assert_array_equal(rv, want_v)
    # The check can tell one update from another.
    assert not np.array_equal(rm, _sequential(x, THREADS * CALLS - 1)[0])
