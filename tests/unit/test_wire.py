"""The tensor codec: zero-copy decode, validation before allocation, exact round trips."""

from __future__ import annotations

import numpy as np
import pytest

from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (2, 3), (2, 3, 4, 5)])
def test_round_trip_is_exact(dtype: str, shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    msg = wire.encode(x)
    assert msg.dtype == dtype and tuple(msg.shape) == shape
    y = wire.decode(pb.Tensor.FromString(msg.SerializeToString()))
    assert y.dtype == x.dtype and y.shape == x.shape
    assert np.array_equal(x, y)


def test_encode_makes_little_endian_row_major() -> None:
    x = np.arange(6, dtype=">f4").reshape(2, 3).T  # big-endian, Fortran-ordered view
    msg = wire.encode(x)
    assert msg.data == np.ascontiguousarray(x, dtype="<f4").tobytes()
    assert np.array_equal(wire.decode(msg), x)


def test_decode_is_a_read_only_view() -> None:
    y = wire.decode(wire.encode(np.ones((2, 2), np.float32)))
    assert not y.flags.writeable


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes", "words"),
    [
        ("float32", [2, 3], 23, "24"),
        ("float32", [2, 3], 25, "24"),
        ("int32", [2], 8, "unsupported"),
        ("", [2], 8, "unsupported"),
        ("float32", [-1, 4], 16, "negative"),
        ("float32", [1 << 29, 1 << 30], 4, "need"),
        ("float32", [1 << 40, 1 << 40], 4, "too large"),
        ("float32", [0, 1 << 62, 1 << 62], 0, "too large"),  # empty, yet not describable
        ("float64", [0, 1 << 40, 1 << 21, 1], 0, "too large"),  # fits in elements, not bytes
        ("float64", [1] * 40, 8, "dimensions"),
    ],
)
def test_malformed_tensors_are_rejected(dtype, shape, nbytes, words) -> None:
    msg = pb.Tensor(dtype=dtype, shape=shape, data=b"\0" * nbytes)
    with pytest.raises(wire.WireError, match=words):
        wire.decode(msg)


def test_lying_huge_shape_is_rejected_before_allocation() -> None:
    # 2**58 float64 elements would be 2 EiB: only a header check can reject it quickly.
    msg = pb.Tensor(dtype="float64", shape=[1 << 29, 1 << 29], data=b"\0" * 8)
    with pytest.raises(wire.WireError, match="need"):
        wire.decode(msg)


def test_encode_rejects_non_float_arrays() -> None:
    with pytest.raises(wire.WireError, match="unsupported"):
        wire.encode(np.arange(3))
