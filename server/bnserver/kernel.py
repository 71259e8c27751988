"""Batch-normalization kernel: pure functions on numpy arrays.

No state, no locks, no gRPC. Conventions used throughout:

* ``x`` has shape ``(N, C, *spatial)``; statistics are per channel (axis 1),
  reduced over every other axis. ``count`` is ``N * prod(spatial)``, the number
  of elements that each channel's statistics summarize.
* Per-channel vectors (``mean``, ``var``, ``inv_std``, ``weight``, ...) are
  float64 arrays of shape ``(C,)``.
* Arithmetic on elements runs in the *work dtype* (float32 for float16 and
  float32 input, float64 for float64 input); every reduction accumulates in
  float64. Outputs have the input's dtype.

Statistics are two-pass (mean first, then squared deviations from it), so they
stay exact when the mean is large next to the spread, where the one-pass
sum/sum-of-squares formula cancels catastrophically.

Elementwise work is done in cache-sized blocks of a 2-D ``(N*C, L)`` view, so
a chain of ufuncs reads each element from memory once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

Vector = np.ndarray  # float64, shape (C,)
EpsMode = Literal["additive", "max"]

#: Elements per block of elementwise work (256 KiB of float32: fits in L2).
BLOCK_ELEMENTS = 1 << 16

_WORK_DTYPES: dict[np.dtype, np.dtype] = {
    np.dtype(np.float16): np.dtype(np.float32),
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float64),
}


def work_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype elementwise arithmetic runs in for inputs of `dtype`."""
    try:
        return _WORK_DTYPES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(
            f"unsupported dtype {dtype}; expected float16, float32 or float64"
        ) from None


@dataclass(frozen=True)
class Moments:
    """Per-channel statistics of a batch.

    count: elements per channel (the same for every channel).
    mean:  float64 (C,), the per-channel mean (zeros when count is 0).
    m2:    float64 (C,), the sum of squared deviations from the mean.
    """

    count: int
    mean: Vector
    m2: Vector

    @property
    def var(self) -> Vector:
        """Biased variance m2 / count, the one used to normalize."""
        return self.m2 / self.count

    @property
    def unbiased_var(self) -> Vector:
        """Unbiased variance m2 / (count - 1), the one tracked in running_var."""
        return self.m2 / (self.count - 1)

    def merge(self, other: Moments) -> Moments:
        """Chan's parallel update: the moments of the union of both batches."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / count)
        return Moments(count, mean, m2)


def rows_view(x: np.ndarray) -> tuple[np.ndarray, int]:
    """View `x` (N, C, *spatial) as (N*C, L) rows; return it with C.

    Row r holds channel r % C. Copies only when `x` is not C-contiguous.
    """
    if x.ndim < 2:
        raise ValueError(f"expected at least 2 dimensions (N, C, ...), got shape {x.shape}")
    channels = x.shape[1]
    rows = x.shape[0] * channels
    length = x.size // rows if rows else 0
    return np.ascontiguousarray(x).reshape(rows, length), channels


def channel_count(x: np.ndarray) -> int:
    """Elements per channel of `x` (N, C, *spatial)."""
    return x.size // x.shape[1] if x.shape[1] else 0


def _blocks(rows: int, length: int) -> Iterator[tuple[slice, slice]]:
    """Yield (row slice, column slice) blocks of about BLOCK_ELEMENTS elements."""
    if length <= BLOCK_ELEMENTS:
        step = max(1, BLOCK_ELEMENTS // max(length, 1))
        for start in range(0, rows, step):
            yield slice(start, min(start + step, rows)), slice(None)
    else:
        for row in range(rows):
            for col in range(0, length, BLOCK_ELEMENTS):
                yield slice(row, row + 1), slice(col, min(col + BLOCK_ELEMENTS, length))


def _per_row(vector: Vector, batch: int) -> np.ndarray:
    """Repeat a (C,) vector for each of `batch` samples: (batch*C, 1)."""
    return np.tile(vector, batch)[:, None]


def _channel_sum(row_values: np.ndarray, channels: int) -> Vector:
    """Sum (N*C,) per-row values into (C,) per-channel totals."""
    return np.asarray(row_values.reshape(-1, channels).sum(axis=0))


def moments(x: np.ndarray) -> Moments:
    """Per-channel count, mean and M2 of `x` (N, C, *spatial), accumulated in float64."""
    x2, channels = rows_view(x)
    batch = x.shape[0]
    count = channel_count(x)
    if count == 0:
        zeros = np.zeros(channels)
        return Moments(0, zeros, zeros.copy())
    # Non-finite input yields non-finite moments, which callers check; no warnings.
    with np.errstate(invalid="ignore", over="ignore"):
        mean = _channel_sum(x2.sum(axis=1, dtype=np.float64), channels) / count
        mean_rows = _per_row(mean, batch)
        m2_rows = np.zeros(x2.shape[0])
        for rows, cols in _blocks(*x2.shape):
            dev = x2[rows, cols].astype(np.float64)
            dev -= mean_rows[rows]
            m2_rows[rows] += np.einsum("ij,ij->i", dev, dev)
        return Moments(count, mean, _channel_sum(m2_rows, channels))


def inv_std(var: Vector, eps: float, eps_mode: EpsMode = "additive") -> Vector:
    """1 / sqrt(var + eps), or 1 / sqrt(max(var, eps)) with eps_mode "max"."""
    if eps_mode == "max":
        return np.asarray(1.0 / np.sqrt(np.maximum(var, eps)))
    return np.asarray(1.0 / np.sqrt(var + eps))


def _center(mean: Vector, dtype: np.dtype) -> tuple[Vector, Vector]:
    """Split `mean` into a work-dtype center and the float64 remainder mean - center.

    Subtracting a work-dtype center from work-dtype elements is exact when they
    are close (Sterbenz), which is what keeps large-mean data accurate; the
    small remainder is folded into a per-channel offset in float64.
    """
    center = mean.astype(dtype)
    return center, mean - center.astype(np.float64)


def normalize(
    x: np.ndarray,
    mean: Vector,
    inv_std: Vector,
    weight: Vector | None,
    bias: Vector | None,
) -> np.ndarray:
    """y = (x - mean) * inv_std * weight + bias, per channel; same shape and dtype as `x`."""
    wd = work_dtype(x.dtype)
    x2, _ = rows_view(x)
    batch = x.shape[0]
    scale = inv_std if weight is None else inv_std * weight
    center, remainder = _center(mean, wd)
    offset = -remainder * scale
    if bias is not None:
        offset = offset + bias
    center_r = _per_row(center, batch)
    scale_r = _per_row(scale, batch).astype(wd)
    offset_r = _per_row(offset, batch).astype(wd)
    out = np.empty(x2.shape, dtype=x.dtype)
    for rows, cols in _blocks(*x2.shape):
        block = np.subtract(x2[rows, cols], center_r[rows], dtype=wd)
        block *= scale_r[rows]
        block += offset_r[rows]
        out[rows, cols] = block
    return out.reshape(x.shape)


def grad_sums(
    x: np.ndarray, grad_out: np.ndarray, mean: Vector, inv_std: Vector
) -> tuple[Vector, Vector]:
    """Per-channel (sum(dy), sum(dy * xhat)) in float64, xhat = (x - mean) * inv_std.

    These are dbias and dweight, and the two sums that batch-statistics backward
    all-reduces across ranks.
    """
    x2, channels = rows_view(x)
    dy2, _ = rows_view(grad_out)
    batch = x.shape[0]
    mean_r = _per_row(mean, batch)
    sum_dy_r = dy2.sum(axis=1, dtype=np.float64)
    dot_r = np.zeros(x2.shape[0])
    for rows, cols in _blocks(*x2.shape):
        dev = x2[rows, cols].astype(np.float64)
        dev -= mean_r[rows]
        dot_r[rows] += np.einsum("ij,ij->i", dev, dy2[rows, cols].astype(np.float64))
    return _channel_sum(sum_dy_r, channels), _channel_sum(dot_r, channels) * inv_std


def grad_input(
    x: np.ndarray,
    grad_out: np.ndarray,
    mean: Vector,
    inv_std: Vector,
    weight: Vector | None,
    batch_stats: tuple[int, Vector, Vector] | None,
) -> np.ndarray:
    """dx for y = (x - mean) * inv_std * weight + bias; same shape and dtype as `x`.

    With `batch_stats` = (count, sum(dy), sum(dy * xhat)) the mean and inv_std
    are functions of the batch and
        dx = weight * inv_std * (dy - sum(dy)/count - xhat * sum(dy*xhat)/count);
    without (running statistics) they are constants and dx = dy * weight * inv_std.
    """
    wd = work_dtype(x.dtype)
    x2, _ = rows_view(x)
    dy2, _ = rows_view(grad_out)
    batch = x.shape[0]
    gain = inv_std if weight is None else inv_std * weight
    gain_r = _per_row(gain, batch).astype(wd)
    out = np.empty(x2.shape, dtype=x.dtype)
    if batch_stats is None:
        for rows, cols in _blocks(*x2.shape):
            out[rows, cols] = np.multiply(dy2[rows, cols], gain_r[rows], dtype=wd)
        return out.reshape(x.shape)
    count, sum_dy, sum_dy_xhat = batch_stats
    # dx = gain*dy + slope*(x - center) + offset, with the float64 remainder of
    # the mean folded into the per-channel offset (see _center).
    slope = -gain * inv_std * sum_dy_xhat / count
    center, remainder = _center(mean, wd)
    offset = -gain * sum_dy / count - remainder * slope
    center_r = _per_row(center, batch)
    slope_r = _per_row(slope, batch).astype(wd)
    offset_r = _per_row(offset, batch).astype(wd)
    for rows, cols in _blocks(*x2.shape):
        dev = np.subtract(x2[rows, cols], center_r[rows], dtype=wd)
        dev *= slope_r[rows]
        dev += offset_r[rows]
        dev += np.multiply(dy2[rows, cols], gain_r[rows], dtype=wd)
        out[rows, cols] = dev
    return out.reshape(x.shape)
