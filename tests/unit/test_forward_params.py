"""A forward's own weight, bias and mode; momentum None; num_batches_tracked; BatchNorm3d.

The module in process (no gRPC), against float64 numpy formulas.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bnserver.core.config import Kind, ModuleConfig, SyncSpec
from bnserver.engine import Engine
from bnserver.errors import InvalidArgument
from bnserver.rpc import codec
from bnserver.state.batchnorm import BatchNorm, CallParams, Record
from bnserver.state.persistence import StateDir
from bnserver.state.registry import ModuleKey, Registry
from bnservice.v1 import bnservice_pb2 as pb

C = 3


def x_of(seed: int, shape: tuple[int, ...] = (6, C, 2, 2)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2 + seed).astype(np.float32)


def normalized(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    axes = (0, *range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axes), x64.var(axes)
    y = (x64 - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5)
    return y * w.reshape(shape) + b.reshape(shape)


def test_a_forward_uses_its_own_weight_bias_and_mode_and_stores_them() -> None:
    bn = BatchNorm(ModuleConfig(Kind.BATCH_NORM_2D, C))
    w, b = np.array([0.5, 2.0, 3.0]), np.array([1.0, -1.0, 0.25])
    x = x_of(0)
    y, _ = bn.forward(x, params=CallParams(w, b, True))
    np.testing.assert_allclose(y, normalized(x, w, b), rtol=1e-5, atol=1e-5)
    assert np.array_equal(bn.weight, w.astype(np.float32))
    assert np.array_equal(bn.bias, b.astype(np.float32))
    assert bn.num_batches_tracked == 1
    # Eval brought by the forward itself: running statistics, nothing updated, mode stored.
    running = bn.running_stats()
    bn.forward(x, params=CallParams(training=False))
    assert not bn.training and bn.num_batches_tracked == 1
    assert all(np.array_equal(v, bn.running_stats()[k]) for k, v in running.items())
    # The mode of a forward is its own: the stored one changes only with it.
    bn.forward(x, params=CallParams(training=True))
    assert bn.training and bn.num_batches_tracked == 2


def test_a_failed_forward_stores_none_of_its_parameters() -> None:
    bn = BatchNorm(ModuleConfig(Kind.BATCH_NORM_2D, C))
    bn.set_training(False)
    one_value = x_of(1, (1, C, 1, 1))  # n = 1: refused in training
    with pytest.raises(InvalidArgument, match="more than 1 value"):
        bn.forward(one_value, params=CallParams(np.full(C, 3.0), np.zeros(C), True))
    assert not bn.training
    assert np.array_equal(bn.weight, np.ones(C, np.float32)) and bn.num_batches_tracked == 0


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (CallParams(np.ones(C), None), "together"),
        (CallParams(np.ones(C + 1), np.zeros(C + 1)), "3 values"),
        (CallParams(np.array([1.0, np.nan, 1.0]), np.zeros(C)), "non-finite"),
    ],
)
def test_bad_forward_parameters_are_refused(params: CallParams, match: str) -> None:
    bn = BatchNorm(ModuleConfig(Kind.BATCH_NORM_2D, C))
    with pytest.raises(InvalidArgument, match=match):
        bn.forward(x_of(2), params=params)
    assert bn.num_batches_tracked == 0
    affine_off = BatchNorm(ModuleConfig(Kind.BATCH_NORM_2D, C, affine=False))
    with pytest.raises(InvalidArgument, match="affine=False"):
        affine_off.forward(x_of(2), params=CallParams(np.ones(C), np.zeros(C)))


def test_momentum_none_is_the_cumulative_average_of_every_batch() -> None:
    bn = BatchNorm(ModuleConfig(Kind.BATCH_NORM_2D, C, momentum=None))
    xs = [x_of(seed) for seed in range(4)]
    for x in xs:
        bn.forward(x)
    axes = (0, 2, 3)
    n = xs[0].size // C
    means = [x.astype(np.float64).mean(axes) for x in xs]
    variances = [x.astype(np.float64).var(axes) * n / (n - 1) for x in xs]
    # PyTorch: running = (1 - 1/k) * running + (1/k) * batch; from zeros the first
    # batch replaces the initial values, so the result is the plain average.
    np.testing.assert_allclose(bn.running_mean, np.mean(means, axis=0), rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, np.mean(variances, axis=0), rtol=1e-6)
    assert bn.num_batches_tracked == 4


def test_momentum_none_continues_from_a_loaded_count() -> None:
    bn = BatchNorm(ModuleConfig(Kind.BATCH_NORM_1D, C, momentum=None))
    bn.load_state_dict(
        {"running_mean": np.full(C, 2.0), "num_batches_tracked": np.array(3)}, strict=False
    )
    x = x_of(5, (8, C))
    bn.forward(x)
    want = 2.0 * 3 / 4 + x.astype(np.float64).mean(0) / 4
    np.testing.assert_allclose(bn.running_mean, want, rtol=1e-6)
    assert bn.num_batches_tracked == 4


@pytest.mark.parametrize(
    ("value", "match"), [(np.array(-1), ">= 0"), (np.array(1.5), "integer"), (np.ones(2), "one")]
)
def test_num_batches_tracked_must_be_a_count(value: np.ndarray, match: str) -> None:
    bn = BatchNorm(ModuleConfig(Kind.BATCH_NORM_1D, C))
    with pytest.raises(InvalidArgument, match=match):
        bn.load_state_dict({"running_mean": np.ones(C), "num_batches_tracked": value}, False)
    assert np.array_equal(bn.running_mean, np.zeros(C, np.float32))


def test_num_batches_tracked_is_refused_without_running_stats() -> None:
    bn = BatchNorm(ModuleConfig(Kind.BATCH_NORM_1D, C, track_running_stats=False))
    with pytest.raises(InvalidArgument, match="num_batches_tracked"):
        bn.load_state_dict({"num_batches_tracked": np.array(1)}, strict=False)


def test_batch_norm_3d_takes_5d_input_only_and_sync_takes_2d_to_5d() -> None:
    bn3 = BatchNorm(ModuleConfig(Kind.BATCH_NORM_3D, C))
    x = x_of(3, (2, C, 3, 2, 2))
    y, _ = bn3.forward(x)
    np.testing.assert_allclose(y, normalized(x, np.ones(C), np.zeros(C)), atol=1e-5)
    with pytest.raises(InvalidArgument, match="5D"):
        bn3.forward(x_of(3))
    sync = BatchNorm(ModuleConfig(Kind.SYNC_BATCH_NORM, C, sync=SyncSpec("g", 0, 1)))
    for shape in ((5, C), (2, C, 3), (2, C, 2, 2), (2, C, 2, 2, 2)):
        sync.forward(x_of(4, shape))
    assert sync.num_batches_tracked == 4


def test_config_codec_and_state_files_keep_momentum_none_and_the_3d_kind(tmp_path: Path) -> None:
    config = ModuleConfig(Kind.BATCH_NORM_3D, C, momentum=None)
    msg = pb.ModuleConfig()
    codec.config_to_pb(config, msg)
    assert msg.cumulative_average and msg.kind == pb.MODULE_KIND_BATCH_NORM_3D
    assert codec.config_from_pb(msg) == config
    registry = Registry()
    module, _ = registry.get_or_create(ModuleKey("m"), config)
    module.forward(x_of(6, (2, C, 2, 2, 2)))
    StateDir(tmp_path, registry).write_published(ModuleKey("m"), module)
    restored = Registry()
    assert StateDir(tmp_path, restored).load() == 1
    again = restored.get(ModuleKey("m"))
    assert again.config == config and again.num_batches_tracked == 1


def test_engine_state_names_entries_and_carries_the_count() -> None:
    engine = Engine()
    key = ModuleKey("m")
    engine.create(key, ModuleConfig(Kind.BATCH_NORM_1D, C))
    engine.forward(key, x_of(7, (4, C)))
    state = engine.state(key)
    assert list(state) == [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ]
    assert int(state["num_batches_tracked"]) == 1
    assert list(engine.state(key, ("running_var",))) == ["running_var"]
    with pytest.raises(InvalidArgument, match="unknown state entries"):
        engine.state(key, ("momentum",))
    msg = codec.state_to_pb(state)
    assert msg.num_batches_tracked == 1
    assert int(codec.state_from_pb(msg)["num_batches_tracked"]) == 1


def test_a_mode_brought_by_a_forward_is_durable_and_parameters_are_snapshotted() -> None:
    calls: list[str] = []

    class Recorder:
        always = False

        def write(self, key: ModuleKey, record: Record, module: BatchNorm | None = None) -> None:
            calls.append("changed")

        def trained(self, key: ModuleKey, module: BatchNorm) -> None:
            calls.append("trained")

        def delete(self, key: ModuleKey, unpublish: Callable[[], None]) -> None:
            calls.append("deleted")

    engine = Engine()
    key = ModuleKey("m")
    engine.create(key, ModuleConfig(Kind.BATCH_NORM_1D, C))
    engine.persistence = Recorder()
    x = x_of(8, (4, C))
    engine.forward(key, x, params=CallParams(training=False))  # a mode change
    engine.forward(key, x, params=CallParams(training=False))  # the same mode: nothing
    engine.forward(key, x, params=CallParams(np.ones(C), np.zeros(C), False))  # parameters
    # A mode change that trains: the mode is written (with the update) before the reply,
    # and the update is also marked for the next snapshot.
    engine.forward(key, x, params=CallParams(training=True))
    assert calls == ["changed", "trained", "changed", "trained"]
