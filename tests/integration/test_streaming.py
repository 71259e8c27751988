"""Chunked streams: the SDK picks them above its threshold; results equal the unary path."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from bnclient import Client, InvalidArgumentError
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

C = 4


def _x(n: int, seed: int = 0) -> np.ndarray:
    """float32 (n, C, 8, 8): n KiB."""
    return (np.random.default_rng(seed).standard_normal((n, C, 8, 8)) * 3 + 2).astype(np.float32)


@pytest.fixture
def pair(server, name):
    """Two clients on one server: one streams everything over 8 KiB, one never streams."""
    streaming = Client(server.address, stream_threshold=8 << 10)
    unary = Client(server.address, stream_threshold=1 << 40)
    yield streaming, unary
    streaming.close()
    unary.close()


@pytest.mark.parametrize("n", [7, 8, 9, 64])  # 7 KiB, 8 KiB (at the threshold), just over, 8x
def test_streamed_and_unary_forward_agree(pair, name, n) -> None:
    streaming, unary = pair
    x = _x(n)
    a = streaming.batch_norm_2d(name + ".s", C)
    b = unary.batch_norm_2d(name + ".u", C)
    ya, yb = a(x), b(x)
    assert ya.shape == x.shape and ya.dtype == x.dtype and ya.flags.writeable
    np.testing.assert_array_equal(ya, yb)
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(value, b.state_dict()[key])


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_streamed_vjp_matches_unary(pair, name, dtype) -> None:
    streaming, unary = pair
    x = _x(40).astype(dtype)
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(dtype)
    ya, vjp_a = streaming.batch_norm_2d(name + ".s", C).vjp(x)
    yb, vjp_b = unary.batch_norm_2d(name + ".u", C).vjp(x)
    np.testing.assert_array_equal(ya, yb)
    for got, want in zip(vjp_a(dy), vjp_b(dy), strict=True):
        np.testing.assert_array_equal(got, want)


def test_empty_tensor_streams(pair, name) -> None:
    streaming, _ = pair
    bn = streaming.batch_norm_2d(name, C)
    bn.eval()
    # (0, C, 8, 8) is 0 bytes: under any threshold, so force the stream with a tiny one.
    tiny = Client(streaming.target, stream_threshold=-1)
    try:
        y = tiny.batch_norm_2d(name, C)(np.zeros((0, C, 8, 8), np.float32))
        assert y.shape == (0, C, 8, 8)
    finally:
        tiny.close()


def _raw_stream(address: str, messages: list[pb.ForwardChunk]) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.BatchNormServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamForward(iter(messages), timeout=10))
        return info.value


def _header(name: str, shape: tuple[int, ...], data: bytes = b"") -> pb.ForwardRequest:
    return pb.ForwardRequest(
        ref=pb.ModuleRef(name=name),
        input=pb.Tensor(dtype="float32", shape=list(shape), data=data),
    )


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("short", "carry 1020 bytes but the header declares 1024"),
        ("long", "more than the 1024 bytes"),
        ("no header", "must start with a header"),
        ("two headers", "only the first message"),
        ("data in header", "dtype and shape only"),
        ("empty stream", "must start with a header"),
    ],
)
def test_malformed_streams_are_invalid_and_change_nothing(client, server, name, case, words):
    bn = client.batch_norm_2d(name, C)
    before = bn.state_dict()
    x = _x(1).tobytes()  # 1024 bytes for shape (1, 4, 8, 8)
    header = _header(name, (1, C, 8, 8))
    messages = {
        "short": [pb.ForwardChunk(header=header), pb.ForwardChunk(data=x[:-4])],
        "long": [pb.ForwardChunk(header=header, data=x), pb.ForwardChunk(data=b"\0" * 4)],
        "no header": [pb.ForwardChunk(data=x)],
        "two headers": [pb.ForwardChunk(header=header), pb.ForwardChunk(header=header, data=x)],
        "data in header": [pb.ForwardChunk(header=_header(name, (1, C, 8, 8), x))],
        "empty stream": [],
    }[case]
    err = _raw_stream(server.address, messages)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (err.details() or "")
    after = bn.state_dict()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


def test_streamed_errors_are_typed(pair, name) -> None:
    streaming, _ = pair
    bn = streaming.batch_norm_2d(name, C)
    with pytest.raises(InvalidArgumentError, match="channels"):
        bn(np.zeros((64, C + 1, 8, 8), np.float32))


def test_assembler_checks_the_declared_size_before_allocating() -> None:
    header = pb.Tensor(dtype="float64", shape=[1 << 29, 1 << 29])  # 2 EiB

    def refuse(shape: tuple[int, ...], nbytes: int) -> None:
        assert shape == (1 << 29, 1 << 29) and nbytes == 2 << 60
        raise OverflowError("refused")

    with pytest.raises(OverflowError, match="refused"):
        wire.Assembler(header, refuse)
