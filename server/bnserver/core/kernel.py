"""Batch-normalization kernel: pure functions on numpy arrays.

No module state, no gRPC. Conventions used throughout:

* ``x`` has shape ``(N, C, *spatial)``; statistics are per channel (axis 1),
  reduced over every other axis. ``count`` is ``N * prod(spatial)``, the number
  of elements that each channel's statistics summarize.
* Per-channel vectors (``mean``, ``var``, ``inv_std``, ``weight``, ...) are
  float64 arrays of shape ``(C,)``.
* Arithmetic on elements runs in the *work dtype* (float32 for float16 and
  float32 input, float64 for float64 input); every reduction accumulates in
  float64. Outputs have the input's dtype.

How the passes run (``moments``, ``normalize``, ``grad_sums`` and ``grad_input``
document the numerics):

* The input is viewed as ``(N, C, L)`` and walked in blocks of about
  ``BLOCK_ELEMENTS`` elements, so that the few operations applied to a block
  find it in cache and each pass reads the input from memory once. Statistics
  take one pass (two only for channels whose mean is far beyond their spread),
  normalization one more, writing the output. Backward reads x and dy once for
  the gradient sums and once more to write dx.
* Large inputs split their blocks between the calling thread and a small
  persistent pool. numpy releases the GIL inside ufuncs and ``einsum``, so the
  threads compute in parallel; BLAS calls (``matmul``, ``vecdot``) do not
  release it, so they reduce only where one thread does the work.
* Block temporaries live in reused scratch buffers: the only fresh allocation
  of input size is the output (a fresh buffer costs a page fault per 4 KiB).
* Per-channel vectors broadcast as ``(C, 1)`` columns, or for short rows
  (``L < SHORT_ROW``) as ``(C, L)`` arrays so that ufunc inner loops stay long;
  see ``_bufsize`` for the ufunc buffer size used with them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

Vector = np.ndarray  # float64, shape (C,)
EpsMode = Literal["additive", "max"]

#: Elements per block (1 MiB of float32). Measured on 2 cores: blocks of 2^16
#: elements make large forwards 1.2-1.4x slower (each ufunc call is a GIL hand-off
#: between the threads); 2^17 to 2^19 are alike.
BLOCK_ELEMENTS = 1 << 18

#: Inputs with at least this many elements are normalized by several threads; below
#: it the hand-off costs more than a second core saves.
PARALLEL_MIN_ELEMENTS = 1 << 19

#: The same for statistics, which one thread computes faster (with BLAS, which holds
#: the GIL) than each of several threads can (with einsum, which does not).
PARALLEL_MIN_STATS_ELEMENTS = 1 << 20

#: Threads that work on one large input: the caller plus a pool of THREADS - 1
#: (the usable cores, at most 4; measured only with 2).
THREADS = max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 4))

#: Rows (the spatial extent L) shorter than this use (C, L)-shaped per-channel
#: vectors and reduce over N first, so that ufunc inner loops stay long.
SHORT_ROW = 128

#: moments: a channel's statistics from uncentred sums are kept when
#: sum(x^2) <= this * M2, i.e. |mean| < 16 std; rounding of the sums then costs at
#: most 8 bits of float64's 53. Other channels are recomputed around their mean.
CONDITION_LIMIT = 256.0

#: normalize: computes x * scale + offset (two ufunc passes) when every
#: per-channel |offset| = |bias - mean * scale| is at most this, which bounds the
#: rounding error by 15 units of work-dtype rounding times max(1, |y|) (1e-6 in
#: float32); otherwise (x - center) * scale + offset (three passes).
DIRECT_OFFSET_LIMIT = 4.0

#: grad_input: computes dx = dy * gain + x * slope + offset (four ufunc passes) when
#: every channel's |mean| * inv_std is at most this, which bounds the rounding error
#: by about 2 * this many units of work-dtype rounding of gain * max|dy| (2e-6 in
#: float32); otherwise x - center replaces x (five passes).
GRAD_DIRECT_LIMIT = 16.0

#: The smallest float64 magnitude that rounds to infinity in float32.
FLOAT32_OVERFLOW = float.fromhex("0x1.ffffffp+127")

#: sums of rows at least this long are reduced along the rows (einsum "ncl->c"),
#: shorter ones over N first ("ncl->cl").
REDUCE_ROW = 128

_DEFAULT_BUFSIZE = np.getbufsize()


def _bufsize(inner: int) -> int:
    """The ufunc buffer size (elements) for broadcasting ufuncs whose inner loop is `inner` long.

    numpy >= 2.3 copies operands through its buffers to lengthen inner loops that
    are shorter than the buffer (8192 elements by default): that helps loops of a
    few hundred elements, but makes loops of a few thousand about 2x slower, so
    for those the buffer is cut to the loop's length.
    """
    if 512 <= inner < _DEFAULT_BUFSIZE:
        return inner - inner % 16  # numpy wants a multiple of 16
    return _DEFAULT_BUFSIZE


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


def channel_count(x: np.ndarray) -> int:
    """Elements per channel of `x` (N, C, *spatial)."""
    return x.size // x.shape[1] if x.shape[1] else 0


# -- blocked, threaded passes over an (N, C, L) view ------------------------------------

#: A block of the (N, C, L) view: its sample, channel and position ranges.
Block = tuple[slice, slice, slice]
T = TypeVar("T")


def _view3(x: np.ndarray) -> np.ndarray:
    """`x` (N, C, *spatial) as (N, C, L); a view unless the spatial axes cannot merge."""
    if x.ndim < 2:
        raise ValueError(f"expected at least 2 dimensions (N, C, ...), got shape {x.shape}")
    n, c = x.shape[0], x.shape[1]
    length = x.size // (n * c) if n * c else 0
    return x.reshape(n, c, length)


def _split(shape: tuple[int, ...]) -> list[Block]:
    """Blocks of at most BLOCK_ELEMENTS elements covering an (N, C, L) array.

    Whole samples when one fits, else channel ranges of one sample, else
    position ranges of one row. A block is contiguous in a contiguous array.
    """
    n, c, length = shape
    size = max(1, BLOCK_ELEMENTS)
    whole = slice(None)
    if c * length <= size:
        step = size // max(1, c * length)
        return [(slice(i, min(i + step, n)), whole, whole) for i in range(0, n, step)]
    if length <= size:
        step = size // length
        return [
            (slice(i, i + 1), slice(j, min(j + step, c)), whole)
            for i in range(n)
            for j in range(0, c, step)
        ]
    return [
        (slice(i, i + 1), slice(j, j + 1), slice(k, min(k + size, length)))
        for i in range(n)
        for j in range(c)
        for k in range(0, length, size)
    ]


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(THREADS - 1, thread_name_prefix="bnserver-kernel")
        return _pool


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist; start a new pool on demand."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _parallel(size: int, blocks: int, threshold: int) -> bool:
    """Whether a pass over `blocks` blocks of `size` elements is split across threads."""
    return THREADS > 1 and blocks > 1 and size >= threshold


class _Shared(Iterator[Block]):
    """An iterator over blocks that several threads can take from."""

    def __init__(self, blocks: list[Block]) -> None:
        self._blocks = iter(blocks)
        self._lock = threading.Lock()

    def __next__(self) -> Block:
        with self._lock:
            return next(self._blocks)


def _run(
    task: Callable[[Iterator[Block]], T],
    blocks: list[Block],
    parallel: bool,
    ordered: bool = False,
) -> list[T]:
    """Run `task` over `blocks`: on this thread, or on it and the pool together.

    The threads take blocks one at a time from a shared iterator, so one that
    starts late (a pool thread must first wake up) just takes fewer. With
    `ordered` (reductions), thread k takes every n-th block from the k-th
    instead, so that each thread's partial sums, and so the result, are the same
    on every run: a forward and its retry give bit-identical outputs. Returns
    one result per thread, in thread order. Waits for every thread, even when
    one fails.
    """
    helpers = min(THREADS, len(blocks)) - 1 if parallel else 0
    if helpers <= 0:
        return [task(_Shared(blocks))]
    threads = helpers + 1
    if ordered:
        shares = [_Shared(blocks[k::threads]) for k in range(threads)]
    else:
        shares = [_Shared(blocks)] * threads
    pool = _executor()
    futures: list[Future[T]] = [pool.submit(task, shares[k]) for k in range(helpers)]
    try:
        mine = task(shares[helpers])
    finally:
        wait_all(futures)
    return [f.result() for f in futures] + [mine]


_scratch_free: dict[np.dtype, list[np.ndarray]] = {}
_scratch_lock = threading.Lock()


class _Scratch:
    """A reusable 1-D buffer of at least `size` elements, returned to a free list on exit.

    Reusing block temporaries avoids a page fault per 4 KiB on every call. At most
    THREADS buffers per dtype are kept.
    """

    def __init__(self, dtype: np.dtype, size: int) -> None:
        self.dtype, self.size = np.dtype(dtype), size

    def __enter__(self) -> np.ndarray:
        with _scratch_lock:
            free = _scratch_free.setdefault(self.dtype, [])
            buf = free.pop() if free else None
        if buf is None or buf.size < self.size:
            buf = np.empty(max(self.size, 1), self.dtype)
        self.buf = buf
        return buf

    def __exit__(self, *exc: object) -> None:
        with _scratch_lock:
            free = _scratch_free[self.dtype]
            if len(free) < THREADS:
                free.append(self.buf)


def _block_extent(block: Block, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The shape of `block` within an array of `shape`."""
    n, c, length = (len(range(*s.indices(dim))) for s, dim in zip(block, shape, strict=True))
    return n, c, length


_all_ones = np.ones(0)


def _ones(n: int) -> np.ndarray:
    """A read-only float64 vector of n ones: a view of one cached vector, grown on demand."""
    global _all_ones
    ones = _all_ones
    if ones.size < n:
        ones = np.ones(max(n, 1024))
        ones.flags.writeable = False
        _all_ones = ones
    return ones[:n]


def _long_rows(shape: tuple[int, ...]) -> bool:
    """Whether sums of an (N, C, L) input reduce along rows first (else over N first)."""
    n, _, length = shape
    return length >= min(n, REDUCE_ROW)


def _block_sums(
    d: np.ndarray, long_rows: bool, blas: bool, e: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """float64 (sum d, sum d*e) of float64 blocks `d` and `e` (nb, cb, lb); e = d if None.

    Per channel, shape (cb,), with `long_rows`; else per (channel, position),
    shape (cb, lb). BLAS (gemv, dot) is faster than einsum but holds the GIL, so
    threads that share the work use einsum.
    """
    nb, cb, lb = d.shape
    e = d if e is None else e
    if not blas:
        if long_rows:
            return np.einsum("ncl->c", d), np.einsum("ncl,ncl->c", d, e)
        return np.einsum("ncl->cl", d), np.einsum("ncl,ncl->cl", d, e)
    if long_rows:
        rows = d.reshape(nb * cb, lb)
        r1, r2 = rows @ _ones(lb), np.vecdot(rows, e.reshape(nb * cb, lb))
        if nb == 1:
            return r1, r2
        ones = _ones(nb)
        return ones @ r1.reshape(nb, cb), ones @ r2.reshape(nb, cb)
    cols = d.reshape(nb, cb * lb)
    s1, s2 = _ones(nb) @ cols, np.einsum("nk,nk->k", cols, e.reshape(nb, cb * lb))
    return s1.reshape(cb, lb), s2.reshape(cb, lb)


def _sums_task(
    x3: np.ndarray, center: np.ndarray | None, blas: bool, extent: tuple[int, int, int]
) -> Callable[[Iterator[Block]], tuple[np.ndarray, np.ndarray]]:
    """A task computing float64 (sum d, sum d*d), d = x - center, over some blocks.

    Sums are per channel, shape (C,), or per (channel, position), shape (C, L)
    (see _long_rows; the caller sums over L). `center` is (C, 1).
    """
    _, channels, length = x3.shape
    long_rows = _long_rows(x3.shape)
    shape = (channels,) if long_rows else (channels, length)
    copy = x3.dtype != np.float64 or center is not None

    def task(blocks: Iterator[Block]) -> tuple[np.ndarray, np.ndarray]:
        s1, s2 = np.zeros(shape), np.zeros(shape)
        nb, cb, lb = extent
        with (
            _Scratch(np.dtype(np.float64), nb * cb * lb if copy else 0) as scratch,
            np.errstate(invalid="ignore", over="ignore"),
        ):
            np.setbufsize(_bufsize(lb))
            for block in blocks:
                d = xb = x3[block]
                if copy:
                    d = scratch[: xb.size].reshape(xb.shape)
                    np.copyto(d, xb)
                    if center is not None:
                        np.subtract(d, center[block[1]], out=d)
                b1, b2 = _block_sums(d, long_rows, blas)
                at = block[1] if long_rows else block[1:]
                s1[at] += b1
                s2[at] += b2
        return s1, s2

    return task


def _sums(x3: np.ndarray, center: Vector | None) -> tuple[Vector, Vector]:
    """Per-channel float64 (sum d, sum d*d) of `x3` (N, C, L), d = x - center."""
    if center is None and x3.size <= BLOCK_ELEMENTS:
        # One block on this thread: the task's loop body without its set-up.
        with _Scratch(np.dtype(np.float64), x3.size) as scratch:
            d = scratch[: x3.size].reshape(x3.shape)
            np.copyto(d, x3)
            return _fold([_block_sums(d, _long_rows(x3.shape), blas=True)])
    blocks = _split(x3.shape)
    parallel = _parallel(x3.size, len(blocks), PARALLEL_MIN_STATS_ELEMENTS)
    c = None if center is None else center.reshape(-1, 1)
    extent = _block_extent(blocks[0], x3.shape)
    return _fold(_run(_sums_task(x3, c, not parallel, extent), blocks, parallel, ordered=True))


def _fold(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[Vector, Vector]:
    """Add the blocks' partial (s1, s2) sums in block order; (C, L) sums become (C,)."""
    s1, s2 = parts[0]
    for p1, p2 in parts[1:]:
        s1 += p1
        s2 += p2
    if s1.ndim == 2:
        s1, s2 = s1.sum(axis=1), s2.sum(axis=1)
    return s1, s2


def _center_guess(x3: np.ndarray) -> Vector | None:
    """Per-channel centers for the first statistics pass, or None for no centering.

    Looks at up to 16 elements per channel (4 positions of 4 samples): when some
    channel's midrange there is beyond 8 times its range, the uncentred sums
    would likely fail moments' condition test and cost a second pass, so every
    channel is centered on its sample midrange (which is within its data).
    """
    n, _, length = x3.shape
    sample = x3[: min(n, 4), :, : min(length, 4)]
    low = sample.min(axis=(0, 2)).astype(np.float64)
    high = sample.max(axis=(0, 2)).astype(np.float64)
    mid = low / 2 + high / 2
    if (np.abs(mid) <= 8 * (high - low)).all():
        return None
    return np.asarray(mid)


#: Inputs with at most this many elements take the small-tensor paths: a few whole-array
#: float64 operations instead of the blocked passes, whose per-call set-up (views,
#: scratch, buffer sizes) costs more than the arithmetic on a tiny array.
SMALL_ELEMENTS = 1 << 12


def _small_moments(x3: np.ndarray, count: int) -> Moments:
    """`moments` of a small (N, C, L) array: two passes in float64, exact like the
    centered pass (d = x - mean in float64, M2 = sum(d^2) - sum(d)^2 / n)."""
    with np.errstate(invalid="ignore", over="ignore"):
        x64 = x3.astype(np.float64)
        mean = x64.sum(axis=(0, 2)) / count
        d = x64 - mean[:, None]
        s1 = d.sum(axis=(0, 2))
        m2 = np.einsum("ncl,ncl->c", d, d) - s1 * s1 / count
    return Moments(count, mean, np.maximum(m2, 0.0))


def moments(x: np.ndarray) -> Moments:
    """Per-channel count, mean and M2 of `x` (N, C, *spatial), accumulated in float64.

    One pass sums x and x^2 in float64 (the square of a float32 value is exact
    there); then M2 = sum(x^2) - sum(x) * mean. That subtraction cancels when
    |mean| >> std, so the channels where sum(x^2) > CONDITION_LIMIT * M2 (a mean
    beyond 16 std, or a constant nonzero channel) get a second, centered pass:
    d = x - mean in float64, M2 = sum(d^2) - sum(d)^2 / n, accurate to float64
    rounding however large the mean. The second pass reads only those channels
    when they are few, else the whole input. For inputs of more than one block a
    few elements per channel are looked at first, and if they suggest such a
    mean, the first pass is centered on them already (see _center_guess).
    """
    x3 = _view3(x)
    channels = x3.shape[1]
    count = channel_count(x)
    if count == 0:
        zeros = np.zeros(channels)
        return Moments(0, zeros, zeros.copy())
    if x3.size <= SMALL_ELEMENTS:
        return _small_moments(x3, count)
    # Non-finite input yields non-finite moments, which callers check; no warnings.
    with np.errstate(invalid="ignore", over="ignore"):
        center = _center_guess(x3) if x3.size > BLOCK_ELEMENTS else None
        s1, s2 = _sums(x3, center)
        mean = s1 / count
        m2 = s2 - s1 * mean
        if center is not None:
            mean += center
        # Fast path: every channel well conditioned (then m2 >= s2 / limit >= 0) and
        # finite sums (a total of non-negative finite s2 can overflow only near 1e308).
        if (s2 <= CONDITION_LIMIT * m2).all() and abs(float(s2.sum())) < np.inf:
            return Moments(count, mean, m2)
        redo = np.flatnonzero(~((s2 <= CONDITION_LIMIT * m2) & np.isfinite(s2)) & np.isfinite(mean))
        if len(redo):
            if 4 * len(redo) <= channels:
                d1, d2 = _sums(x3[:, redo], mean[redo])
            else:
                d1, d2 = (v[redo] for v in _sums(x3, mean))
            d1_mean = d1 / count
            mean[redo] += d1_mean
            m2[redo] = d2 - d1 * d1_mean
        return Moments(count, mean, np.maximum(m2, 0.0))


def inv_std(var: Vector, eps: float, eps_mode: EpsMode = "additive") -> Vector:
    """1 / sqrt(var + eps), or 1 / sqrt(max(var, eps)) with eps_mode "max"."""
    if eps_mode == "max":
        return np.asarray(1.0 / np.sqrt(np.maximum(var, eps)))
    return np.asarray(1.0 / np.sqrt(var + eps))


def variance_gate(var: Vector, eps: float, eps_mode: EpsMode = "additive") -> Vector | None:
    """Where the normalizing variance depends on the batch: None (everywhere) for
    "additive"; for "max" a float64 (C,) vector, 1.0 where var >= eps and 0.0
    where max(var, eps) is the constant eps.

    At var == eps the derivative of max(var, eps) is one-sided; this takes the
    variance's (as torch.clamp_min's gradient does), so the gate is 1 there.
    """
    if eps_mode != "max":
        return None
    return np.asarray(var >= eps, dtype=np.float64)


def _center(mean: Vector, dtype: np.dtype) -> tuple[Vector, Vector]:
    """Split `mean` into a work-dtype center and the float64 remainder mean - center.

    Subtracting a work-dtype center from work-dtype elements is exact when they
    are close (Sterbenz), which is what keeps large-mean data accurate; the
    small remainder is folded into a per-channel offset in float64.
    """
    center = mean.astype(dtype)
    return center, mean - center.astype(np.float64)


def _per_channel(vector: Vector, dtype: np.dtype, length: int) -> np.ndarray:
    """A (C,) vector as (C, 1), or repeated to (C, L) for short rows, in `dtype`."""
    if length >= SHORT_ROW or length == 1:
        return vector.astype(dtype).reshape(-1, 1)
    return np.repeat(vector.astype(dtype), length).reshape(-1, length)


def _affine_task(
    x3: np.ndarray,
    out3: np.ndarray,
    center: np.ndarray | None,
    scale: np.ndarray,
    offset: np.ndarray,
    extent: tuple[int, int, int],
) -> Callable[[Iterator[Block]], None]:
    """A task writing out = (x - center) * scale + offset (no center: x * scale + offset).

    The vectors are (C, 1) or (C, L) in the work dtype; a float16 block is
    widened to float32 in scratch, computed there and rounded once on the way out.
    """
    work = scale.dtype
    widen = x3.dtype != work
    by_position = scale.shape[1] > 1

    def task(blocks: Iterator[Block]) -> None:
        nb, cb, lb = extent
        inner = cb * lb if by_position or lb == 1 else lb
        with (
            _Scratch(work, nb * cb * lb if widen else 0) as scratch,
            np.errstate(invalid="ignore", over="ignore"),
        ):
            np.setbufsize(_bufsize(inner))
            for block in blocks:
                at = block[1:] if by_position else block[1]
                xb, ob = x3[block], out3[block]
                target = scratch[: xb.size].reshape(xb.shape) if widen else ob
                if widen:
                    np.copyto(target, xb)
                    xb = target
                if center is not None:
                    np.subtract(xb, center[at], out=target)
                    xb = target
                np.multiply(xb, scale[at], out=target)
                np.add(target, offset[at], out=target)
                if widen:
                    np.copyto(ob, target)

    return task


def _output(x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """`out` checked to fit `x` (a C-contiguous array of its shape and dtype), or a new one."""
    if out is None:
        return np.empty(x.shape, dtype=x.dtype)
    if out.shape != x.shape or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {x.dtype} array of shape {x.shape}")
    return out


def normalize(
    x: np.ndarray,
    mean: Vector,
    inv_std: Vector,
    weight: Vector | None,
    bias: Vector | None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """y = (x - mean) * inv_std * weight + bias, per channel; same shape and dtype as `x`.

    `out`: where to write y (x's shape and dtype; may be x itself), else a new array.

    With scale = inv_std * weight and offset = bias - mean * scale (float64,
    then rounded to the work dtype), y is computed as x * scale + offset when
    every |offset| is at most DIRECT_OFFSET_LIMIT: the rounding error is then at
    most u * (|x * scale| + |y| + |offset|) plus the vectors' own rounding, a few
    u times max(1, |y|). Otherwise y = (x - center) * scale + offset', center =
    mean rounded to the work dtype: x - center is exact near the mean
    (Sterbenz), so a large mean costs no accuracy, and the float64 remainder
    mean - center goes into offset'.
    """
    wd = work_dtype(x.dtype)
    x3 = _view3(x)
    out = _output(x, out)
    if out.size == 0:
        return out
    length = x3.shape[2]
    scale = inv_std if weight is None else inv_std * weight
    if x3.size <= SMALL_ELEMENTS:
        # Small input: (x - mean) * scale + bias in float64, one rounding on the way out.
        with np.errstate(invalid="ignore", over="ignore"):
            y = (x3.astype(np.float64) - mean[:, None]) * scale[:, None]
            if bias is not None:
                y += bias[:, None]
            np.copyto(out.reshape(x3.shape), y, casting="unsafe")
        return out
    with np.errstate(invalid="ignore", over="ignore"):
        offset = -mean * scale if bias is None else bias - mean * scale
        center = None
        if not np.abs(offset).max() <= DIRECT_OFFSET_LIMIT:
            center64, remainder = _center(mean, wd)
            center = _per_channel(center64, wd, length)
            offset = -remainder * scale if bias is None else bias - remainder * scale
        scale_v, offset_v = _per_channel(scale, wd, length), _per_channel(offset, wd, length)
        out3 = out.reshape(x3.shape)
        if x3.size <= BLOCK_ELEMENTS and x3.dtype == wd:
            # One block on this thread: the task's loop body without its set-up.
            by_position = scale_v.shape[1] > 1 or length == 1
            np.setbufsize(_bufsize(x3.shape[1] * length if by_position else length))
            src = x3
            if center is not None:
                src = np.subtract(x3, center, out=out3)
            np.multiply(src, scale_v, out=out3)
            np.add(out3, offset_v, out=out3)
            return out
        blocks = _split(x3.shape)
        extent = _block_extent(blocks[0], x3.shape)
        task = _affine_task(x3, out3, center, scale_v, offset_v, extent)
    _run(task, blocks, _parallel(x3.size, len(blocks), PARALLEL_MIN_ELEMENTS))
    return out


def _grad_sums_task(
    x3: np.ndarray, dy3: np.ndarray, mean: np.ndarray, blas: bool, extent: tuple[int, int, int]
) -> Callable[[Iterator[Block]], tuple[np.ndarray, np.ndarray]]:
    """A task computing float64 (sum dy, sum dy * (x - mean)) over some blocks.

    Per channel, shape (C,), or per (channel, position), shape (C, L), as in
    _sums_task. `mean` is float64, (C, 1) or (C, L) (see _per_channel).
    """
    _, channels, length = x3.shape
    long_rows = _long_rows(x3.shape)
    shape = (channels,) if long_rows else (channels, length)
    by_position = mean.shape[1] > 1
    widen = dy3.dtype != np.float64

    def task(blocks: Iterator[Block]) -> tuple[np.ndarray, np.ndarray]:
        s1, s2 = np.zeros(shape), np.zeros(shape)
        nb, cb, lb = extent
        size = nb * cb * lb
        with (
            _Scratch(np.dtype(np.float64), 2 * size if widen else size) as scratch,
            np.errstate(invalid="ignore", over="ignore"),
        ):
            np.setbufsize(_bufsize(cb * lb if by_position or lb == 1 else lb))
            for block in blocks:
                xb, g = x3[block], dy3[block]
                d = scratch[: xb.size].reshape(xb.shape)
                np.subtract(xb, mean[block[1:] if by_position else block[1]], out=d)
                if widen:
                    wide = scratch[size : size + xb.size].reshape(xb.shape)
                    np.copyto(wide, g)
                    g = wide

                b1, b2 = _block_sums(g, long_rows, blas, d)
                at = block[1] if long_rows else block[1:]
                s1[at] += b1
                s2[at] += b2
        return s1, s2

    return task


def grad_sums(
    x: np.ndarray, grad_out: np.ndarray, mean: Vector, inv_std: Vector
) -> tuple[Vector, Vector]:
    """Per-channel (sum(dy), sum(dy * xhat)) in float64, xhat = (x - mean) * inv_std.

    These are dbias and dweight, and the two sums that batch-statistics backward
    all-reduces across ranks. One pass: each block of dy is widened to float64
    and each block of x becomes x - mean computed in float64 (one rounding of
    the deviation itself, however large the mean; exactly 0 where x equals the
    mean), then both sums accumulate in float64 per channel.
    """
    x3, dy3 = _view3(x), _view3(grad_out)
    channels = x3.shape[1]
    if x3.size == 0:
        return np.zeros(channels), np.zeros(channels)
    mean_v = _per_channel(mean, np.dtype(np.float64), x3.shape[2])
    blocks = _split(x3.shape)
    parallel = _parallel(x3.size, len(blocks), PARALLEL_MIN_STATS_ELEMENTS)
    extent = _block_extent(blocks[0], x3.shape)
    task = _grad_sums_task(x3, dy3, mean_v, not parallel, extent)
    s1, s2 = _fold(_run(task, blocks, parallel, ordered=True))
    return s1, s2 * inv_std


def _grad_input_task(
    x3: np.ndarray,
    dy3: np.ndarray,
    out3: np.ndarray,
    gain: np.ndarray,
    terms: tuple[np.ndarray | None, np.ndarray, np.ndarray] | None,
    extent: tuple[int, int, int],
) -> Callable[[Iterator[Block]], None]:
    """A task writing out = dy * gain (+ (x - center) * slope + offset, given `terms`).

    `terms` is (center or None, slope, offset); the vectors are (C, 1) or (C, L)
    in the work dtype. float16 blocks are computed in float32 scratch and
    rounded once on the way out.
    """
    work = gain.dtype
    widen = x3.dtype != work
    by_position = gain.shape[1] > 1

    def task(blocks: Iterator[Block]) -> None:
        nb, cb, lb = extent
        size = nb * cb * lb
        inner = cb * lb if by_position or lb == 1 else lb
        parts = (2 if widen else 1) if terms is not None else (1 if widen else 0)
        with (
            _Scratch(work, parts * size) as scratch,
            np.errstate(invalid="ignore", over="ignore"),
        ):
            np.setbufsize(_bufsize(inner))
            for block in blocks:
                at = block[1:] if by_position else block[1]
                xb, gb, ob = x3[block], dy3[block], out3[block]
                target = scratch[: xb.size].reshape(xb.shape) if widen else ob
                if terms is None:
                    np.multiply(gb, gain[at], out=target)
                else:
                    center, slope, offset = terms
                    tmp = scratch[(size if widen else 0) :][: xb.size].reshape(xb.shape)
                    # dy first: the output may be dy's own memory (written in place).
                    np.multiply(gb, gain[at], out=tmp)
                    if center is not None:
                        np.subtract(xb, center[at], out=target)
                        np.multiply(target, slope[at], out=target)
                    else:
                        np.multiply(xb, slope[at], out=target)
                    np.add(target, offset[at], out=target)
                    np.add(target, tmp, out=target)
                if widen:
                    np.copyto(ob, target)

    return task


def grad_input(
    x: np.ndarray,
    grad_out: np.ndarray,
    mean: Vector,
    inv_std: Vector,
    weight: Vector | None,
    batch_stats: tuple[int, Vector, Vector] | None,
    gate: Vector | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """dx for y = (x - mean) * inv_std * weight + bias; same shape and dtype as `x`.

    With `batch_stats` = (count, sum(dy), sum(dy * xhat)) the mean and inv_std
    are functions of the batch and
        dx = weight * inv_std * (dy - sum(dy)/count - xhat * sum(dy*xhat)/count);
    without (running statistics) they are constants and dx = dy * weight * inv_std.
    `gate` (see `variance_gate`) zeroes the variance term, xhat * sum(dy*xhat)/count,
    in channels where inv_std did not depend on the batch's variance.

    With gain = weight * inv_std, dx = gain * dy + slope * x + offset, slope =
    -gain * inv_std * sum(dy*xhat)/count, when every channel's |mean| * inv_std
    is at most GRAD_DIRECT_LIMIT: |slope * mean| is then at most that limit
    times gain * max|dy| (|sum(dy*xhat)|/count <= max|dy| since mean(xhat^2) <= 1),
    so the rounding error stays a few work-dtype units of gain * max|dy|.
    Otherwise slope multiplies x - center, center = mean rounded to the work
    dtype, which is exact near the mean (see _center). `out`: where to write dx
    (x's shape and dtype; may be grad_out itself, not x), else a new array.
    """
    wd = work_dtype(x.dtype)
    x3, dy3 = _view3(x), _view3(grad_out)
    out = _output(x, out)
    if out.size == 0:
        return out
    length = x3.shape[2]
    gain = inv_std if weight is None else inv_std * weight
    terms = None
    with np.errstate(invalid="ignore", over="ignore"):
        if batch_stats is not None:
            count, sum_dy, sum_dy_xhat = batch_stats
            slope = -gain * inv_std * sum_dy_xhat / count
            if gate is not None:
                slope = slope * gate
            center = None
            offset = -gain * sum_dy / count - mean * slope
            if not np.abs(mean * inv_std).max() <= GRAD_DIRECT_LIMIT:
                center64, remainder = _center(mean, wd)
                center = _per_channel(center64, wd, length)
                offset = -gain * sum_dy / count - remainder * slope
            terms = (center, _per_channel(slope, wd, length), _per_channel(offset, wd, length))
        gain_v = _per_channel(gain, wd, length)
        out3 = out.reshape(x3.shape)
        blocks = _split(x3.shape)
        extent = _block_extent(blocks[0], x3.shape)
        task = _grad_input_task(x3, dy3, out3, gain_v, terms, extent)
    _run(task, blocks, _parallel(x3.size, len(blocks), PARALLEL_MIN_ELEMENTS))
    return out
