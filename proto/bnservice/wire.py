"""numpy <-> `bnservice.v1.Tensor` codec, shared by the server and the SDK.

A tensor travels as {dtype: numpy name, shape: int64 dims, data: raw bytes},
row-major and little-endian (see `Tensor` in bnservice.proto). Decoding validates the
declared dtype and shape against the byte count *before* touching the data and
returns a zero-copy, read-only view of the message's bytes.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from bnservice.v1 import bnservice_pb2 as pb

#: dtypes a tensor may carry; other numpy names are rejected.
FLOAT_DTYPES: dict[str, np.dtype[np.floating]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}

#: gRPC cannot carry a message of 2 GiB or more: the ceiling of one unary call.
MAX_MESSAGE_BYTES = (2 << 30) - 1

#: Largest number of dimensions accepted (numpy's own limit is 64).
MAX_NDIM = 32

#: Largest byte extent of a shape's (non-zero) dimensions: numpy's index range.
MAX_EXTENT = (1 << 62) - 1


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
    # numpy cannot even describe such a shape (in bytes), empty or not.
    if math.prod(max(d, 1) for d in shape) * np_dtype.itemsize > MAX_EXTENT:
        raise WireError(f"tensor shape {list(shape)[:8]} is too large to describe")
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


# -- chunked tensors (the streaming RPCs) -------------------------------------

#: Bytes of tensor data per stream message.
CHUNK_BYTES = 1 << 20


def encode_header(array: np.ndarray, out: pb.Tensor) -> np.ndarray:
    """Write `array`'s dtype and shape (no data) into `out`; return the array as sent.

    The returned array is C-contiguous little-endian, ready for `chunks`.
    """
    name = array.dtype.name
    if name not in FLOAT_DTYPES:
        raise WireError(
            f"unsupported array dtype {name!r}; expected one of {', '.join(FLOAT_DTYPES)}"
        )
    contiguous = np.require(array, dtype=FLOAT_DTYPES[name], requirements="C")
    out.dtype = name
    del out.shape[:]
    out.shape.extend(contiguous.shape)
    return contiguous


def chunks(contiguous: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Consecutive `chunk_bytes` slices of a C-contiguous array's bytes (none if empty)."""
    flat = contiguous.reshape(-1).view(np.uint8).data
    for start in range(0, len(flat), chunk_bytes):
        yield bytes(flat[start : start + chunk_bytes])


#: Called with a declared (shape, byte size) before anything is allocated; raises to refuse.
SizeCheck = Callable[[tuple[int, ...], int], None]


def _reserve(nbytes: int) -> np.ndarray:
    """A uint8 buffer whose memory is committed only as it is written.

    Large buffers are anonymous mappings with MAP_NORESERVE: a stream's header
    reserves address space for its declared size, but memory is used only for
    bytes that actually arrive.
    """
    if nbytes < _MAP_THRESHOLD or not hasattr(mmap, "MAP_NORESERVE"):
        return np.empty(nbytes, dtype=np.uint8)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_NORESERVE
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype=np.uint8)


_MAP_THRESHOLD = 1 << 20


class Assembler:
    """Rebuilds a tensor from its header and data chunks, copying each byte once.

    The array is allocated (virtually) from the validated header; memory is
    touched only as data arrives. Raises WireError when the chunks add up to
    more or fewer bytes than the header declares.
    """

    def __init__(self, header: pb.Tensor, check_size: SizeCheck | None = None) -> None:
        shape = tuple(header.shape)
        np_dtype, nbytes = check_header(header.dtype, shape)
        if check_size is not None:
            check_size(shape, nbytes)
        self.nbytes = nbytes
        self.received = 0
        self._bytes = _reserve(nbytes)
        self._array = self._bytes.view(np_dtype).reshape(shape)

    def add(self, data: bytes) -> None:
        end = self.received + len(data)
        if end > self.nbytes:
            raise WireError(
                f"tensor chunks carry more than the {self.nbytes} bytes its header declares"
            )
        self._bytes[self.received : end] = np.frombuffer(data, dtype=np.uint8)
        self.received = end

    def finish(self) -> np.ndarray:
        if self.received != self.nbytes:
            raise WireError(
                f"tensor chunks carry {self.received} bytes but the header declares {self.nbytes}"
            )
        return self._array


def receive_header(messages: Iterator[Any]) -> tuple[Any, bytes]:
    """Read a chunk stream's first message: (its header, the data it carries).

    `messages` are *Chunk messages with `header` (first message only) and `data`.
    """
    first = next(messages, None)
    if first is None or not first.HasField("header"):
        raise WireError("a tensor stream must start with a header message")
    return first.header, first.data


def receive_tensor(
    declared: pb.Tensor,
    first_data: bytes,
    messages: Iterator[Any],
    check_size: SizeCheck | None = None,
) -> np.ndarray:
    """The tensor whose dtype and shape `declared` gives (no data), from `first_data`
    and the data of the remaining `messages`."""
    if declared.data:
        raise WireError("a streamed tensor's header carries dtype and shape only, not data")
    assembler = Assembler(declared, check_size)
    assembler.add(first_data)
    for message in messages:
        if message.HasField("header"):
            raise WireError("only the first message of a tensor stream may carry a header")
        assembler.add(message.data)
    return assembler.finish()


def receive(
    messages: Iterator[Any],
    tensor_of: Callable[[Any], pb.Tensor],
    check_size: SizeCheck | None = None,
) -> tuple[Any, np.ndarray]:
    """Read a whole chunk stream: (its header, the tensor its chunks carry).

    `tensor_of(header)` is the header's tensor (dtype and shape, no data).
    """
    header, first_data = receive_header(messages)
    return header, receive_tensor(tensor_of(header), first_data, messages, check_size)


def send(chunk_type: Callable[..., Any], header: Any, contiguous: np.ndarray) -> Iterator[Any]:
    """The messages of a chunk stream: the header, then `contiguous`'s bytes in chunks."""
    yield chunk_type(header=header)
    for data in chunks(contiguous):
        yield chunk_type(data=data)
