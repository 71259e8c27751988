"""Kernel speed against torch.nn.functional.batch_norm (CPU) measured in the same run.

Usage: python -m bench.kernel
Prints, per shape and mode, the median time of our numpy kernel (the module's
full forward: statistics, normalization and the running-stats update), of
torch's CPU kernel with its default threads, and their ratio (ours / torch).
Then the training backward alone (BACKWARD_SHAPES): our module's backward
(grad_sums and grad_input) of a kept training forward, against the aten op that
torch's autograd calls for it, native_batch_norm_backward (dx, dweight and
dbias), given the statistics saved by torch's own training forward; neither side
times its forward or autograd's graph bookkeeping.
torch is optional (`pip install -e '.[bench]'`); without it only our times print.

Both sides get the same input array and the same realistic state (random
weight, bias and running statistics, as after some training), so no side can
take a shortcut on identity parameters. The two are timed in alternating
rounds, so that a slow spell of a shared machine hits both alike, each round
after untimed calls that let the other side's threads go quiet (SETTLE_SECONDS).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import numpy as np

from bench.common import table
from bnserver.core.config import Kind, ModuleConfig
from bnserver.state.batchnorm import BatchNorm

SHAPES = [(32, 64, 56, 56), (8, 256, 28, 28), (64, 1024), (16, 128, 64)]
BACKWARD_SHAPES = [(32, 64, 56, 56), (8, 256, 28, 28)]

#: Alternating rounds, and timed calls of each side per round.
ROUNDS, CALLS = 7, 5

#: Untimed calls before each side's timed calls in a round, for at least this long.
#: torch's OpenMP workers spin for some milliseconds after each parallel region and
#: meanwhile take a core from whatever runs next (measured: our 2-thread forward ran
#: 1.7x slower right after a torch call); the calls also bring each side's data back
#: into cache after the other side's run.
SETTLE_SECONDS = 0.03


def _kind(shape: tuple[int, ...]) -> Kind:
    return Kind.BATCH_NORM_2D if len(shape) == 4 else Kind.BATCH_NORM_1D


def _state(channels: int) -> dict[str, np.ndarray]:
    """Weight, bias and running statistics as a trained network might have them."""
    rng = np.random.default_rng(1)
    return {
        "weight": rng.uniform(0.5, 2.0, channels).astype(np.float32),
        "bias": rng.normal(0.0, 0.5, channels).astype(np.float32),
        "running_mean": rng.normal(0.0, 0.1, channels).astype(np.float32),
        "running_var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
    }


def _ours(x: np.ndarray, training: bool) -> Callable[[], object]:
    module = BatchNorm(ModuleConfig(_kind(x.shape), x.shape[1]))
    module.load_state_dict(_state(x.shape[1]))
    module.set_training(training)
    return lambda: module.forward(x)


def _theirs(x: np.ndarray, training: bool) -> Callable[[], object] | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    xt = torch.from_numpy(x)
    state = {k: torch.from_numpy(v) for k, v in _state(x.shape[1]).items()}
    w, b, rm, rv = state["weight"], state["bias"], state["running_mean"], state["running_var"]
    return lambda: F.batch_norm(xt, rm, rv, w, b, training, 0.1, 1e-5)


def _ours_backward(x: np.ndarray, dy: np.ndarray) -> Callable[[], object]:
    module = BatchNorm(ModuleConfig(_kind(x.shape), x.shape[1]))
    module.load_state_dict(_state(x.shape[1]))
    module.set_training(True)
    _, saved = module.forward(x, keep_for_backward=True)
    assert saved is not None
    return lambda: module.backward(saved, dy)


def _theirs_backward(x: np.ndarray, dy: np.ndarray) -> Callable[[], object] | None:
    try:
        import torch
    except ImportError:
        return None
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    state = {k: torch.from_numpy(v.copy()) for k, v in _state(x.shape[1]).items()}
    w, b, rm, rv = state["weight"], state["bias"], state["running_mean"], state["running_var"]
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(xt, w, b, rm, rv, True, 0.1, 1e-5)
    backward = torch.ops.aten.native_batch_norm_backward
    mask = [True, True, True]
    return lambda: backward(dyt, xt, w, rm, rv, save_mean, save_invstd, True, 1e-5, mask)


def _row(measure: str, mine: float, theirs: list[float]) -> list[str]:
    return [
        measure,
        f"{mine * 1e3:.2f} ms",
        f"torch {theirs[0] * 1e3:.2f} ms" if theirs else "-",
        f"{mine / theirs[0]:.2f}x" if theirs else "-",
    ]


def _medians(fns: list[Callable[[], object]]) -> list[float]:
    """Median seconds per call of each function, timed in alternating rounds."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(ROUNDS):
        for fn, samples in zip(fns, times, strict=True):
            settle = time.perf_counter() + SETTLE_SECONDS
            for calls in itertools.count():
                fn()
                if calls >= 2 and time.perf_counter() >= settle:
                    break
            for _ in range(CALLS):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def rows() -> list[list[str]]:
    out = []
    for shape in SHAPES:
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        for training in (True, False):
            peer = _theirs(x, training)
            mine, *theirs = _medians([_ours(x, training)] + ([] if peer is None else [peer]))
            out.append(_row(f"kernel {'train' if training else 'eval'} {shape}", mine, theirs))
    for shape in BACKWARD_SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        peer = _theirs_backward(x, dy)
        mine, *theirs = _medians([_ours_backward(x, dy)] + ([] if peer is None else [peer]))
        out.append(_row(f"kernel train backward {shape}", mine, theirs))
    return out


def main() -> None:
    print(table(rows(), ["measure", "ours", "peer", "ratio"]))


if __name__ == "__main__":
    main()
