"""Unit tests of bnserver.core.kernel against the float64 reference in tests/unit/reference.py.

Tolerances follow the precision contract (docs/design.md, Semantics):

* float64 input: ~1e-12 relative to the output's magnitude, loosened only by
  the data's condition |mean|/std: the mean itself is rounded to float64
  (relative 1e-16), which moves xhat by ~1e-16 * |mean|/std in any
  implementation, the reference included;
* float32 input (float32 arithmetic, float64 accumulation): 1e-5;
* float16 input (computed in float32, returned float16): the reference rounded
  to float16, within about two float16 ulps.

Statistics are float64 whatever the input dtype, so they are held to ~1e-10.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnserver.core import kernel
from tests.unit import reference as ref

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
EPS = 1e-5

#: Modest example counts: the whole unit suite has to stay fast.
PROPERTY = settings(max_examples=50, deadline=None)


# -- helpers -----------------------------------------------------------------------


def float64_tolerance(cond: float) -> float:
    """1e-12, or the floor that rounding the mean sets on data with |mean|/std = cond."""
    return max(1e-12, 2e-15 * cond)


def assert_output_close(
    got: np.ndarray, want64: np.ndarray, dtype: np.dtype, cond: float = 1.0
) -> None:
    """Compare a kernel output to the float64 reference with the tolerance of `dtype`.

    The absolute part of the tolerance is relative to the output's magnitude
    (at least 1), since elements near zero come from cancelling O(1) terms.
    `cond` is the input's |mean|/std (see the module docstring).
    """
    assert got.dtype == dtype
    assert got.shape == want64.shape
    magnitude = max(1.0, float(np.abs(want64).max(initial=0.0)))
    if dtype == F64:
        tol = float64_tolerance(cond)
        np.testing.assert_allclose(got, want64, rtol=tol, atol=tol * magnitude)
    elif dtype == F32:
        np.testing.assert_allclose(got, want64, rtol=1e-5, atol=1e-5 * magnitude)
    else:
        # The best a float16 result can be is the exact value rounded to float16;
        # allow about two ulps (float16 has an 11-bit significand: ulp(1) = 2**-10).
        want16 = want64.astype(F16).astype(F64)
        np.testing.assert_allclose(got.astype(F64), want16, rtol=2e-3, atol=2e-4 * magnitude)


def assert_grad_sums_close(got: np.ndarray, want: np.ndarray, abs_terms: np.ndarray) -> None:
    """Per-channel float64 sums, to 1e-10 of the sum of their terms' magnitudes.

    Sums like sum(dy * xhat) may cancel to near zero, so a purely relative
    tolerance on the result would be meaningless there.
    """
    assert got.dtype == F64 and got.shape == want.shape
    bound = 1e-10 * abs_terms.sum(axis=ref.reduce_axes(abs_terms))
    assert np.all(np.abs(got - want) <= bound), f"got {got}, want {want}"


def assert_grad_input_close(
    got: np.ndarray,
    want64: np.ndarray,
    dy: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray | None,
    cond: float = 1.0,
) -> None:
    """dx of batch-stats backward is a difference of O(gain*|dy|) terms: scale atol by that."""
    dtype = x.dtype
    _, var = ref.mean_var(x)
    gain = 1 / np.sqrt(var + EPS) * (1 if weight is None else np.abs(weight))
    magnitude = float(np.max(np.abs(dy.astype(F64)) * ref.per_channel(gain, x.ndim), initial=0))
    assert got.dtype == dtype and got.shape == want64.shape
    if dtype == F64:
        tol = float64_tolerance(cond)
        np.testing.assert_allclose(got, want64, rtol=tol, atol=tol * magnitude)
    elif dtype == F32:
        np.testing.assert_allclose(got, want64, rtol=1e-5, atol=1e-5 * magnitude)
    else:
        want16 = want64.astype(F16).astype(F64)
        np.testing.assert_allclose(got.astype(F64), want16, rtol=2e-3, atol=2e-4 * magnitude)


def kernel_forward(
    x: np.ndarray, eps: float, weight: np.ndarray | None, bias: np.ndarray | None
) -> tuple[np.ndarray, kernel.Moments, np.ndarray]:
    """Training forward through the kernel: (y, moments, inv_std)."""
    m = kernel.moments(x)
    inv = kernel.inv_std(m.var, eps)
    return kernel.normalize(x, m.mean, inv, weight, bias), m, inv


def kernel_backward_batch(
    x: np.ndarray, dy: np.ndarray, eps: float, weight: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dweight, dbias) of a batch-statistics forward through the kernel."""
    m = kernel.moments(x)
    inv = kernel.inv_std(m.var, eps)
    sum_dy, sum_dy_xhat = kernel.grad_sums(x, dy, m.mean, inv)
    dx = kernel.grad_input(x, dy, m.mean, inv, weight, (m.count, sum_dy, sum_dy_xhat))
    return dx, sum_dy_xhat, sum_dy


def random_affine(c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random float64 (weight, bias) of C channels, away from zero weight."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 2.0, c) * rng.choice([-1, 1], c), rng.normal(0, 1, c)


# -- a hypothesis strategy: random batches of every supported shape and dtype --------


@dataclass(frozen=True)
class Batch:
    """A random batch description; `x()` builds the array deterministically."""

    shape: tuple[int, ...]
    dtype: np.dtype
    loc: float  # mean offset, in units of `scale`
    scale: float
    affine: bool
    strided: bool  # make the input a non-contiguous view
    seed: int

    @property
    def cond(self) -> float:
        """An upper bound on |mean|/std of x()'s channels."""
        return 2 * (self.loc + 1)

    def rng(self, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt])

    def x(self) -> np.ndarray:
        rng = self.rng()
        full = (2 * self.shape[0], *self.shape[1:]) if self.strided else self.shape
        c = self.shape[1]
        # Per-channel spread of means and scales, so the channels really differ.
        mean = (self.loc + rng.uniform(-1, 1, c)) * self.scale
        std = self.scale * rng.uniform(0.5, 2.0, c)
        data = ref.per_channel(mean, len(full)) + ref.per_channel(std, len(full)) * (
            rng.standard_normal(full)
        )
        x = data.astype(self.dtype)
        return x[::2] if self.strided else x

    def dy(self) -> np.ndarray:
        return self.rng(1).standard_normal(self.shape).astype(self.dtype)

    def affine_params(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not self.affine:
            return None, None
        return random_affine(self.shape[1], self.seed)

    def running_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Plausible running statistics for eval-mode tests (float32-representable)."""
        rng = self.rng(2)
        c = self.shape[1]
        mean = (self.loc + rng.uniform(-1, 1, c)) * self.scale
        var = (self.scale * rng.uniform(0.5, 2.0, c)) ** 2
        return mean.astype(F32).astype(F64), var.astype(F32).astype(F64)


@st.composite
def batches(draw: st.DrawFn, dtypes: tuple[np.dtype, ...] = (F16, F32, F64)) -> Batch:
    ndim = draw(st.sampled_from([2, 3, 4]))
    n = draw(st.integers(1, 6))  # includes a batch of one (with spatial extent when ndim > 2)
    c = draw(st.integers(1, 5))
    spatial = tuple(draw(st.integers(1, 5)) for _ in range(ndim - 2))
    dtype = draw(st.sampled_from(dtypes))
    if dtype == F16:
        # Keep |x| well inside float16's range (max 65504).
        scale = draw(st.sampled_from([1e-2, 1.0, 10.0]))
        loc = draw(st.sampled_from([0.0, 10.0, 100.0]))
    else:
        scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
        loc = draw(st.sampled_from([0.0, 1.0, 1e2, 1e4]))
    return Batch(
        shape=(n, c, *spatial),
        dtype=dtype,
        loc=loc,
        scale=scale,
        affine=draw(st.booleans()),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


# -- property tests: kernel == reference on random batches ----------------------


@PROPERTY
@given(batch=batches())
def test_moments_match_reference(batch: Batch) -> None:
    x = batch.x()
    m = kernel.moments(x)
    mean, var = ref.mean_var(x)
    assert m.count == ref.count(x)
    assert m.mean.dtype == F64 and m.m2.dtype == F64
    assert m.mean.shape == m.m2.shape == (x.shape[1],)
    np.testing.assert_allclose(m.mean, mean, rtol=1e-12, atol=1e-12 * batch.scale)
    np.testing.assert_allclose(m.var, var, rtol=1e-10, atol=1e-12 * batch.scale**2)
    if m.count > 1:
        np.testing.assert_allclose(
            m.unbiased_var, var * m.count / (m.count - 1), rtol=1e-10, atol=1e-12 * batch.scale**2
        )


@PROPERTY
@given(batch=batches())
def test_normalize_with_batch_stats_matches_reference(batch: Batch) -> None:
    x = batch.x()
    w, b = batch.affine_params()
    y, _, _ = kernel_forward(x, EPS, w, b)
    assert_output_close(y, ref.forward_batch(x, EPS, w, b), batch.dtype, batch.cond)


@PROPERTY
@given(batch=batches())
def test_normalize_with_running_stats_matches_reference(batch: Batch) -> None:
    x = batch.x()
    w, b = batch.affine_params()
    rm, rv = batch.running_stats()
    y = kernel.normalize(x, rm, kernel.inv_std(rv, EPS), w, b)
    assert_output_close(y, ref.forward(x, rm, rv, EPS, w, b), batch.dtype, batch.cond)


@PROPERTY
@given(batch=batches())
def test_backward_with_batch_stats_matches_reference(batch: Batch) -> None:
    x, dy = batch.x(), batch.dy()
    w, _ = batch.affine_params()
    dx, dweight, dbias = kernel_backward_batch(x, dy, EPS, w)
    want_dx, want_dweight, want_dbias = ref.backward_batch(x, dy, EPS, w)
    assert_grad_sums_close(dbias, want_dbias, np.abs(dy.astype(F64)))
    xhat = np.abs(ref.forward_batch(x, EPS))
    assert_grad_sums_close(dweight, want_dweight, np.abs(dy.astype(F64)) * xhat)
    assert_grad_input_close(dx, want_dx, dy, x, w, batch.cond)


@PROPERTY
@given(batch=batches())
def test_backward_with_running_stats_matches_reference(batch: Batch) -> None:
    x, dy = batch.x(), batch.dy()
    w, _ = batch.affine_params()
    rm, rv = batch.running_stats()
    inv = kernel.inv_std(rv, EPS)
    sum_dy, sum_dy_xhat = kernel.grad_sums(x, dy, rm, inv)
    dx = kernel.grad_input(x, dy, rm, inv, w, None)
    want_dx, want_dweight, want_dbias = ref.backward_running(x, dy, rm, rv, EPS, w)
    assert_grad_sums_close(sum_dy, want_dbias, np.abs(dy.astype(F64)))
    xhat = np.abs(ref.forward(x, rm, rv, EPS))
    assert_grad_sums_close(sum_dy_xhat, want_dweight, np.abs(dy.astype(F64)) * xhat)
    assert_output_close(dx, want_dx, batch.dtype, batch.cond)


@PROPERTY
@given(batch=batches(), block=st.sampled_from([1, 3, 7, 64]))
def test_blocked_passes_agree_with_reference_for_any_block_size(batch: Batch, block: int) -> None:
    """The kernel walks (N*C, L) rows in blocks of BLOCK_ELEMENTS; shrink the block so
    that partial row blocks and rows split into column blocks are exercised on small data."""
    x, dy = batch.x(), batch.dy()
    w, b = batch.affine_params()
    # Thresholds at 0: every input, however small, also takes the threaded paths.
    with (
        mock.patch.object(kernel, "BLOCK_ELEMENTS", block),
        mock.patch.object(kernel, "PARALLEL_MIN_ELEMENTS", 0),
        mock.patch.object(kernel, "PARALLEL_MIN_STATS_ELEMENTS", 0),
    ):
        y, m, _ = kernel_forward(x, EPS, w, b)
        dx, dweight, dbias = kernel_backward_batch(x, dy, EPS, w)
    mean, var = ref.mean_var(x)
    np.testing.assert_allclose(m.var, var, rtol=1e-10, atol=1e-12 * batch.scale**2)
    assert_output_close(y, ref.forward_batch(x, EPS, w, b), batch.dtype, batch.cond)
    want_dx, want_dweight, want_dbias = ref.backward_batch(x, dy, EPS, w)
    assert_grad_sums_close(dbias, want_dbias, np.abs(dy.astype(F64)))
    terms = np.abs(dy.astype(F64)) * np.abs(ref.forward(x, mean, var, EPS))
    assert_grad_sums_close(dweight, want_dweight, terms)
    assert_grad_input_close(dx, want_dx, dy, x, w, batch.cond)


def test_rows_longer_than_a_block() -> None:
    """Real block size, rows longer than one block (the column-split path)."""
    rng = np.random.default_rng(7)
    length = kernel.BLOCK_ELEMENTS + 5
    x = (5 + 2 * rng.standard_normal((2, 3, length))).astype(F32)
    dy = rng.standard_normal(x.shape).astype(F32)
    w, b = random_affine(3, 7)
    y, m, _ = kernel_forward(x, EPS, w, b)
    np.testing.assert_allclose(m.var, ref.mean_var(x)[1], rtol=1e-10)
    assert_output_close(y, ref.forward_batch(x, EPS, w, b), F32)
    dx, _, _ = kernel_backward_batch(x, dy, EPS, w)
    assert_grad_input_close(dx, ref.backward_batch(x, dy, EPS, w)[0], dy, x, w)


@pytest.mark.parametrize("dtype", [F16, F32, F64])
@pytest.mark.parametrize("shape", [(1, 3, 5), (1, 2, 3, 4)])
def test_batch_of_one_with_spatial_extent(dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """N=1 is a valid training batch when H*W (or L) > 1: statistics come from the spatial axes."""
    rng = np.random.default_rng(1)
    x = (1 + rng.standard_normal(shape)).astype(dtype)
    w, b = random_affine(shape[1], 1)
    y, m, _ = kernel_forward(x, EPS, w, b)
    assert m.count == x.size // shape[1] > 1
    assert_output_close(y, ref.forward_batch(x, EPS, w, b), dtype)


def test_inv_std_eps_modes() -> None:
    var = np.array([0.0, 1e-6, 4.0])
    np.testing.assert_allclose(kernel.inv_std(var, 1e-5), 1 / np.sqrt(var + 1e-5), rtol=1e-15)
    np.testing.assert_allclose(
        kernel.inv_std(var, 1e-5, "max"), 1 / np.sqrt([1e-5, 1e-5, 4.0]), rtol=1e-15
    )


def test_work_dtype() -> None:
    """float16 is computed in float32; float32 and float64 stay themselves; others are refused."""
    assert kernel.work_dtype(F16) == F32
    assert kernel.work_dtype(F32) == F32
    assert kernel.work_dtype(F64) == F64
    with pytest.raises(TypeError):
        kernel.work_dtype(np.dtype(np.int32))


# -- backward against central finite differences ---------------------------------------


def numeric_grad(
    loss: Callable[[np.ndarray], float], at: np.ndarray, h: float = 1e-5
) -> np.ndarray:
    """Central finite differences of a scalar function, element by element."""
    grad = np.zeros_like(at)
    for idx in np.ndindex(at.shape):
        plus, minus = at.copy(), at.copy()
        plus[idx] += h
        minus[idx] -= h
        grad[idx] = (loss(plus) - loss(minus)) / (2 * h)
    return grad


def fd_problem() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A small float64 problem: x (4, 3, 2), a fixed upstream gradient dy, weight and bias."""
    rng = np.random.default_rng(42)
    x = 2 + rng.standard_normal((4, 3, 2)) * np.array([0.5, 1.0, 3.0])[None, :, None]
    dy = rng.standard_normal(x.shape)
    w, b = random_affine(3, 42)
    return x, dy, w, b


def test_batch_stats_backward_matches_finite_differences() -> None:
    """Training: mean and var depend on x, so dx has the two correction terms.

    loss = sum(y * dy) with y from the kernel's own forward; its gradients w.r.t.
    x, weight and bias must be what grad_sums and grad_input return.
    """
    x, dy, w, b = fd_problem()

    def loss(x_: np.ndarray, w_: np.ndarray = w, b_: np.ndarray = b) -> float:
        return float((kernel_forward(x_, EPS, w_, b_)[0] * dy).sum())

    dx, dweight, dbias = kernel_backward_batch(x, dy, EPS, w)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dweight, numeric_grad(lambda w_: loss(x, w_), w), rtol=1e-6)
    np.testing.assert_allclose(dbias, numeric_grad(lambda b_: loss(x, w, b_), b), rtol=1e-6)
    # The correction terms matter: the running-stats formula would be wrong here.
    naive = dy * ref.per_channel(w / np.sqrt(ref.mean_var(x)[1] + EPS), 3)
    assert not np.allclose(dx, naive, rtol=1e-3)
    # And the reference's closed form agrees with the same finite differences.
    np.testing.assert_allclose(
        ref.backward_batch(x, dy, EPS, w)[0], numeric_grad(loss, x), rtol=1e-6, atol=1e-8
    )


def test_running_stats_backward_matches_finite_differences() -> None:
    """Eval (or freeze): mean and var are constants, so dx = dy * weight / sqrt(var + eps)."""
    x, dy, w, b = fd_problem()
    rm, rv = np.array([1.5, 2.5, -1.0]), np.array([0.3, 1.2, 8.0])
    inv = kernel.inv_std(rv, EPS)

    def loss(x_: np.ndarray, w_: np.ndarray = w, b_: np.ndarray = b) -> float:
        return float((kernel.normalize(x_, rm, inv, w_, b_) * dy).sum())

    sum_dy, sum_dy_xhat = kernel.grad_sums(x, dy, rm, inv)
    dx = kernel.grad_input(x, dy, rm, inv, w, None)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sum_dy_xhat, numeric_grad(lambda w_: loss(x, w_), w), rtol=1e-6)
    np.testing.assert_allclose(sum_dy, numeric_grad(lambda b_: loss(x, w, b_), b), rtol=1e-6)


def test_grad_sums_are_dbias_and_dweight() -> None:
    """dbias = sum(dy), dweight = sum(dy * xhat), written out directly."""
    x, dy, _, _ = fd_problem()
    m = kernel.moments(x)
    inv = kernel.inv_std(m.var, EPS)
    sum_dy, sum_dy_xhat = kernel.grad_sums(x, dy, m.mean, inv)
    xhat = (x - m.mean[None, :, None]) * inv[None, :, None]
    np.testing.assert_allclose(sum_dy, dy.sum(axis=(0, 2)), rtol=1e-13)
    np.testing.assert_allclose(sum_dy_xhat, (dy * xhat).sum(axis=(0, 2)), rtol=1e-12)


def test_backward_without_weight_uses_unit_gain() -> None:
    x, dy, _, _ = fd_problem()
    dx, _, _ = kernel_backward_batch(x, dy, EPS, None)
    np.testing.assert_allclose(dx, ref.backward_batch(x, dy, EPS, None)[0], rtol=1e-12, atol=1e-12)


# -- hard data: large means, constant channels, float16 ----------------------------------


def large_mean_float32(seed: int = 0) -> np.ndarray:
    """mean/std = 1e4 in float32: x = 3e4 + 3 * randn, (64, 4, 8, 8)."""
    rng = np.random.default_rng(seed)
    return (3e4 + 3 * rng.standard_normal((64, 4, 8, 8))).astype(F32)


def test_large_mean_float32_statistics_and_outputs_are_exact() -> None:
    x = large_mean_float32()
    # dy correlated with xhat (as from an L2 loss on y), so sum(dy * xhat) is large and
    # the slope term of dx, slope * (x - mean), carries weight.
    noise = np.random.default_rng(1).standard_normal(x.shape)
    dy = ((x - 3e4) / 3 + 0.1 * noise).astype(F32)
    w, b = random_affine(4, 0)
    mean, var = ref.mean_var(x)
    y, m, _ = kernel_forward(x, EPS, w, b)
    np.testing.assert_allclose(m.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(m.var, var, rtol=1e-10)
    assert_output_close(y, ref.forward_batch(x, EPS, w, b), F32)
    dx, _, _ = kernel_backward_batch(x, dy, EPS, w)
    assert_grad_input_close(dx, ref.backward_batch(x, dy, EPS, w)[0], dy, x, w)


def test_naive_sum_of_squares_fails_where_our_moments_do_not() -> None:
    """sklearn's test_extmath incremental-variance argument, on the data above.

    var = E[x^2] - E[x]^2 in float32 subtracts two numbers near 9e8 whose float32
    ulp is 64, to get a variance near 9: the answer is noise. The kernel's two-pass
    float64 moments are exact on the same data.
    """
    x = large_mean_float32()
    axes = (0, 2, 3)
    _, var = ref.mean_var(x)
    naive = (x * x).mean(axis=axes, dtype=F32) - x.mean(axis=axes, dtype=F32) ** 2
    ours = kernel.moments(x).var
    assert np.max(np.abs(naive - var) / var) > 1e-2  # fails by orders of magnitude past 1e-5
    assert np.max(np.abs(ours - var) / var) < 1e-10


def test_naive_sum_of_squares_fails_in_float64_too() -> None:
    """Even in float64, mean/std = 1e8 destroys the naive formula; the kernel stays exact.

    Ground truth without a higher precision: x - 1e8 is exact (Sterbenz), and
    the variance does not depend on the shift.
    """
    rng = np.random.default_rng(3)
    x = 1e8 + rng.standard_normal((32, 3, 16))
    axes = (0, 2)
    true_var = (x - 1e8).var(axis=axes)
    naive = (x * x).mean(axis=axes) - x.mean(axis=axes) ** 2
    assert np.max(np.abs(naive - true_var) / true_var) > 1e-2
    np.testing.assert_allclose(kernel.moments(x).var, true_var, rtol=1e-10)
    y, _, _ = kernel_forward(x, EPS, None, None)
    want = ref.forward_batch(x - 1e8, EPS)  # shift-invariant, and exact to compute
    np.testing.assert_allclose(y, want, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("dtype", [F16, F32, F64])
@pytest.mark.parametrize("value", [0.0, 7.25, -1234.5])
def test_constant_channel_gives_bias_and_no_nan(dtype: np.dtype, value: float) -> None:
    """var = 0: the output is exactly the bias (xhat = 0), never NaN; other channels normal."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 3, 4)).astype(dtype)
    x[:, 1] = value
    w, b = random_affine(3, 5)
    y, m, _ = kernel_forward(x, EPS, w, b)
    assert m.m2[1] == 0.0 and m.mean[1] == x[0, 1, 0]
    assert np.isfinite(y).all()
    bias = b[1].astype(dtype)
    atol = float(np.spacing(np.abs(bias))) if dtype == F16 else 1e-6
    np.testing.assert_allclose(y[:, 1].astype(F64), float(bias), rtol=0, atol=atol)
    assert_output_close(y, ref.forward_batch(x, EPS, w, b), dtype)


def test_float16_is_computed_in_float32_and_returned_float16() -> None:
    """The best float16 answer is the exact one rounded once to float16.

    Computing in float32 gets that answer for nearly every element (the only
    misses are ties within float32 error of a float16 rounding boundary), and is
    never off by more than one float16 ulp. A pure float16 pipeline is not close.
    """
    rng = np.random.default_rng(11)
    x = (5 + 2 * rng.standard_normal((100, 2, 50))).astype(F16)
    w, b = np.array([1.3, 0.7]), np.array([0.2, -0.5])
    y, m, inv = kernel_forward(x, EPS, w, b)
    assert y.dtype == F16
    best = ref.forward_batch(x, EPS, w, b).astype(F16)
    ulps = np.abs(y.astype(F64) - best.astype(F64)) / np.spacing(np.abs(best))
    assert np.mean(y == best) > 0.99
    assert ulps.max() <= 1
    # The same affine map evaluated in float16 arithmetic misses most elements.
    scale16 = (inv * w).astype(F16)[None, :, None]
    all_f16 = (x - m.mean.astype(F16)[None, :, None]) * scale16 + b.astype(F16)[None, :, None]
    assert all_f16.dtype == F16 and np.mean(all_f16 == best) < 0.5


def test_float16_near_its_largest_value() -> None:
    """x near 6e4 (float16 max is 65504): x^2 or sums would overflow in float16."""
    rng = np.random.default_rng(12)
    x = (6e4 + 64 * rng.integers(-20, 20, (32, 2, 8))).astype(F16)
    y, m, _ = kernel_forward(x, EPS, None, None)
    assert np.isfinite(m.m2).all() and np.isfinite(y).all()
    assert_output_close(y, ref.forward_batch(x, EPS), F16)


# -- Moments.merge (Chan's parallel update) -----------------------------------------------


def split_moments(x: np.ndarray, cuts: list[int]) -> list[kernel.Moments]:
    """Moments of the batch slices x[0:c1], x[c1:c2], ..., x[ck:N] (slices may be empty)."""
    bounds = [0, *cuts, x.shape[0]]
    return [kernel.moments(x[lo:hi]) for lo, hi in itertools.pairwise(bounds)]


def merge_all(parts: list[kernel.Moments]) -> kernel.Moments:
    total = parts[0]
    for part in parts[1:]:
        total = total.merge(part)
    return total


def assert_moments_equal(got: kernel.Moments, want: kernel.Moments, rtol: float = 1e-12) -> None:
    assert got.count == want.count
    np.testing.assert_allclose(got.mean, want.mean, rtol=rtol)
    np.testing.assert_allclose(got.m2, want.m2, rtol=rtol)


@pytest.mark.parametrize("x", [large_mean_float32(), large_mean_float32().astype(F64) / 7])
def test_merge_of_uneven_parts_equals_whole_batch(x: np.ndarray) -> None:
    """Uneven parts, an empty one among them (count 0), large-mean data."""
    parts = split_moments(x, [1, 1, 9, 40])  # sizes 1, 0, 8, 31, 24
    assert [p.count for p in parts] == [64, 0, 512, 1984, 1536]
    assert_moments_equal(merge_all(parts), kernel.moments(x))


def test_merge_with_empty_is_identity_on_either_side() -> None:
    x = large_mean_float32()
    whole = kernel.moments(x)
    empty = kernel.moments(x[:0])
    assert empty.count == 0
    assert_moments_equal(whole.merge(empty), whole, rtol=0)
    assert_moments_equal(empty.merge(whole), whole, rtol=0)
    assert empty.merge(empty).count == 0


def test_merge_order_is_associative_and_commutative() -> None:
    x = large_mean_float32(seed=4)
    a, b, c, d = split_moments(x, [5, 6, 30])
    whole = kernel.moments(x)
    assert_moments_equal(a.merge(b).merge(c).merge(d), whole)
    assert_moments_equal(a.merge(b.merge(c.merge(d))), whole)
    assert_moments_equal(a.merge(b).merge(c.merge(d)), whole)
    for order in itertools.permutations([a, b, c, d]):
        assert_moments_equal(merge_all(list(order)), whole)


@PROPERTY
@given(
    batch=batches(dtypes=(F32, F64)),
    cut_fractions=st.lists(st.floats(0, 1), min_size=1, max_size=4),
)
def test_merge_of_random_splits_equals_whole_batch(
    batch: Batch, cut_fractions: list[float]
) -> None:
    x = batch.x()
    n = x.shape[0]
    cuts = sorted(round(f * n) for f in cut_fractions)
    merged = merge_all(split_moments(x, cuts))
    whole = kernel.moments(x)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12, atol=1e-12 * batch.scale)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-10, atol=1e-12 * batch.scale**2)
