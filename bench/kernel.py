"""Kernel speed against torch.nn.functional.batch_norm (CPU) measured in the same run.

Usage: python -m bench.kernel
Prints, per shape and mode, the median time of our numpy kernel (the module's
full forward: statistics, normalization and the running-stats update), of
torch's CPU kernel with its default threads, and their ratio (ours / torch).
torch is optional (`pip install -e '.[bench]'`); without it only our times print.
"""

from __future__ import annotations

import numpy as np

from bench.common import median_seconds, table
from bnserver.config import Kind, ModuleConfig
from bnserver.modules import BatchNorm

SHAPES = [(32, 64, 56, 56), (8, 256, 28, 28), (64, 1024), (16, 128, 64)]


def _kind(shape: tuple[int, ...]) -> Kind:
    return Kind.BATCH_NORM_2D if len(shape) == 4 else Kind.BATCH_NORM_1D


def ours(shape: tuple[int, ...], training: bool) -> float:
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    module = BatchNorm(ModuleConfig(_kind(shape), shape[1]))
    module.set_training(training)
    return median_seconds(lambda: module.forward(x))


def theirs(shape: tuple[int, ...], training: bool) -> float | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    x = torch.randn(shape)
    c = shape[1]
    rm, rv, w, b = torch.zeros(c), torch.ones(c), torch.ones(c), torch.zeros(c)
    with torch.no_grad():
        return median_seconds(lambda: F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5))


def rows() -> list[list[str]]:
    out = []
    for shape in SHAPES:
        for training in (True, False):
            mine = ours(shape, training)
            peer = theirs(shape, training)
            out.append(
                [
                    f"kernel {'train' if training else 'eval'} {shape}",
                    f"{mine * 1e3:.2f} ms",
                    "-" if peer is None else f"torch {peer * 1e3:.2f} ms",
                    "-" if peer is None else f"{mine / peer:.2f}x",
                ]
            )
    return out


def main() -> None:
    print(table(rows(), ["measure", "ours", "peer", "ratio"]))


if __name__ == "__main__":
    main()
