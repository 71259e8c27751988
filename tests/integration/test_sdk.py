"""The SDK surface of the README's SDK section, driven against a real `bnserver serve` process.

Every expected value is computed here from the formulas of docs/design.md, Semantics
in float64 numpy, independently of the server's kernel.
"""

from __future__ import annotations

import numpy as np
import pytest

import bnclient
from bnclient import Client

EPS = 1e-5
KINDS = ("1d", "2d")
#: An input shape per module kind (BatchNorm1d also takes (N, C)).
SHAPES: dict[str, list[tuple[int, ...]]] = {"1d": [(16, 5), (4, 5, 7)], "2d": [(4, 5, 3, 6)]}


def make(client: Client, kind: str, name: str, num_features: int, **kwargs):
    factory = client.batch_norm_1d if kind == "1d" else client.batch_norm_2d
    return factory(name, num_features, **kwargs)


def axes(x: np.ndarray) -> tuple[int, ...]:
    return (0, *range(2, x.ndim))


def per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """A (C,) or (1, C, 1, 1) vector as float64, broadcastable against an ndim-D input."""
    v = np.asarray(v, np.float64).reshape(-1)
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def batch_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, biased var, n) per channel, float64."""
    x64 = x.astype(np.float64)
    n = x.size // x.shape[1]
    mean = x64.mean(axis=axes(x))
    var = ((x64 - per_channel(mean, x.ndim)) ** 2).mean(axis=axes(x))
    return mean, var, n


def ref_normalize(x, mean, var, weight=None, bias=None, eps=EPS) -> np.ndarray:
    """float64 (x - mean) / sqrt(var + eps) * weight + bias."""
    d = x.ndim
    y = (x.astype(np.float64) - per_channel(mean, d)) / np.sqrt(per_channel(var, d) + eps)
    if weight is not None:
        y = y * per_channel(weight, d) + per_channel(bias, d)
    return y


def ref_running(running_mean, running_var, x, momentum=0.9):
    """One running-statistics update (MegEngine momentum), float64."""
    mean, var, n = batch_stats(x)
    rm = momentum * np.asarray(running_mean, np.float64).reshape(-1) + (1 - momentum) * mean
    rv = momentum * np.asarray(running_var, np.float64).reshape(-1) + (1 - momentum) * var * n / (
        n - 1
    )
    return rm, rv


def random_state(rng: np.random.Generator, c: int) -> dict[str, np.ndarray]:
    return {
        "weight": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "bias": rng.uniform(-1.0, 1.0, c).astype(np.float32),
        "running_mean": rng.uniform(-2.0, 2.0, c).astype(np.float32),
        "running_var": rng.uniform(0.5, 3.0, c).astype(np.float32),
    }


def sample(rng: np.random.Generator, shape, dtype=np.float32) -> np.ndarray:
    """Data with per-channel offsets and scales, so every channel's statistics differ."""
    c = shape[1]
    loc = per_channel(np.linspace(-3.0, 4.0, c), len(shape))
    scale = per_channel(np.linspace(0.5, 2.5, c), len(shape))
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def close(actual, expected, tol=1e-5) -> None:
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol)


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert np.array_equal(a[key], b[key]), key


# -- get-or-create --------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_get_or_create_returns_the_existing_module(client, name, kind) -> None:
    first = make(client, kind, name, 5)
    loaded = random_state(np.random.default_rng(1), 5)
    first.load_state_dict(loaded)
    first.eval()

    second = make(client, kind, name, 5, eps=1e-5, momentum=0.9, affine=True)
    assert type(second) is type(first)
    assert second.num_features == 5 and second.eps == 1e-5 and second.momentum == 0.9
    assert not second.training
    for key, value in loaded.items():
        assert np.array_equal(second.state_dict()[key].reshape(-1), value), key

    second.train()
    assert first.training
    assert [m.name for m in client.list_modules()].count(name) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_create_reports_the_config(client, name, kind) -> None:
    bn = make(client, kind, name, 7, eps=1e-3, momentum=0.5, affine=False)
    expected_cls = bnclient.BatchNorm1d if kind == "1d" else bnclient.BatchNorm2d
    assert isinstance(bn, expected_cls)
    assert (bn.name, bn.num_features, bn.eps, bn.momentum) == (name, 7, 1e-3, 0.5)
    assert (bn.affine, bn.track_running_stats, bn.freeze) == (False, True, False)
    assert bn.training  # new modules train, as in MegEngine and PyTorch


# -- forward --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_output_has_input_shape_and_dtype(client, name, kind, dtype) -> None:
    bn = make(client, kind, name, 5)
    rng = np.random.default_rng(2)
    tol = {np.float16: 5e-3, np.float32: 1e-5, np.float64: 1e-10}[dtype]
    for shape in SHAPES[kind]:
        x = sample(rng, shape, dtype)
        y = bn(x)
        assert isinstance(y, np.ndarray)
        assert y.shape == x.shape and y.dtype == x.dtype
        mean, var, _ = batch_stats(x)
        np.testing.assert_allclose(y.astype(np.float64), ref_normalize(x, mean, var), atol=tol)


@pytest.mark.parametrize("kind", KINDS)
def test_training_forward_matches_float64_reference(client, name, kind) -> None:
    rng = np.random.default_rng(3)
    bn = make(client, kind, name, 5, momentum=0.8)
    state = random_state(rng, 5)
    bn.load_state_dict(state)
    rm, rv = state["running_mean"], state["running_var"]
    for shape in SHAPES[kind]:
        x = sample(rng, shape)
        x_before = x.copy()
        y = bn(x)
        mean, var, _ = batch_stats(x)
        close(y, ref_normalize(x, mean, var, state["weight"], state["bias"]))
        rm, rv = ref_running(rm, rv, x, momentum=0.8)
        after = bn.state_dict()
        close(after["running_mean"].reshape(-1), rm, 1e-6)
        close(after["running_var"].reshape(-1), rv, 1e-6)
        assert np.array_equal(x, x_before)
    # parameters are not touched by a forward
    assert np.array_equal(bn.weight.reshape(-1), state["weight"])
    assert np.array_equal(bn.bias.reshape(-1), state["bias"])


@pytest.mark.parametrize("kind", KINDS)
def test_eval_forward_uses_running_stats_and_updates_nothing(client, name, kind) -> None:
    rng = np.random.default_rng(4)
    bn = make(client, kind, name, 5)
    state = random_state(rng, 5)
    bn.load_state_dict(state)
    bn.eval()
    before = bn.state_dict()
    for shape in SHAPES[kind]:
        x = sample(rng, shape)
        expected = ref_normalize(
            x, state["running_mean"], state["running_var"], state["weight"], state["bias"]
        )
        close(bn(x), expected)
    # n = 1 is fine when the running statistics are used
    x1 = sample(rng, (1, 5) if kind == "1d" else (1, 5, 1, 1))
    close(bn(x1), ref_normalize(x1, state["running_mean"], state["running_var"], **_wb(state)))
    assert_state_equal(bn.state_dict(), before)


def _wb(state):
    return {"weight": state["weight"], "bias": state["bias"]}


def test_input_layout_and_byte_order_do_not_matter(client, name) -> None:
    bn = make(client, "2d", name, 4)
    bn.eval()
    bn.load_state_dict(random_state(np.random.default_rng(5), 4))
    x = sample(np.random.default_rng(6), (3, 4, 5, 6))
    y = bn(x)
    assert np.array_equal(bn(np.asfortranarray(x)), y)
    assert np.array_equal(bn(x.astype(">f4")), y)
    strided = np.zeros((3, 4, 5, 12), np.float32)
    strided[..., ::2] = x
    assert np.array_equal(bn(strided[..., ::2]), y)
    assert np.array_equal(bn(x.tolist()), bn(x.astype(np.float64)))


def test_batch_norm_1d_freeze_on_2d_input(client, name) -> None:
    """freeze normalizes with the running stats even in training, and updates nothing."""
    rng = np.random.default_rng(7)
    bn = make(client, "1d", name, 6, freeze=True)
    state = random_state(rng, 6)
    bn.load_state_dict(state)
    assert bn.training
    for shape in [(9, 6), (3, 6, 4)]:
        x = sample(rng, shape)
        y, vjp = bn.vjp(x)
        assert y.shape == x.shape
        close(y, ref_normalize(x, state["running_mean"], state["running_var"], **_wb(state)))
        dy = rng.standard_normal(shape).astype(np.float32)
        dx, dweight, dbias = vjp(dy)
        gain = per_channel(state["weight"], x.ndim) / np.sqrt(
            per_channel(state["running_var"], x.ndim) + EPS
        )
        close(dx, dy * gain)
        assert dweight is None and dbias is None
    for key, value in state.items():
        assert np.array_equal(bn.state_dict()[key].reshape(-1), value), key


# -- mode -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_mode_lives_on_the_server(client, server, name, kind) -> None:
    bn = make(client, kind, name, 3)
    assert bn.training is True
    assert bn.eval() is bn
    assert bn.training is False
    with Client(server.address) as other:
        remote = make(other, kind, name, 3)
        assert remote.training is False
        (listed,) = [m for m in other.list_modules() if m.name == name]
        assert listed.training is False
        remote.train()
    assert bn.training is True
    assert bn.train(False) is bn
    assert bn.training is False
    assert bn.train() is bn
    assert bn.training is True


def test_mode_selects_the_statistics(client, name) -> None:
    rng = np.random.default_rng(8)
    bn = make(client, "2d", name, 3)
    state = random_state(rng, 3)
    bn.load_state_dict(state)
    x = sample(rng, (4, 3, 2, 2))
    mean, var, _ = batch_stats(x)
    bn.eval()
    close(bn(x), ref_normalize(x, state["running_mean"], state["running_var"], **_wb(state)))
    bn.train()
    close(bn(x), ref_normalize(x, mean, var, **_wb(state)))


# -- state ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_default_state_shapes_and_values(client, name, kind) -> None:
    bn = make(client, kind, name, 4)
    expected = {
        "weight": np.ones((1, 4, 1, 1), np.float32),
        "bias": np.zeros((1, 4, 1, 1), np.float32),
        "running_mean": np.zeros((1, 4, 1, 1), np.float32),
        "running_var": np.ones((1, 4, 1, 1), np.float32),
    }
    for key, value in expected.items():
        got = getattr(bn, key)
        assert isinstance(got, np.ndarray), key
        assert got.dtype == np.float32 and got.shape == (1, 4, 1, 1), key
        assert np.array_equal(got, value), key
    state = bn.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var"]
    assert_state_equal(state, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_affine_false_has_no_parameters(client, name, kind) -> None:
    rng = np.random.default_rng(9)
    bn = make(client, kind, name, 4, affine=False)
    assert bn.weight is None and bn.bias is None
    assert bn.running_mean.shape == (1, 4, 1, 1)
    assert set(bn.state_dict()) == {"running_mean", "running_var"}
    x = sample(rng, (*SHAPES[kind][0][:1], 4, *SHAPES[kind][0][2:]))
    mean, var, _ = batch_stats(x)
    close(bn(x), ref_normalize(x, mean, var))
    bn.reset_parameters()
    assert bn.weight is None and bn.bias is None
    assert np.array_equal(bn.running_var, np.ones((1, 4, 1, 1), np.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_without_running_stats_eval_uses_batch_stats(client, name, kind) -> None:
    rng = np.random.default_rng(10)
    bn = make(client, kind, name, 4, track_running_stats=False)
    assert bn.running_mean is None and bn.running_var is None
    assert set(bn.state_dict()) == {"weight", "bias"}
    wb = {"weight": rng.uniform(0.5, 2, 4), "bias": rng.uniform(-1, 1, 4)}
    bn.load_state_dict(wb)
    bn.eval()
    x = sample(rng, (*SHAPES[kind][-1][:1], 4, *SHAPES[kind][-1][2:]))
    mean, var, _ = batch_stats(x)
    close(bn(x), ref_normalize(x, mean, var, wb["weight"], wb["bias"]))
    after = bn.state_dict()
    assert set(after) == {"weight", "bias"}
    close(after["weight"].reshape(-1), wb["weight"], 1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_dict_round_trips_both_shapes(client, name, kind) -> None:
    rng = np.random.default_rng(11)
    bn = make(client, kind, name, 6)
    flat = random_state(rng, 6)
    bn.load_state_dict(flat)  # (C,) float32
    got = bn.state_dict()
    for key, value in flat.items():
        assert got[key].shape == (1, 6, 1, 1) and got[key].dtype == np.float32
        assert np.array_equal(got[key].reshape(-1), value), key

    shaped = {k: v.reshape(1, 6, 1, 1).astype(np.float64) * 1.5 for k, v in flat.items()}
    bn.load_state_dict(shaped)  # (1, C, 1, 1) float64: stored as float32
    got = bn.state_dict()
    for key, value in shaped.items():
        assert got[key].dtype == np.float32
        assert np.array_equal(got[key], value.astype(np.float32)), key
    assert np.array_equal(bn.running_var, shaped["running_var"].astype(np.float32))

    # the state_dict of one module loads into another and gives identical outputs
    other = make(client, kind, name + ".copy", 6)
    other.load_state_dict(bn.state_dict())
    assert_state_equal(other.state_dict(), bn.state_dict())
    bn.eval()
    other.eval()
    x = sample(rng, (*SHAPES[kind][0][:1], 6, *SHAPES[kind][0][2:]))
    assert np.array_equal(bn(x), other(x))
    client.delete_module(name + ".copy")


def test_state_dict_is_a_copy(client, name) -> None:
    bn = make(client, "2d", name, 3)
    state = bn.state_dict()
    state["weight"][...] = 7.0
    assert np.array_equal(bn.weight, np.ones((1, 3, 1, 1), np.float32))


def test_load_state_dict_non_strict_loads_a_subset(client, name) -> None:
    bn = make(client, "2d", name, 3)
    bn.load_state_dict({"bias": np.full(3, 0.25, np.float32)}, strict=False)
    assert np.array_equal(bn.bias, np.full((1, 3, 1, 1), 0.25, np.float32))
    assert np.array_equal(bn.weight, np.ones((1, 3, 1, 1), np.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_reset_running_stats_and_reset_parameters(client, name, kind) -> None:
    rng = np.random.default_rng(12)
    bn = make(client, kind, name, 4)
    state = random_state(rng, 4)
    bn.load_state_dict(state)
    bn(sample(rng, (*SHAPES[kind][0][:1], 4, *SHAPES[kind][0][2:])))
    assert not np.array_equal(bn.running_mean, np.zeros((1, 4, 1, 1), np.float32))

    bn.reset_running_stats()
    assert np.array_equal(bn.running_mean, np.zeros((1, 4, 1, 1), np.float32))
    assert np.array_equal(bn.running_var, np.ones((1, 4, 1, 1), np.float32))
    assert np.array_equal(bn.weight.reshape(-1), state["weight"])
    assert np.array_equal(bn.bias.reshape(-1), state["bias"])

    bn.load_state_dict(state)
    bn.reset_parameters()
    assert_state_equal(
        bn.state_dict(),
        {
            "weight": np.ones((1, 4, 1, 1), np.float32),
            "bias": np.zeros((1, 4, 1, 1), np.float32),
            "running_mean": np.zeros((1, 4, 1, 1), np.float32),
            "running_var": np.ones((1, 4, 1, 1), np.float32),
        },
    )
    assert bn.training  # resets do not change the mode


# -- vjp ------------------------------------------------------------------------


def ref_batch_grads(x, dy, weight, eps=EPS):
    """dx, dweight, dbias of training-mode batch norm (docs/design.md, Semantics), float64."""
    d = x.ndim
    mean, var, _ = batch_stats(x)
    inv = 1.0 / np.sqrt(per_channel(var, d) + eps)
    xhat = (x.astype(np.float64) - per_channel(mean, d)) * inv
    dy64 = dy.astype(np.float64)
    dbias = dy64.sum(axis=axes(x))
    dweight = (dy64 * xhat).sum(axis=axes(x))
    mean_dy = dy64.mean(axis=axes(x), keepdims=True)
    mean_dy_xhat = (dy64 * xhat).mean(axis=axes(x), keepdims=True)
    w = 1.0 if weight is None else per_channel(weight, d)
    dx = w * inv * (dy64 - mean_dy - xhat * mean_dy_xhat)
    return dx, dweight, dbias


@pytest.mark.parametrize("kind", KINDS)
def test_vjp_in_training_matches_formulas(client, name, kind) -> None:
    rng = np.random.default_rng(13)
    bn = make(client, kind, name, 5)
    state = random_state(rng, 5)
    bn.load_state_dict(state)
    rm, rv = state["running_mean"], state["running_var"]
    for shape in SHAPES[kind]:
        x = sample(rng, shape)
        dy = (rng.standard_normal(shape) * 0.5 + 0.2).astype(np.float32)
        y, vjp = bn.vjp(x)
        mean, var, _ = batch_stats(x)
        close(y, ref_normalize(x, mean, var, **_wb(state)))
        dx, dweight, dbias = vjp(dy)
        ref_dx, ref_dw, ref_db = ref_batch_grads(x, dy, state["weight"])
        assert dx.shape == x.shape and dx.dtype == np.float32
        assert dweight.shape == (1, 5, 1, 1) and dweight.dtype == np.float32
        assert dbias.shape == (1, 5, 1, 1) and dbias.dtype == np.float32
        close(dx, ref_dx)
        close(dweight.reshape(-1), ref_dw, 1e-4)
        close(dbias.reshape(-1), ref_db, 1e-4)
        # a vjp forward trains like a plain forward
        rm, rv = ref_running(rm, rv, x)
        close(bn.running_mean.reshape(-1), rm, 1e-6)
        close(bn.running_var.reshape(-1), rv, 1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_vjp_keeps_the_input_dtype(client, name, dtype) -> None:
    rng = np.random.default_rng(14)
    bn = make(client, "2d", name, 3)
    x = sample(rng, (4, 3, 2, 3), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, vjp = bn.vjp(x)
    dx, dweight, dbias = vjp(dy)
    assert y.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape
    assert dweight.dtype == np.float32 and dbias.dtype == np.float32
    tol = 1e-2 if dtype == np.float16 else 1e-10
    ref_dx, _, ref_db = ref_batch_grads(x, dy, None)
    np.testing.assert_allclose(dx.astype(np.float64), ref_dx, atol=tol, rtol=tol)
    np.testing.assert_allclose(dbias.reshape(-1), ref_db, atol=tol, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_vjp_in_eval_uses_running_stats(client, name, kind) -> None:
    rng = np.random.default_rng(15)
    bn = make(client, kind, name, 5)
    state = random_state(rng, 5)
    bn.load_state_dict(state)
    bn.eval()
    x = sample(rng, SHAPES[kind][-1])
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, vjp = bn.vjp(x)
    close(y, ref_normalize(x, state["running_mean"], state["running_var"], **_wb(state)))
    dx, dweight, dbias = vjp(dy)
    d = x.ndim
    inv = 1.0 / np.sqrt(per_channel(state["running_var"], d) + EPS)
    xhat = (x - per_channel(state["running_mean"], d)) * inv
    close(dx, dy * per_channel(state["weight"], d) * inv)
    close(dweight.reshape(-1), (dy * xhat).sum(axis=axes(x)), 1e-4)
    close(dbias.reshape(-1), dy.astype(np.float64).sum(axis=axes(x)), 1e-4)
    for key, value in state.items():
        assert np.array_equal(bn.state_dict()[key].reshape(-1), value), key


@pytest.mark.parametrize("kind", KINDS)
def test_vjp_without_affine_gives_no_parameter_gradients(client, name, kind) -> None:
    rng = np.random.default_rng(16)
    bn = make(client, kind, name, 5, affine=False)
    x = sample(rng, SHAPES[kind][0])
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, vjp = bn.vjp(x)
    dx, dweight, dbias = vjp(dy)
    assert dweight is None and dbias is None
    close(dx, ref_batch_grads(x, dy, None)[0])


def test_vjp_handles_are_independent(client, name) -> None:
    """Two forwards kept for backward, answered in reverse order, each with its own input."""
    rng = np.random.default_rng(17)
    bn = make(client, "2d", name, 3)
    xs = [sample(rng, (4, 3, 2, 2)), sample(rng, (2, 3, 3, 3)) * 3]
    vjps = [bn.vjp(x)[1] for x in xs]
    assert vjps[0].handle != vjps[1].handle
    for x, vjp in reversed(list(zip(xs, vjps, strict=True))):
        dy = rng.standard_normal(x.shape).astype(np.float32)
        dx, dweight, _ = vjp(dy)
        ref_dx, ref_dw, _ = ref_batch_grads(x, dy, None)
        close(dx, ref_dx)
        close(dweight.reshape(-1), ref_dw, 1e-4)


# -- listing, deleting, the client ----------------------------------------------


def test_list_modules_describes_each_module(client, name) -> None:
    client.batch_norm_1d(name + ".a", 3, eps=1e-3, momentum=0.7, affine=False)
    b = client.batch_norm_2d(name + ".b", 8, track_running_stats=False)
    b.eval()
    listed = {m.name: m for m in client.list_modules()}
    assert listed[name + ".a"] == bnclient.ModuleInfo(
        name=name + ".a",
        kind="BatchNorm1d",
        num_features=3,
        eps=1e-3,
        momentum=0.7,
        affine=False,
        track_running_stats=True,
        freeze=False,
        training=True,
    )
    assert listed[name + ".b"] == bnclient.ModuleInfo(
        name=name + ".b",
        kind="BatchNorm2d",
        num_features=8,
        eps=1e-5,
        momentum=0.9,
        affine=True,
        track_running_stats=False,
        freeze=False,
        training=False,
    )
    client.delete_module(name + ".a")
    client.delete_module(name + ".b")
    names = {m.name for m in client.list_modules()}
    assert name + ".a" not in names and name + ".b" not in names


def test_delete_module_forgets_everything(client, name) -> None:
    bn = make(client, "2d", name, 3)
    bn.load_state_dict(random_state(np.random.default_rng(18), 3))
    bn.eval()
    client.delete_module(name)
    assert name not in {m.name for m in client.list_modules()}
    with pytest.raises(bnclient.NotFoundError):
        bn.state_dict()
    # the name is free again, for any config, and starts from scratch
    again = make(client, "1d", name, 2, affine=False)
    assert again.training
    assert_state_equal(
        again.state_dict(),
        {
            "running_mean": np.zeros((1, 2, 1, 1), np.float32),
            "running_var": np.ones((1, 2, 1, 1), np.float32),
        },
    )
    client.delete_module(name)


def test_client_is_a_context_manager(server, name) -> None:
    with Client(server.address) as client:
        assert isinstance(client, Client)
        bn = client.batch_norm_2d(name, 2)
        bn.eval()
    with pytest.raises((ValueError, bnclient.ServiceError)):
        client.list_modules()  # the channel is closed
    # the module outlives the client that created it
    with Client(server.address) as other:
        assert other.batch_norm_2d(name, 2).training is False
        other.delete_module(name)


def test_modules_are_shared_between_clients(client, server, name) -> None:
    rng = np.random.default_rng(19)
    bn = make(client, "2d", name, 3)
    x = sample(rng, (4, 3, 2, 2))
    with Client(server.address) as other:
        make(other, "2d", name, 3)(x)
    rm, rv = ref_running(np.zeros(3), np.ones(3), x)
    close(bn.running_mean.reshape(-1), rm, 1e-6)
    close(bn.running_var.reshape(-1), rv, 1e-6)
