"""Error rows of the README's error table (those that need neither sync nor auth), end to end.

Every failure is checked for its SDK exception class, its `.code`, an
informative message, and for leaving the modules exactly as they were.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import bnclient
from bnclient import Client
from bnclient.errors import from_rpc_error
from bnserver.cli.processes import start_server
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
C = 3


# -- helpers --------------------------------------------------------------------


def snapshot(bn) -> tuple[dict[str, np.ndarray], bool]:
    return bn.state_dict(), bn.training


def assert_unchanged(bn, before: tuple[dict[str, np.ndarray], bool]) -> None:
    state, training = before
    now = bn.state_dict()
    assert now.keys() == state.keys()
    for key in state:
        assert now[key].dtype == state[key].dtype and now[key].shape == state[key].shape, key
        assert np.array_equal(now[key], state[key]), f"{key} changed by a failed call"
    assert bn.training is training


def expect(
    cls: type[bnclient.ServiceError], code: grpc.StatusCode, words: tuple[str, ...], call
) -> bnclient.ServiceError:
    """Run `call`; it must raise `cls` with `code` and a message containing one of `words`."""
    with pytest.raises(cls) as info:
        call()
    err = info.value
    assert isinstance(err, bnclient.ServiceError)
    assert err.code == code
    if code == INVALID:
        assert isinstance(err, ValueError)
    message = str(err).lower()
    assert any(w.lower() in message for w in words), f"{words} not in {message!r}"
    assert len(err.details) < 2000, "error messages must not echo huge inputs"
    return err


def invalid(words: tuple[str, ...], call) -> bnclient.ServiceError:
    return expect(bnclient.InvalidArgumentError, INVALID, words, call)


def not_found(words: tuple[str, ...], call) -> bnclient.ServiceError:
    return expect(bnclient.NotFoundError, grpc.StatusCode.NOT_FOUND, words, call)


def raw_call(address: str, method: str, request) -> bnclient.ServiceError:
    """Send a hand-built request with the generated stub; return the mapped SDK error."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.BatchNormServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            getattr(stub, method)(request, timeout=10)
    err = from_rpc_error(info.value)
    assert info.value.code() == err.code
    return err


def tensor(dtype: str, shape, data: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=list(shape), data=data)


def x_of(rng: np.random.Generator, shape=(4, C, 2, 3)) -> np.ndarray:
    return (rng.standard_normal(shape) * 2 + 1).astype(np.float32)


@pytest.fixture(params=[True, False], ids=["training", "eval"])
def bn(request, client: Client, name: str):
    """A BatchNorm2d(3) with non-default parameters and statistics, in either mode."""
    rng = np.random.default_rng(0)
    module = client.batch_norm_2d(name, C)
    module.load_state_dict(
        {
            "weight": rng.uniform(0.5, 2, C),
            "bias": rng.uniform(-1, 1, C),
            "running_mean": np.zeros(C),
            "running_var": np.ones(C),
        }
    )
    module(x_of(rng))
    module.train(request.param)
    return module


@pytest.fixture
def trained(client: Client, name: str):
    """Like `bn`, in training mode only."""
    rng = np.random.default_rng(1)
    module = client.batch_norm_2d(name, C)
    module.load_state_dict({"weight": rng.uniform(0.5, 2, C), "bias": rng.uniform(-1, 1, C)}, False)
    module(x_of(rng))
    return module


# -- forward input --------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 2, 2, 2), (4, 4, 2, 2), (4, 30, 1, 1), (2, 0, 2, 2)])
def test_wrong_channel_count(bn, shape) -> None:
    before = snapshot(bn)
    x = np.ones(shape, np.float32)
    invalid(("channel",), lambda: bn(x))
    invalid(("channel",), lambda: bn.vjp(x))
    assert_unchanged(bn, before)


def test_wrong_channel_count_1d(client, name) -> None:
    one = client.batch_norm_1d(name, C)
    before = snapshot(one)
    invalid(("channel",), lambda: one(np.ones((8, C + 1), np.float32)))
    invalid(("channel",), lambda: one(np.ones((8, 1, 5), np.float32)))
    assert_unchanged(one, before)


@pytest.mark.parametrize("shape", [(4, C), (4, C, 5), (2, C, 2, 2, 2), (C,)])
def test_wrong_ndim_2d(bn, shape) -> None:
    before = snapshot(bn)
    x = np.ones(shape, np.float32)
    err = invalid(("4d",), lambda: bn(x))
    assert f"{len(shape)}d" in str(err).lower()
    assert_unchanged(bn, before)


def test_zero_dim_input_is_reported_as_0d(bn) -> None:
    """A scalar is rejected, and the message names its real rank and shape."""
    before = snapshot(bn)
    err = invalid(("4d",), lambda: bn(np.float32(2.0)))
    assert "0d" in str(err).lower() and "()" in str(err)
    assert_unchanged(bn, before)


@pytest.mark.parametrize("shape", [(4, C, 2, 2), (C,), (2, C, 2, 2, 2)])
def test_wrong_ndim_1d(client, name, shape) -> None:
    one = client.batch_norm_1d(name, C)
    before = snapshot(one)
    invalid(("2d or 3d", "2d", "3d"), lambda: one(np.ones(shape, np.float32)))
    assert_unchanged(one, before)


@pytest.mark.parametrize("shape", [(1, C, 1, 1), (0, C, 2, 2)])
def test_training_batch_with_one_value_per_channel(trained, shape) -> None:
    before = snapshot(trained)
    x = np.full(shape, 2.0, np.float32)
    invalid(("more than 1", "value per channel"), lambda: trained(x))
    invalid(("more than 1", "value per channel"), lambda: trained.vjp(x))
    assert_unchanged(trained, before)
    # n = N*H*W, not N: one sample with spatial extent is a fine batch
    trained(np.arange(4 * C, dtype=np.float32).reshape(1, C, 2, 2))


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1)])
def test_training_batch_with_one_value_per_channel_1d(client, name, shape) -> None:
    one = client.batch_norm_1d(name, C)
    before = snapshot(one)
    invalid(("more than 1", "value per channel"), lambda: one(np.ones(shape, np.float32)))
    assert_unchanged(one, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_training_batch(trained, bad, dtype) -> None:
    before = snapshot(trained)
    x = x_of(np.random.default_rng(2)).astype(dtype)
    x[3, 1, 1, 2] = bad
    err = invalid(("non-finite", "nan", "inf"), lambda: trained(x))
    assert re.search(r"channel\D*\b1\b", str(err)), "the message names the channel"
    invalid(("non-finite", "nan", "inf"), lambda: trained.vjp(x))
    assert_unchanged(trained, before)


def test_finite_batch_whose_variance_overflows_float32(client, trained) -> None:
    """Finite float32 data of huge spread: the unbiased variance (~9e76) is not a float32.

    Either the batch is rejected like a non-finite one, or the running stats stay finite;
    running_var must never become inf (such a state cannot even be loaded back).
    """
    x = np.full((2, C, 2, 2), 3e38, np.float32)
    x[0] = -3e38
    before = snapshot(trained)
    try:
        trained(x)
    except bnclient.InvalidArgumentError as err:
        assert err.code == INVALID
        assert_unchanged(trained, before)
    else:
        state = trained.state_dict()
        for key, value in state.items():
            assert np.isfinite(value).all(), f"{key} is {value.reshape(-1)} after a finite batch"
        trained.load_state_dict(state)
    finally:
        # never leave a poisoned module behind for the shared server's shutdown save
        client.delete_module(trained.name)


# -- unsupported dtypes (caught by the SDK before sending) -----------------------


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64])
def test_unsupported_input_dtype(bn, dtype) -> None:
    before = snapshot(bn)
    x = np.ones((4, C, 2, 2), dtype)
    invalid(("dtype",), lambda: bn(x))
    invalid(("dtype",), lambda: bn.vjp(x))
    assert_unchanged(bn, before)


def test_unsupported_gradient_dtype_keeps_the_handle(trained) -> None:
    rng = np.random.default_rng(3)
    x = x_of(rng)
    _, vjp = trained.vjp(x)
    before = snapshot(trained)
    invalid(("dtype",), lambda: vjp(np.ones(x.shape, np.int32)))
    invalid(("grad_output", "match", "shape"), lambda: vjp(np.ones((4, C, 2, 2), np.float32)))
    invalid(("grad_output", "match", "dtype"), lambda: vjp(np.ones(x.shape, np.float64)))
    assert_unchanged(trained, before)
    dx, _, _ = vjp(np.ones(x.shape, np.float32))  # a rejected backward does not spend it
    assert dx.shape == x.shape


# -- malformed tensors on the wire ------------------------------------------------


def _forward(name: str, t: pb.Tensor) -> pb.ForwardRequest:
    return pb.ForwardRequest(ref=pb.ModuleRef(name=name), input=t, request_id="raw")


@pytest.mark.parametrize(
    ("t", "words"),
    [
        (tensor("float32", (4, C, 2, 2), b"\0" * (48 * 4 - 4)), ("bytes",)),
        (tensor("float32", (4, C, 2, 2), b"\0" * (48 * 4 + 1)), ("bytes",)),
        (tensor("float64", (4, C, 2, 2), b"\0" * (48 * 4)), ("bytes",)),
        (tensor("float16", (4, C, 2, 2), b"\0" * (48 * 4)), ("bytes",)),
        (tensor("float32", (1 << 40, C, 1 << 20, 1 << 20), b"\0" * 16), ("bytes", "too large")),
        (tensor("float32", (-4, C, 2, 2), b""), ("negative",)),
        (tensor("float32", (-1, C, -1, 2), b"\0" * (6 * 4)), ("negative",)),
        (tensor("float32", (4, C, 2, -2), b"\0" * 16), ("negative",)),
        (tensor("int32", (4, C, 2, 2), b"\0" * (48 * 4)), ("dtype",)),
        (tensor("bfloat16", (4, C, 2, 2), b"\0" * (48 * 2)), ("dtype",)),
        (tensor("<f4", (4, C, 2, 2), b"\0" * (48 * 4)), ("dtype",)),
        (tensor("", (4, C, 2, 2), b"\0" * (48 * 4)), ("dtype",)),
        (tensor("x" * 10_000, (4, C, 2, 2), b"\0" * (48 * 4)), ("dtype",)),
        (tensor("float32", (1,) * 40, b"\0" * 4), ("dimension",)),
    ],
    ids=[
        "short",
        "long",
        "float64-too-short",
        "float16-too-long",
        "huge-shape",
        "negative-batch",
        "negative-pair",
        "negative-last",
        "int32",
        "bfloat16",
        "byte-order-name",
        "empty-dtype",
        "10k-dtype",
        "40-dims",
    ],
)
def test_malformed_input_tensor(server, bn, t, words) -> None:
    before = snapshot(bn)
    err = raw_call(server.address, "Forward", _forward(bn.name, t))
    assert isinstance(err, bnclient.InvalidArgumentError) and isinstance(err, ValueError)
    assert err.code == INVALID
    assert any(w in err.details.lower() for w in words), err.details
    assert len(err.details) < 1000
    assert_unchanged(bn, before)


def test_malformed_gradient_keeps_the_handle(server, trained) -> None:
    x = x_of(np.random.default_rng(4))
    _, vjp = trained.vjp(x)
    before = snapshot(trained)
    request = pb.BackwardRequest(
        ref=pb.ModuleRef(name=trained.name),
        backward_handle=vjp.handle,
        grad_output=tensor("float32", x.shape, b"\0" * (x.nbytes - 4)),
    )
    err = raw_call(server.address, "Backward", request)
    assert isinstance(err, bnclient.InvalidArgumentError) and "bytes" in err.details
    assert_unchanged(trained, before)
    _, _, dbias = vjp(np.zeros_like(x))
    assert np.array_equal(dbias, np.zeros((1, C, 1, 1), np.float32))


def test_malformed_state_tensor(server, bn) -> None:
    before = snapshot(bn)
    good = np.full(C, 5.0, np.float32).tobytes()
    request = pb.LoadStateRequest(ref=pb.ModuleRef(name=bn.name), strict=False)
    request.state.weight.CopyFrom(tensor("float32", (C,), good))
    request.state.bias.CopyFrom(tensor("float32", (C,), good[:-2]))
    err = raw_call(server.address, "LoadState", request)
    assert isinstance(err, bnclient.InvalidArgumentError) and "bytes" in err.details
    assert_unchanged(bn, before)  # the good weight was not applied either


# -- configs, kinds and names ---------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"num_features": 0}, "num_features"),
        ({"num_features": -3}, "num_features"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-5}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"eps": float("inf")}, "eps"),
        ({"momentum": 1.5}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"momentum": float("nan")}, "momentum"),
        ({"freeze": True, "track_running_stats": False}, "freeze"),
    ],
)
@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_bad_config(client, name, bn, kind, kwargs, word) -> None:
    before = snapshot(bn)
    names_before = {m.name for m in client.list_modules()}
    factory = client.batch_norm_1d if kind == "1d" else client.batch_norm_2d
    args = {"num_features": C, **kwargs}
    invalid((word,), lambda: factory(name + ".new", **args))
    # a bad config for an existing name is INVALID_ARGUMENT too, not ALREADY_EXISTS
    if kind == "2d":
        invalid((word,), lambda: factory(name, **args))
    assert {m.name for m in client.list_modules()} == names_before
    assert_unchanged(bn, before)


@pytest.mark.parametrize("num_features", ["3", 3.0, True, None])
def test_num_features_must_be_an_int(client, name, num_features) -> None:
    invalid(("num_features",), lambda: client.batch_norm_2d(name, num_features))
    assert name not in {m.name for m in client.list_modules()}


@pytest.mark.parametrize("kind", [pb.MODULE_KIND_UNSPECIFIED, 42])
def test_unknown_module_kind(server, client, name, bn, kind) -> None:
    before = snapshot(bn)
    config = pb.ModuleConfig(kind=kind, num_features=C, eps=1e-5, momentum=0.9, affine=True)
    config.track_running_stats = True
    for target in (name + ".new", name):
        request = pb.CreateModuleRequest(ref=pb.ModuleRef(name=target), config=config)
        err = raw_call(server.address, "CreateModule", request)
        assert isinstance(err, bnclient.InvalidArgumentError) and err.code == INVALID
        assert "kind" in err.details.lower()
    assert name + ".new" not in {m.name for m in client.list_modules()}
    assert_unchanged(bn, before)


@pytest.mark.parametrize(
    ("bad_name", "word"),
    [("", "empty"), ("x" * 10_240, "characters"), ("a\nb", "printable"), ("\x00", "printable")],
    ids=["empty", "10KB", "newline", "nul"],
)
def test_bad_module_name(client, bad_name, word) -> None:
    names_before = {m.name for m in client.list_modules()}
    invalid(("name",), lambda: client.batch_norm_2d(bad_name, C))
    invalid((word,), lambda: client.batch_norm_1d(bad_name, C))
    assert {m.name for m in client.list_modules()} == names_before


def test_long_unknown_name_is_not_echoed(client) -> None:
    err = not_found(("no module",), lambda: client.delete_module("y" * 10_240))
    assert len(err.details) < 1000


# -- load_state_dict ------------------------------------------------------------


def _good_state() -> dict[str, np.ndarray]:
    return {
        "weight": np.full(C, 3.0, np.float32),
        "bias": np.full(C, -3.0, np.float32),
        "running_mean": np.full(C, 0.5, np.float32),
        "running_var": np.full(C, 4.0, np.float32),
    }


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"bias": np.zeros(C + 1, np.float32)}, ("shape",)),
        ({"bias": np.zeros((1, C), np.float32)}, ("shape",)),
        ({"running_var": np.ones((C, 1), np.float32)}, ("shape",)),
        ({"running_mean": np.zeros((1, C, 1, 1, 1), np.float32)}, ("shape",)),
        ({"weight": np.array(1.0, np.float32)}, ("shape",)),
        ({"running_mean": np.array([0.0, np.nan, 0.0])}, ("non-finite",)),
        ({"weight": np.array([1.0, 1.0, np.inf])}, ("non-finite",)),
        ({"running_var": np.array([1.0, -0.5, 1.0])}, ("negative",)),
        ({"bias": None}, ("missing",)),
        ({"running_var": np.ones(C, np.int32)}, ("dtype",)),
        ({"extra": np.ones(C, np.float32)}, ("unexpected",)),
    ],
    ids=[
        "C+1",
        "1xC",
        "Cx1",
        "5d",
        "scalar",
        "nan",
        "inf",
        "negative-var",
        "missing-strict",
        "int-dtype",
        "unknown-key",
    ],
)
def test_bad_load_state_dict_changes_nothing(bn, change, words) -> None:
    """A bad entry rejects the whole load, including the good entries beside it."""
    before = snapshot(bn)
    state = {**_good_state(), **change}  # a None entry is not sent: "bias" goes missing
    invalid(words, lambda: bn.load_state_dict(state))
    assert_unchanged(bn, before)


def test_load_state_dict_entries_the_module_lacks(client, name) -> None:
    plain = client.batch_norm_2d(name, C, affine=False)
    plain(x_of(np.random.default_rng(5)))
    before = snapshot(plain)
    invalid(("unexpected",), lambda: plain.load_state_dict(_good_state()))
    invalid(("unexpected",), lambda: plain.load_state_dict({"weight": np.ones(C)}, strict=False))
    assert_unchanged(plain, before)

    stateless = client.batch_norm_1d(name + ".nostats", C, track_running_stats=False)
    before = snapshot(stateless)
    invalid(("unexpected",), lambda: stateless.load_state_dict(_good_state()))
    assert_unchanged(stateless, before)


# -- NOT_FOUND ------------------------------------------------------------------


def test_unknown_module(client, name, bn) -> None:
    before = snapshot(bn)
    ghost = client.batch_norm_2d(name + ".ghost", C)
    client.delete_module(name + ".ghost")
    x = x_of(np.random.default_rng(6))
    calls: list[Callable[[], object]] = [
        lambda: ghost(x),
        lambda: ghost.vjp(x),
        lambda: ghost.train(),
        lambda: ghost.eval(),
        lambda: ghost.training,
        lambda: ghost.state_dict(),
        lambda: ghost.weight,
        lambda: ghost.load_state_dict(_good_state()),
        lambda: ghost.reset_running_stats(),
        lambda: ghost.reset_parameters(),
        lambda: client.delete_module(name + ".ghost"),
    ]
    for call in calls:
        err = not_found(("no module",), call)
        assert isinstance(err, LookupError)
        assert name + ".ghost" in err.details
    assert name + ".ghost" not in {m.name for m in client.list_modules()}
    assert_unchanged(bn, before)


def test_unknown_backward_handle(trained) -> None:
    x = x_of(np.random.default_rng(7))
    before = snapshot(trained)
    for handle in ("0" * 32, "", "z" * 10_000):
        forged = bnclient.VJP(trained, handle)
        err = not_found(("unknown handle",), lambda f=forged: f(np.ones_like(x)))
        assert len(err.details) < 1000
    assert_unchanged(trained, before)


def test_used_backward_handle(trained) -> None:
    x = x_of(np.random.default_rng(8))
    _, vjp = trained.vjp(x)
    dy = np.ones_like(x)
    first = vjp(dy)
    before = snapshot(trained)
    not_found(("already used",), lambda: vjp(dy))
    not_found(("already used",), lambda: vjp(dy))
    assert_unchanged(trained, before)
    assert first[0].shape == x.shape


def test_backward_handle_of_another_module(client, name, trained) -> None:
    other = client.batch_norm_2d(name + ".other", C)
    x = x_of(np.random.default_rng(9))
    _, vjp = trained.vjp(x)
    before, before_other = snapshot(trained), snapshot(other)
    stolen = bnclient.VJP(other, vjp.handle)
    not_found(("another module",), lambda: stolen(np.ones_like(x)))
    assert_unchanged(trained, before)
    assert_unchanged(other, before_other)
    vjp(np.ones_like(x))  # still good for its own module


def test_backward_handle_of_a_deleted_module(client, name) -> None:
    bn = client.batch_norm_2d(name, C)
    x = x_of(np.random.default_rng(10))
    _, vjp = bn.vjp(x)
    client.delete_module(name)
    not_found(("no module",), lambda: vjp(np.ones_like(x)))
    again = client.batch_norm_2d(name, C)
    before = snapshot(again)
    not_found(("deleted",), lambda: vjp(np.ones_like(x)))
    assert_unchanged(again, before)


# -- ALREADY_EXISTS -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("2d", {"num_features": C + 1}),
        ("2d", {"eps": 1e-3}),
        ("2d", {"momentum": 0.5}),
        ("2d", {"affine": False}),
        ("2d", {"track_running_stats": False}),
        ("2d", {"freeze": True}),
        ("1d", {}),
    ],
)
def test_create_with_a_different_config(client, name, bn, kind, kwargs) -> None:
    before = snapshot(bn)
    factory = client.batch_norm_1d if kind == "1d" else client.batch_norm_2d
    args = {"num_features": C, **kwargs}
    err = expect(
        bnclient.AlreadyExistsError,
        grpc.StatusCode.ALREADY_EXISTS,
        ("exists",),
        lambda: factory(name, **args),
    )
    assert name in err.details
    assert [m.name for m in client.list_modules()].count(name) == 1
    assert_unchanged(bn, before)
    assert client.batch_norm_2d(name, C).num_features == C  # the original config still works


# -- limits: a server of our own with small backward-store limits ----------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    state_dir: Path = tmp_path_factory.mktemp("limited")
    with (
        start_server(
            state_dir, "--max-backward-handles", "2", "--max-backward-bytes", "4096"
        ) as proc,
        Client(proc.address) as client,
    ):
        yield client


def test_evicted_backward_handle(limited, name) -> None:
    bn = limited.batch_norm_2d(name, C)
    rng = np.random.default_rng(11)
    xs = [x_of(rng, (2, C, 2, 2)) for _ in range(3)]
    vjps = [bn.vjp(x)[1] for x in xs]
    before = snapshot(bn)
    err = not_found(("evicted",), lambda: vjps[0](np.ones_like(xs[0])))
    assert "--max-backward-handles" in err.details
    assert_unchanged(bn, before)
    for x, vjp in zip(xs[1:], vjps[1:], strict=True):
        dx, _, _ = vjp(np.ones_like(x))
        assert dx.shape == x.shape
    not_found(("evicted",), lambda: vjps[0](np.ones_like(xs[0])))  # still explained


def _limit_error(call) -> None:
    expect(
        bnclient.ResourceExhaustedError,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        ("--max-backward-bytes", "limit"),
        call,
    )


def test_input_too_large_to_keep_for_backward(limited, name) -> None:
    bn = limited.batch_norm_2d(name, 4)
    bn(x_of(np.random.default_rng(12), (2, 4, 2, 2)))
    before = snapshot(bn)
    x = np.ones((4, 4, 8, 9), np.float32)  # 4608 bytes > 4096
    _limit_error(lambda: bn.vjp(x))
    assert_unchanged(bn, before)
    bn(x)  # a plain forward of the same input is fine


def test_input_at_the_backward_limit_changes_nothing_when_refused(limited, name) -> None:
    """4096 bytes of input fit the limit, but input plus per-channel context does not."""
    bn = limited.batch_norm_2d(name, 4)
    before = snapshot(bn)
    x = x_of(np.random.default_rng(13), (4, 4, 8, 8))  # exactly 4096 bytes
    try:
        _, vjp = bn.vjp(x)
    except bnclient.ResourceExhaustedError:
        assert_unchanged(bn, before)  # a refused call must not have trained the module
    else:
        vjp(np.ones_like(x))
