"""A plain float64 numpy reference of batch normalization (docs/design.md, Semantics).

Written for clarity, not speed: every formula is the textbook one, evaluated
in float64 on the input cast to float64, with no blocking, centering tricks or
dtype juggling. The unit tests compare the kernel and the module layer to it.

Shapes: ``x`` is ``(N, C, *spatial)``; per-channel vectors are ``(C,)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

F64 = np.float64


def reduce_axes(x: np.ndarray) -> tuple[int, ...]:
    """Every axis but the channel axis 1."""
    return (0, *range(2, x.ndim))


def per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a (C,) vector to (1, C, 1, ...) so it broadcasts against an ndim-D input."""
    return np.asarray(v, dtype=F64).reshape((1, -1) + (1,) * (ndim - 2))


def count(x: np.ndarray) -> int:
    """Elements per channel (N * prod(spatial))."""
    return int(x.size // x.shape[1])


def mean_var(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance, two-pass in float64."""
    x64 = x.astype(F64)
    axes = reduce_axes(x)
    mean = x64.mean(axis=axes)
    dev = x64 - per_channel(mean, x.ndim)
    return mean, (dev * dev).mean(axis=axes)


def forward(
    x: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """y = (x - mean) / sqrt(var + eps) * weight + bias, in float64."""
    nd = x.ndim
    y: np.ndarray = (x.astype(F64) - per_channel(mean, nd)) / np.sqrt(per_channel(var, nd) + eps)
    if weight is not None:
        y = y * per_channel(weight, nd)
    if bias is not None:
        y = y + per_channel(bias, nd)
    return y


def forward_batch(
    x: np.ndarray,
    eps: float,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """Forward with the batch's own statistics (training)."""
    mean, var = mean_var(x)
    return forward(x, mean, var, eps, weight, bias)


def backward_batch(
    x: np.ndarray, dy: np.ndarray, eps: float, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dweight, dbias) of a batch-statistics forward, docs/design.md, Semantics:

    xhat = (x - mean) / sqrt(var_b + eps); dbias = sum(dy); dweight = sum(dy * xhat);
    dx = weight / sqrt(var_b + eps) * (dy - mean(dy) - xhat * mean(dy * xhat)).
    """
    nd, axes = x.ndim, reduce_axes(x)
    mean, var = mean_var(x)
    inv_std = 1.0 / np.sqrt(var + eps)
    xhat = (x.astype(F64) - per_channel(mean, nd)) * per_channel(inv_std, nd)
    dy64 = dy.astype(F64)
    dbias = dy64.sum(axis=axes)
    dweight = (dy64 * xhat).sum(axis=axes)
    gain = inv_std if weight is None else inv_std * np.asarray(weight, F64)
    n = count(x)
    dx = per_channel(gain, nd) * (
        dy64 - per_channel(dbias / n, nd) - xhat * per_channel(dweight / n, nd)
    )
    return dx, dweight, dbias


def backward_running(
    x: np.ndarray,
    dy: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float,
    weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dweight, dbias) of a running-statistics forward: the statistics are constants."""
    nd, axes = x.ndim, reduce_axes(x)
    inv_std = 1.0 / np.sqrt(np.asarray(running_var, F64) + eps)
    xhat = (x.astype(F64) - per_channel(running_mean, nd)) * per_channel(inv_std, nd)
    dy64 = dy.astype(F64)
    gain = inv_std if weight is None else inv_std * np.asarray(weight, F64)
    return dy64 * per_channel(gain, nd), (dy64 * xhat).sum(axis=axes), dy64.sum(axis=axes)


@dataclass
class RefBatchNorm:
    """A float64 model of a BatchNorm module's forward and running-stat updates."""

    num_features: int
    eps: float = 1e-5
    momentum: float = 0.9
    track_running_stats: bool = True
    freeze: bool = False
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    running_mean: np.ndarray = field(init=False)
    running_var: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.running_mean = np.zeros(self.num_features)
        self.running_var = np.ones(self.num_features)

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        use_batch = (training and not self.freeze) or not self.track_running_stats
        if not use_batch:
            return forward(x, self.running_mean, self.running_var, self.eps, self.weight, self.bias)
        mean, var = mean_var(x)
        if training and self.track_running_stats:
            n = count(x)
            m = self.momentum
            self.running_mean = m * self.running_mean + (1 - m) * mean
            self.running_var = m * self.running_var + (1 - m) * var * n / (n - 1)
        return forward(x, mean, var, self.eps, self.weight, self.bias)
