"""numpy <-> `bnservice.v1.Tensor` codec, shared by the server and the SDK.

A tensor travels as {dtype: numpy name, shape: int64 dims, data: raw bytes},
row-major and little-endian (DESIGN.md section 4). Decoding validates the
declared dtype and shape against the byte count *before* touching the data and
returns a zero-copy, read-only view of the message's bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from bnservice.v1 import bnservice_pb2 as pb

#: dtypes a tensor may carry; other numpy names are rejected.
FLOAT_DTYPES: dict[str, np.dtype[np.floating]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}

#: Largest number of dimensions accepted (numpy's own limit is 64).
MAX_NDIM = 32


class WireError(ValueError):
    """A Tensor message that does not describe a valid array."""


def check_header(dtype: str, shape: Sequence[int]) -> tuple[np.dtype[np.floating], int]:
    """Validate a declared dtype and shape; return (dtype, byte size). Allocates nothing."""
    if dtype not in FLOAT_DTYPES:
        shown = dtype if len(dtype) <= 40 else dtype[:40] + "..."
        raise WireError(
            f"unsupported tensor dtype {shown!r}; expected one of {', '.join(FLOAT_DTYPES)}"
        )
    if len(shape) > MAX_NDIM:
        raise WireError(f"tensor has {len(shape)} dimensions; at most {MAX_NDIM} are supported")
    if any(d < 0 for d in shape):
        raise WireError(f"tensor shape {list(shape)} has a negative dimension")
    np_dtype = FLOAT_DTYPES[dtype]
    # Python ints do not overflow, so a lying shape cannot wrap around to a small size.
    return np_dtype, math.prod(shape) * np_dtype.itemsize


def decode(msg: pb.Tensor) -> np.ndarray:
    """Return a read-only array viewing `msg.data` (no copy)."""
    shape = tuple(msg.shape)
    np_dtype, nbytes = check_header(msg.dtype, shape)
    data = msg.data
    if len(data) != nbytes:
        raise WireError(
            f"tensor data has {len(data)} bytes but dtype {msg.dtype} and shape {list(shape)} "
            f"need {nbytes}"
        )
    return np.frombuffer(data, dtype=np_dtype).reshape(shape)


def encode(array: np.ndarray, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode a float16/32/64 array (any layout or byte order) into a Tensor message."""
    name = array.dtype.name
    if name not in FLOAT_DTYPES:
        raise WireError(
            f"unsupported array dtype {name!r}; expected one of {', '.join(FLOAT_DTYPES)}"
        )
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
    contiguous = np.require(array, dtype=FLOAT_DTYPES[name], requirements="C")
    msg = pb.Tensor() if out is None else out
    msg.dtype = name
    del msg.shape[:]
    msg.shape.extend(contiguous.shape)
    msg.data = contiguous.tobytes()
    return msg
