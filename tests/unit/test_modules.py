"""Unit tests of bnserver.modules.BatchNorm (no gRPC), mirroring MegEngine's BatchNorm tests.

Every numeric expectation is recomputed in float64 by tests/unit/reference.py.
The module stores its state in float32, so running statistics are compared to
about 1e-6 relative; outputs of float32 input to 1e-5.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from bnserver.core.config import Kind, ModuleConfig, SyncSpec
from bnserver.errors import InvalidArgument
from bnserver.state.batchnorm import BatchNorm
from tests.unit import reference as ref

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
C = 3

#: Input shapes per module kind, as MegEngine's tests use them.
SHAPES = {
    "BatchNorm2d": (Kind.BATCH_NORM_2D, (4, C, 3, 5)),
    "BatchNorm1d-2D": (Kind.BATCH_NORM_1D, (24, C)),
    "BatchNorm1d-3D": (Kind.BATCH_NORM_1D, (4, C, 6)),
}


# -- helpers ---------------------------------------------------------------------------


def make(kind: Kind = Kind.BATCH_NORM_2D, num_features: int = C, **kwargs: object) -> BatchNorm:
    return BatchNorm(ModuleConfig(kind, num_features, **kwargs))  # type: ignore[arg-type]


def data(shape: tuple[int, ...], seed: int, dtype: np.dtype = F32) -> np.ndarray:
    """Random input whose channels have different means and spreads (so stats move)."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    mean = ref.per_channel(rng.uniform(-3, 3, c), len(shape))
    std = ref.per_channel(rng.uniform(0.5, 4, c), len(shape))
    return (mean + std * rng.standard_normal(shape)).astype(dtype)


def vec(a: np.ndarray | None) -> np.ndarray:
    """A (1, C, 1, 1) state entry as a float64 (C,) vector."""
    assert a is not None
    return np.asarray(a, F64).reshape(-1)


def with_random_affine(bn: BatchNorm, seed: int = 99) -> tuple[np.ndarray, np.ndarray]:
    """Load non-trivial weight and bias; return them as float64 (float32-representable)."""
    rng = np.random.default_rng(seed)
    c = bn.config.num_features
    w = rng.uniform(0.5, 2, c).astype(F32)
    b = rng.normal(0, 1, c).astype(F32)
    bn.load_state_dict({"weight": w, "bias": b}, strict=False)
    return w.astype(F64), b.astype(F64)


def with_running_stats(bn: BatchNorm, seed: int = 77) -> tuple[np.ndarray, np.ndarray]:
    """Load non-trivial running stats; return them as float64 (float32-representable)."""
    rng = np.random.default_rng(seed)
    c = bn.config.num_features
    rm = rng.normal(0, 2, c).astype(F32)
    rv = rng.uniform(0.2, 5, c).astype(F32)
    bn.load_state_dict({"running_mean": rm, "running_var": rv}, strict=False)
    return rm.astype(F64), rv.astype(F64)


def snapshot(bn: BatchNorm) -> tuple[bool, dict[str, np.ndarray]]:
    return bn.training, bn.state_dict()


def assert_unchanged(bn: BatchNorm, before: tuple[bool, dict[str, np.ndarray]]) -> None:
    """The module's whole state (flag and every entry, bit for bit) is as `before`."""
    training, state = snapshot(bn)
    assert training == before[0]
    assert state.keys() == before[1].keys()
    for key, value in state.items():
        np.testing.assert_array_equal(value, before[1][key], err_msg=key)


def assert_running_close(bn: BatchNorm, model: ref.RefBatchNorm) -> None:
    np.testing.assert_allclose(vec(bn.running_mean), model.running_mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(vec(bn.running_var), model.running_var, rtol=1e-6, atol=1e-7)


def assert_y_close(y: np.ndarray, want: np.ndarray) -> None:
    assert y.dtype == F32 and y.shape == want.shape
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def forward(bn: BatchNorm, x: np.ndarray) -> np.ndarray:
    y, _ = bn.forward(x)
    return y


# -- MegEngine's test: three training steps, then eval -----------------------------------


@pytest.mark.parametrize("case", SHAPES)
def test_training_updates_running_stats_then_eval_uses_them(case: str) -> None:
    """running = momentum*running + (1-momentum)*batch with the unbiased batch variance,
    momentum 0.9 (PyTorch's 0.1); checked after each of three steps, then eval."""
    kind, shape = SHAPES[case]
    bn = make(kind)
    w, b = with_random_affine(bn)
    model = ref.RefBatchNorm(C, weight=w, bias=b)
    for step in range(3):
        x = data(shape, seed=step)
        assert_y_close(forward(bn, x), model.forward(x, training=True))
        assert_running_close(bn, model)

    bn.set_training(False)
    before = snapshot(bn)
    x = data(shape, seed=10)
    assert_y_close(forward(bn, x), model.forward(x, training=False))
    assert_unchanged(bn, before)  # eval updates nothing


def test_default_state_and_shapes() -> None:
    """MegEngine's initial state: weight ones, bias zeros, running (0, 1), float32 (1, C, 1, 1)."""
    bn = make(num_features=5)
    assert bn.training
    state = bn.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var"]
    for value in state.values():
        assert value.shape == (1, 5, 1, 1) and value.dtype == F32
    np.testing.assert_array_equal(vec(state["weight"]), 1)
    np.testing.assert_array_equal(vec(state["bias"]), 0)
    np.testing.assert_array_equal(vec(state["running_mean"]), 0)
    np.testing.assert_array_equal(vec(state["running_var"]), 1)


def test_state_dict_returns_copies() -> None:
    bn = make()
    state = bn.state_dict()
    state["running_mean"][...] = 42
    state["weight"][...] = 42
    np.testing.assert_array_equal(vec(bn.state_dict()["running_mean"]), 0)
    np.testing.assert_array_equal(vec(bn.state_dict()["weight"]), 1)


@pytest.mark.parametrize("dtype", [F16, F64])
def test_output_keeps_input_dtype(dtype: np.dtype) -> None:
    bn = make()
    x = data((4, C, 2, 2), seed=1, dtype=dtype)
    y = forward(bn, x)
    assert y.dtype == dtype and y.shape == x.shape
    want = ref.forward_batch(x, 1e-5)
    if dtype == F64:
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    else:
        np.testing.assert_allclose(y.astype(F64), want.astype(F16), rtol=2e-3, atol=2e-4)


# -- configuration variants -----------------------------------------------------------------


@pytest.mark.parametrize("case", SHAPES)
def test_no_running_stats_uses_batch_stats_in_eval_too(case: str) -> None:
    kind, shape = SHAPES[case]
    bn = make(kind, track_running_stats=False)
    assert bn.running_mean is None and bn.running_var is None
    assert list(bn.state_dict()) == ["weight", "bias"]
    w, b = with_random_affine(bn)
    x = data(shape, seed=3)
    want = ref.forward_batch(x, 1e-5, w, b)
    assert_y_close(forward(bn, x), want)
    bn.set_training(False)
    assert_y_close(forward(bn, x), want)
    assert bn.running_mean is None and bn.running_var is None


@pytest.mark.parametrize("case", SHAPES)
def test_affine_false_has_no_weight_bias_or_their_grads(case: str) -> None:
    kind, shape = SHAPES[case]
    bn = make(kind, affine=False)
    assert bn.weight is None and bn.bias is None
    assert list(bn.state_dict()) == ["running_mean", "running_var"]
    x, dy = data(shape, seed=4), data(shape, seed=5)
    y, saved = bn.forward(x, keep_for_backward=True)
    assert_y_close(y, ref.forward_batch(x, 1e-5))
    assert saved is not None
    grads = bn.backward(saved, dy)
    assert grads.grad_weight is None and grads.grad_bias is None
    want_dx, _, _ = ref.backward_batch(x, dy, 1e-5)
    np.testing.assert_allclose(grads.grad_input, want_dx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", SHAPES)
def test_freeze_normalizes_with_running_stats_and_never_updates_them(case: str) -> None:
    """freeze: running stats even in training; no update; no weight/bias gradient.

    MegEngine broadcasts the (1, C, 1, 1) stats against 2-D/3-D BatchNorm1d input
    to a wrong shape; here the output has the input's shape.
    """
    kind, shape = SHAPES[case]
    bn = make(kind, freeze=True)
    w, b = with_random_affine(bn)
    rm, rv = with_running_stats(bn)
    eps = 1e-5
    for training in (True, False):
        bn.set_training(training)
        before = snapshot(bn)
        x, dy = data(shape, seed=6), data(shape, seed=7)
        y, saved = bn.forward(x, keep_for_backward=True)
        assert y.shape == shape
        assert_y_close(y, ref.forward(x, rm, rv, eps, w, b))
        assert_unchanged(bn, before)
        assert saved is not None
        grads = bn.backward(saved, dy)
        assert grads.grad_weight is None and grads.grad_bias is None
        want_dx, _, _ = ref.backward_running(x, dy, rm, rv, eps, w)
        np.testing.assert_allclose(grads.grad_input, want_dx, rtol=1e-5, atol=1e-5)


def test_freeze_accepts_a_training_batch_of_one() -> None:
    """No batch statistics are computed under freeze, so n = 1 is fine."""
    bn = make(Kind.BATCH_NORM_1D, freeze=True)
    rm, rv = with_running_stats(bn)
    x = data((1, C), seed=8)
    assert_y_close(forward(bn, x), ref.forward(x, rm, rv, 1e-5))


@pytest.mark.parametrize(("momentum", "eps"), [(0.5, 1e-2), (0.99, 1e-3), (0.0, 1e-5), (1.0, 1.0)])
def test_custom_momentum_and_eps(momentum: float, eps: float) -> None:
    """momentum 0 copies the batch stats, 1 keeps the initial ones; eps enters the output."""
    kind, shape = SHAPES["BatchNorm2d"]
    bn = make(kind, momentum=momentum, eps=eps)
    model = ref.RefBatchNorm(C, eps=eps, momentum=momentum)
    for step in range(2):
        x = data(shape, seed=20 + step)
        assert_y_close(forward(bn, x), model.forward(x, training=True))
        assert_running_close(bn, model)
    bn.set_training(False)
    x = data(shape, seed=30)
    assert_y_close(forward(bn, x), model.forward(x, training=False))
    if momentum == 1.0:
        np.testing.assert_array_equal(vec(bn.running_mean), 0)
        np.testing.assert_array_equal(vec(bn.running_var), 1)


def test_reset_running_stats_and_reset_parameters() -> None:
    bn = make()
    w, b = with_random_affine(bn)
    forward(bn, data((4, C, 3, 5), seed=9))
    assert not np.allclose(vec(bn.running_mean), 0)

    bn.reset_running_stats()
    np.testing.assert_array_equal(vec(bn.running_mean), 0)
    np.testing.assert_array_equal(vec(bn.running_var), 1)
    np.testing.assert_array_equal(vec(bn.weight), w)  # parameters untouched
    np.testing.assert_array_equal(vec(bn.bias), b)

    forward(bn, data((4, C, 3, 5), seed=9))
    bn.reset_parameters()  # resets the running stats too
    state = bn.state_dict()
    for key, value in zip(
        ("weight", "bias", "running_mean", "running_var"), (1, 0, 0, 1), strict=True
    ):
        np.testing.assert_array_equal(vec(state[key]), value, err_msg=key)
        assert state[key].shape == (1, C, 1, 1) and state[key].dtype == F32


def test_resets_on_modules_without_those_entries() -> None:
    bn = make(affine=False, track_running_stats=False)
    bn.reset_running_stats()
    bn.reset_parameters()
    assert bn.state_dict() == {}


def test_set_training_switches_between_batch_and_running_stats() -> None:
    bn = make()
    rm, rv = with_running_stats(bn)
    x = data((4, C, 3, 5), seed=12)
    bn.set_training(False)
    assert not bn.training
    assert_y_close(forward(bn, x), ref.forward(x, rm, rv, 1e-5))
    bn.set_training(True)
    assert bn.training
    assert_y_close(forward(bn, x), ref.forward_batch(x, 1e-5))


# -- backward through the module ------------------------------------------------------------


@pytest.mark.parametrize("case", SHAPES)
def test_backward_in_training_uses_batch_statistics(case: str) -> None:
    kind, shape = SHAPES[case]
    bn = make(kind)
    w, _ = with_random_affine(bn)
    x, dy = data(shape, seed=13), data(shape, seed=14)
    _, saved = bn.forward(x, keep_for_backward=True)
    assert saved is not None
    grads = bn.backward(saved, dy)
    want_dx, want_dw, want_db = ref.backward_batch(x, dy, 1e-5, w)
    assert grads.grad_input.dtype == F32 and grads.grad_input.shape == shape
    np.testing.assert_allclose(grads.grad_input, want_dx, rtol=1e-5, atol=1e-5)
    for got, want in ((grads.grad_weight, want_dw), (grads.grad_bias, want_db)):
        assert got is not None and got.shape == (1, C, 1, 1) and got.dtype == F32
        np.testing.assert_allclose(vec(got), want, rtol=1e-5, atol=1e-5)


def test_backward_in_eval_uses_running_statistics() -> None:
    kind, shape = SHAPES["BatchNorm2d"]
    bn = make(kind)
    w, _ = with_random_affine(bn)
    rm, rv = with_running_stats(bn)
    bn.set_training(False)
    x, dy = data(shape, seed=15), data(shape, seed=16)
    _, saved = bn.forward(x, keep_for_backward=True)
    assert saved is not None
    grads = bn.backward(saved, dy)
    want_dx, want_dw, want_db = ref.backward_running(x, dy, rm, rv, 1e-5, w)
    np.testing.assert_allclose(grads.grad_input, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vec(grads.grad_weight), want_dw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vec(grads.grad_bias), want_db, rtol=1e-5, atol=1e-5)


def test_backward_uses_the_weight_of_its_forward() -> None:
    """A weight loaded between forward and backward must not leak into that backward."""
    kind, shape = SHAPES["BatchNorm2d"]
    bn = make(kind)
    w, _ = with_random_affine(bn)
    x, dy = data(shape, seed=17), data(shape, seed=18)
    _, saved = bn.forward(x, keep_for_backward=True)
    assert saved is not None
    with_random_affine(bn, seed=5)
    grads = bn.backward(saved, dy)
    np.testing.assert_allclose(
        grads.grad_input, ref.backward_batch(x, dy, 1e-5, w)[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "make_dy",
    [lambda x: x[:-1], lambda x: x.astype(F64), lambda x: x.reshape(x.shape[0], -1)],
    ids=["shape", "dtype", "rank"],
)
def test_backward_rejects_a_mismatched_grad_output(
    make_dy: Callable[[np.ndarray], np.ndarray],
) -> None:
    bn = make()
    x = data((4, C, 3, 5), seed=19)
    _, saved = bn.forward(x, keep_for_backward=True)
    assert saved is not None
    with pytest.raises(InvalidArgument):
        bn.backward(saved, make_dy(x))


# -- load_state_dict --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, C, 1, 1), (C,)])
@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_load_state_dict_accepts_both_shapes(shape: tuple[int, ...], dtype: np.dtype) -> None:
    bn = make()
    values = {
        "weight": np.array([0.5, 2.0, -1.0]),
        "bias": np.array([0.25, -3.0, 8.0]),
        "running_mean": np.array([1.0, -2.0, 0.125]),
        "running_var": np.array([0.5, 4.0, 0.0]),  # zero variance is allowed
    }
    bn.load_state_dict({k: v.astype(dtype).reshape(shape) for k, v in values.items()})
    state = bn.state_dict()
    for key, value in values.items():
        assert state[key].shape == (1, C, 1, 1) and state[key].dtype == F32
        np.testing.assert_array_equal(vec(state[key]), value, err_msg=key)


def test_load_state_dict_copies_its_input() -> None:
    bn = make()
    mean = np.array([1.0, 2.0, 3.0], F32)
    bn.load_state_dict({"running_mean": mean}, strict=False)
    mean[...] = 9
    np.testing.assert_array_equal(vec(bn.running_mean), [1, 2, 3])


def test_load_state_dict_non_strict_loads_a_subset() -> None:
    bn = make()
    bn.load_state_dict({"bias": np.full(C, 2.0)}, strict=False)
    np.testing.assert_array_equal(vec(bn.bias), 2)
    np.testing.assert_array_equal(vec(bn.weight), 1)


def good_state() -> dict[str, np.ndarray]:
    return {
        "weight": np.full((1, C, 1, 1), 2.0, F32),
        "bias": np.full((1, C, 1, 1), 3.0, F32),
        "running_mean": np.full((1, C, 1, 1), 4.0, F32),
        "running_var": np.full((1, C, 1, 1), 5.0, F32),
    }


def changed(**entries: object) -> dict[str, object]:
    state: dict[str, object] = dict(good_state())
    for key, value in entries.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


BAD_STATES = {
    "wrong-channel-count": changed(weight=np.ones((1, C + 1, 1, 1), F32)),
    "wrong-flat-length": changed(bias=np.zeros(C - 1, F32)),
    "wrong-rank": changed(running_mean=np.zeros((1, C, 1), F32)),
    "column-vector": changed(running_var=np.ones((C, 1), F32)),
    "unknown-key": changed(momentum=np.zeros(C, F32)),
    "missing-key-strict": changed(running_var=None),
    "nan": changed(weight=np.array([1.0, np.nan, 1.0], F32)),
    "inf": changed(running_mean=np.array([np.inf, 0.0, 0.0])),
    "overflows-float32": changed(bias=np.array([0.0, 1e300, 0.0])),
    "negative-running-var": changed(running_var=np.array([1.0, -1e-3, 1.0], F32)),
    "integer-dtype": changed(weight=np.ones(C, np.int64)),
}


# The float32 cast of the "overflows-float32" entry makes numpy warn.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("bad", BAD_STATES)
def test_load_state_dict_rejects_bad_state_and_changes_nothing(bad: str) -> None:
    """A rejected load is all-or-nothing: even the valid entries next to the bad one stay out."""
    bn = make()
    with_random_affine(bn)
    with_running_stats(bn)
    before = snapshot(bn)
    with pytest.raises(InvalidArgument):
        bn.load_state_dict(BAD_STATES[bad])  # type: ignore[arg-type]
    assert_unchanged(bn, before)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"affine": False}, "weight"), ({"track_running_stats": False}, "running_var")],
)
def test_load_state_dict_rejects_entries_the_module_does_not_have(
    kwargs: dict[str, bool], key: str
) -> None:
    bn = make(**kwargs)  # type: ignore[arg-type]
    before = snapshot(bn)
    with pytest.raises(InvalidArgument):
        bn.load_state_dict({key: np.ones(C, F32)}, strict=False)
    assert_unchanged(bn, before)


# -- configuration validation -----------------------------------------------------------------


BAD_CONFIGS: dict[str, dict[str, object]] = {
    "zero-features": {"num_features": 0},
    "negative-features": {"num_features": -3},
    "zero-eps": {"eps": 0.0},
    "negative-eps": {"eps": -1e-5},
    "nan-eps": {"eps": float("nan")},
    "momentum-below-0": {"momentum": -0.1},
    "momentum-above-1": {"momentum": 1.5},
    "nan-momentum": {"momentum": float("nan")},
    "freeze-without-running-stats": {"freeze": True, "track_running_stats": False},
    "sync-spec-on-plain-module": {"sync": SyncSpec("g", 0, 1)},
}


@pytest.mark.parametrize("bad", BAD_CONFIGS)
def test_invalid_config_is_rejected(bad: str) -> None:
    kwargs: dict[str, object] = {"num_features": C, **BAD_CONFIGS[bad]}
    config = ModuleConfig(Kind.BATCH_NORM_2D, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        config.validate()
    with pytest.raises(InvalidArgument):
        BatchNorm(config)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_bounds_are_valid(momentum: float) -> None:
    ModuleConfig(Kind.BATCH_NORM_1D, C, momentum=momentum).validate()


# -- corrections to the reference (docs/design.md, Semantics) --------------------------------------


@pytest.mark.parametrize(
    ("kind", "shape"),
    [
        (Kind.BATCH_NORM_1D, (1, C)),
        (Kind.BATCH_NORM_1D, (1, C, 1)),
        (Kind.BATCH_NORM_2D, (1, C, 1, 1)),
    ],
)
@pytest.mark.parametrize("track", [True, False])
def test_training_batch_of_one_value_per_channel_is_rejected(
    kind: Kind, shape: tuple[int, ...], track: bool
) -> None:
    """n = 1 would make the unbiased running_var 0/0 = NaN (MegEngine's failure).

    Rejected without running stats too (as PyTorch does in training): the batch
    variance of one value is meaningless. That case also proves the check is made
    on the batch, not only on the running stats it would produce.
    """
    bn = make(kind, track_running_stats=track)
    with_random_affine(bn)
    before = snapshot(bn)
    with pytest.raises(InvalidArgument):
        bn.forward(data(shape, seed=21))
    assert_unchanged(bn, before)


@pytest.mark.parametrize(
    ("kind", "shape"), [(Kind.BATCH_NORM_1D, (1, C)), (Kind.BATCH_NORM_2D, (1, C, 1, 1))]
)
def test_eval_batch_of_one_uses_running_stats(kind: Kind, shape: tuple[int, ...]) -> None:
    bn = make(kind)
    w, b = with_random_affine(bn)
    rm, rv = with_running_stats(bn)
    bn.set_training(False)
    before = snapshot(bn)
    x = data(shape, seed=22)
    assert_y_close(forward(bn, x), ref.forward(x, rm, rv, 1e-5, w, b))
    assert_unchanged(bn, before)


def test_training_batch_of_one_with_spatial_extent_is_fine() -> None:
    bn = make(Kind.BATCH_NORM_1D)
    model = ref.RefBatchNorm(C)
    x = data((1, C, 7), seed=23)
    assert_y_close(forward(bn, x), model.forward(x, training=True))
    assert_running_close(bn, model)


# numpy warns while the kernel computes the statistics that reveal the bad value.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("case", SHAPES)
@pytest.mark.parametrize("track", [True, False])
def test_training_batch_with_non_finite_value_is_rejected(
    case: str, bad_value: float, track: bool
) -> None:
    """One bad element would poison that channel's running stats for good.

    Without running stats the batch is rejected all the same (the contract: training
    rejects it), which checks the batch statistics themselves are inspected.
    """
    kind, shape = SHAPES[case]
    bn = make(kind, track_running_stats=track)
    with_random_affine(bn)
    if track:
        with_running_stats(bn)
    x = data(shape, seed=24)
    x[(0, 1) + (0,) * (len(shape) - 2)] = bad_value
    before = snapshot(bn)
    with pytest.raises(InvalidArgument):
        bn.forward(x)
    assert_unchanged(bn, before)


# numpy warns while the kernel computes the statistics that reveal the bad value.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_opposite_infinities_are_rejected() -> None:
    """+inf and -inf in one channel: a mean of NaN, not of inf."""
    bn = make(Kind.BATCH_NORM_1D)
    x = data((8, C), seed=25)
    x[0, 2], x[1, 2] = np.inf, -np.inf
    before = snapshot(bn)
    with pytest.raises(InvalidArgument):
        bn.forward(x)
    assert_unchanged(bn, before)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_finite_batch_never_leaves_unloadable_running_stats() -> None:
    """Running stats are float32: a finite float32 batch whose variance exceeds float32's
    range (std ~1e20, var ~1e40) must not turn running_var into inf. Either the batch is
    rejected with nothing changed, or the stats stay finite; in both cases the module's
    own state_dict must load back (load_state_dict refuses non-finite entries)."""
    bn = make(Kind.BATCH_NORM_1D)
    x = (1e20 * np.random.default_rng(28).standard_normal((8, C))).astype(F32)
    assert np.isfinite(x).all()
    before = snapshot(bn)
    try:
        forward(bn, x)
    except InvalidArgument:
        assert_unchanged(bn, before)
    assert np.isfinite(vec(bn.running_var)).all(), f"running_var = {vec(bn.running_var)}"
    bn.load_state_dict(bn.state_dict())


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    ("kind", "shape"),
    [
        (Kind.BATCH_NORM_2D, (4, C + 1, 3, 3)),  # wrong channel count
        (Kind.BATCH_NORM_1D, (8, C - 1)),
        (Kind.BATCH_NORM_1D, (8, C + 2, 5)),
        (Kind.BATCH_NORM_2D, (4, C, 9)),  # wrong rank
        (Kind.BATCH_NORM_2D, (4, C)),
        (Kind.BATCH_NORM_1D, (4, C, 3, 3)),
        (Kind.BATCH_NORM_1D, (C,)),
        (Kind.BATCH_NORM_2D, (2, C, 3, 3, 3)),
    ],
)
def test_wrong_channels_or_rank_is_rejected(
    kind: Kind, shape: tuple[int, ...], training: bool
) -> None:
    bn = make(kind)
    bn.set_training(training)
    before = snapshot(bn)
    x = np.random.default_rng(26).standard_normal(shape).astype(F32)
    with pytest.raises(InvalidArgument):
        bn.forward(x)
    assert_unchanged(bn, before)


@pytest.mark.parametrize("dtype", [np.int32, np.complex64])
def test_non_float_input_is_rejected(dtype: type) -> None:
    bn = make()
    before = snapshot(bn)
    with pytest.raises(InvalidArgument):
        bn.forward(np.ones((4, C, 2, 2), dtype))
    assert_unchanged(bn, before)


# -- thread safety -------------------------------------------------------------------------------


def test_concurrent_training_forwards_lose_no_update() -> None:
    """8 threads x 20 forwards of one batch == 160 sequential updates, bit for bit.

    momentum 0.99 keeps each update visible in float32 (0.99**160 ~ 0.2): with the
    default 0.9 the stats would converge and a lost update could go unnoticed.
    """
    threads, steps = 8, 20
    # Many channels: numpy releases the GIL on long vectors, so unsynchronized
    # read-modify-write of the running stats would really interleave.
    channels = 1 << 14
    x = data((4, channels, 2, 2), seed=27)
    shared = make(Kind.BATCH_NORM_2D, channels, momentum=0.99)
    sequential = make(Kind.BATCH_NORM_2D, channels, momentum=0.99)
    for _ in range(threads * steps - 1):
        forward(sequential, x)
    one_short = sequential.state_dict()
    expected_y = forward(sequential, x)
    # The test can tell 159 updates from 160.
    assert not np.array_equal(one_short["running_var"], sequential.state_dict()["running_var"])

    barrier = threading.Barrier(threads)
    outputs: list[np.ndarray] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            for _ in range(steps):
                outputs.append(forward(shared, x))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors
    assert len(outputs) == threads * steps
    for y in outputs:  # batch statistics do not depend on the running ones
        np.testing.assert_array_equal(y, expected_y)
    for key, value in sequential.state_dict().items():
        np.testing.assert_array_equal(shared.state_dict()[key], value, err_msg=key)
