"""Hostile input: thousands of malformed messages to every RPC of both services.

A real `bnserver serve` process (embedded coordinator, so it serves
CoordinatorService too) and a standalone `bnserver coordinator` get
hypothesis-generated requests for every RPC: raw bytes that may not parse
(random, truncated, bit-flipped, another message type, varint and nesting
bombs), lying shapes, huge declared shapes with tiny data, negative dims,
unknown dtypes and enum values, empty and 10 KB names, NaN/Inf/negative
config values, chunk streams that disagree with their header, Reduce
requests with wrong vector counts, dtypes and shapes, ranks out of range,
world sizes of 0 or below. Every call is sent as raw bytes
(`request_serializer=None`), so structured and unparseable inputs take the
same path. Generation is derandomized: CI runs the same cases every time.

What must hold:

* every call ends with a gRPC status within its deadline, never INTERNAL or
  UNKNOWN (INTERNAL means an exception the status table does not map), with
  an error message a default gRPC client can receive;
* both processes stay up, still answer health SERVING and log no traceback;
* the modules created before the fuzz (KEEP) are bit-identical afterwards,
  and after each call that names one. Requests that could *validly* change
  them go to scratch twins instead; invalid ones are sent to them on purpose;
* memory: resident memory grows by less than RSS_LIMIT_MB over the run, so no
  size a request only declared is ever backed by memory. (A stream's header
  may reserve address space for its declared size, MAP_NORESERVE: that is
  not memory, and VmPeak is only printed.)

Every broken rule is collected (not just the first) and reported with the
smallest input that broke it. The number of cases is printed (`pytest -s`).

Sync rounds wait for their peers, so the processes run with a short
--sync-timeout, and a request that could wait gets a round name of its own, a
deadline below the sync timeout (the coordinator withdraws its part rather
than timing the round out) and is cancelled after WAIT_TIMEOUT. Reduce rounds
of 2-4 ranks are mostly completed by sending every rank at once, so that
fuzzed counts and vectors get merged.
"""

from __future__ import annotations

import itertools
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st

from bnclient import Client
from bnserver.cli.processes import ServerProcess, start_coordinator, start_server
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb

# -- limits of the run ----------------------------------------------------------

#: The processes' --sync-timeout: how long a round waits for its ranks.
SYNC_TIMEOUT = 0.5
#: Deadline of a call that must not wait for anything.
CALL_TIMEOUT = 5.0
#: A call that may legitimately wait for sync peers is cancelled after this long...
WAIT_TIMEOUT = 0.05
#: ...and has this deadline, below SYNC_TIMEOUT, so that the coordinator always
#: withdraws its part rather than timing the round out.
WAIT_DEADLINE = 0.4
#: Deadline of the ranks of a Reduce round sent together (they complete at once).
ROUND_TIMEOUT = 2.0
#: Largest tensor payload sent; declared shapes go far beyond it.
MAX_DATA = 1 << 16
#: "Names of 10 KB."
LONG = 10240
#: Allowed growth of each process's resident memory over the run.
RSS_LIMIT_MB = 200
#: Safety net: a process whose RSS grows by this much is killed (and reported).
RSS_KILL_MB = 3000
#: gRPC's default hard limit on the metadata a client accepts: a longer error message
#: never reaches a default client. The fuzz's own channels accept more, to see it.
STATUS_LIMIT = 16384
CHANNEL_OPTIONS = [
    ("grpc.max_metadata_size", 64 << 20),
    ("grpc.absolute_max_metadata_size", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]
#: Least number of cases the run must send.
MIN_CASES = 2000

BN = "BatchNormService"
COORD = "CoordinatorService"
SERVICES = {name: pb.DESCRIPTOR.services_by_name[name] for name in (BN, COORD)}
STREAMING = {"StreamForward", "StreamBackward", "Session"}
TARGETS = ("server", "coordinator")
STATE_KEYS = ("weight", "bias", "running_mean", "running_var")


def rpc_path(service: str, method: str) -> str:
    return f"/{SERVICES[service].full_name}/{method}"


def request_class(service: str, method: str) -> type[Message]:
    """The message type a method's requests (or stream messages) parse as."""
    cls: type[Message] = getattr(pb, SERVICES[service].methods_by_name[method].input_type.name)
    return cls


# -- the modules that must not change, and their stand-ins -------------------------


@dataclass(frozen=True)
class Spec:
    kind: str  # "1d", "2d" or "sync"
    channels: int
    training: bool
    group: str = ""

    @property
    def ndims(self) -> tuple[int, ...]:
        return {"1d": (2, 3), "2d": (4,), "sync": (2, 3, 4)}[self.kind]


#: Created through the SDK before the fuzz; bit-identical afterwards. bn2d is in eval mode.
KEEP = {
    "fz.keep.bn1d": Spec("1d", 3, True),
    "fz.keep.bn2d": Spec("2d", 2, False),
    "fz.keep.sync": Spec("sync", 3, True, group="fz.keep.group"),
}
#: Where a request that could validly change a KEEP module goes instead (same kind and C).
SCRATCH = {
    "fz.keep.bn1d": "fz.scratch.bn1d",
    "fz.keep.bn2d": "fz.scratch.bn2d",
    "fz.keep.sync": "fz.scratch.sync",
}
SCRATCH_SPECS = {
    "fz.scratch.bn1d": Spec("1d", 3, True),
    "fz.scratch.bn2d": Spec("2d", 2, True),
    "fz.scratch.sync": Spec("sync", 3, True, group="fz.scratch.group"),
}
#: Input of the forwards that produce real backward handles.
HANDLE_INPUT = np.random.default_rng(7).normal(size=(4, 3)).astype(np.float32)


def create_module(client: Client, name: str, spec: Spec) -> Any:
    if spec.kind == "1d":
        return client.batch_norm_1d(name, spec.channels)
    if spec.kind == "2d":
        return client.batch_norm_2d(name, spec.channels)
    return client.sync_batch_norm(name, spec.channels, group=spec.group, rank=0, world_size=1)


# -- strategies -------------------------------------------------------------------

I32 = (-(2**31), 2**31 - 1)
I64 = (-(2**63), 2**63 - 1)
int32s = st.one_of(
    st.integers(-2, 4), st.sampled_from([I32[0], I32[1], 2**30, -1]), st.integers(*I32)
)
int64s = st.one_of(
    st.integers(-2, 8),
    st.sampled_from([2**31, 2**32, 2**62, I64[1], I64[0], -1]),
    st.integers(*I64),
)
enums = st.one_of(st.integers(0, 4), st.sampled_from([-1, *I32]), st.integers(*I32))
doubles = st.one_of(
    st.sampled_from(
        [1e-5, 0.9, 0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 5e-324, 1.8e308, 1.5]
    ),
    st.floats(),
)
LONG_STRINGS = ["n" * LONG, "é" * (LONG // 2), "\x00" * LONG, "x" * 256, "x" * 257]
names = st.one_of(
    st.sampled_from([*KEEP, *SCRATCH_SPECS]),
    st.sampled_from([*KEEP, *SCRATCH_SPECS]),
    st.just(""),
    st.sampled_from(LONG_STRINGS),
    st.sampled_from([" ", "a\nb", "../etc", "\t", "\x7f", "fz.keep.bn1d ", "FZ.KEEP.BN1D"]),
    st.text(max_size=12),
)
ranks = st.one_of(st.just(0), int32s)
refs = st.builds(lambda n, r: pb.ModuleRef(name=n, rank=r), names, ranks)
strings = st.one_of(st.just(""), st.text(max_size=8), st.sampled_from(LONG_STRINGS))

FLOAT_NAMES = list(wire.FLOAT_DTYPES)
BAD_DTYPES = [
    "",
    "int32",
    "int64",
    "uint8",
    "bool",
    "float128",
    "longdouble",
    "bfloat16",
    "complex64",
    "float8",
    "<f4",
    ">f4",
    "f4",
    "float",
    "object",
    "V4",
    "S4",
    "float32 ",
    "FLOAT32",
    "float32\x00",
    "d" * LONG,
]
dtypes = st.one_of(
    st.sampled_from(FLOAT_NAMES),
    st.sampled_from(FLOAT_NAMES),
    st.sampled_from(BAD_DTYPES),
    st.text(max_size=8),
)
HUGE_SHAPES = [
    [2**31, 2**31],
    [2**62],
    [2**40],
    [2**33],
    [2**30],
    [2**63 - 1],
    [0, 2**62, 2**62],
    [2**62, 2**62, 0],
    [2**62, 0],
    [0, 3, 2**61, 2**61],
    [2, 0, 2**63 - 1, 2**63 - 1],
    [1, 3, 2**40, 0],
    [4, 3, 2**61],
    [2**31, 3],
    [1, 2**31, 1, 1],
    [-1],
    [3, -1],
    [I64[0], 2],
    [2, 3, -(2**62), -(2**62)],
]
channels = st.sampled_from([2, 3, 1, 4])
good_shapes = st.one_of(
    st.tuples(st.integers(0, 6), channels),
    st.tuples(st.integers(0, 5), channels, st.integers(0, 4)),
    st.tuples(st.integers(0, 4), channels, st.integers(0, 3), st.integers(0, 3)),
).map(list)
dims = st.one_of(
    st.integers(0, 6),
    st.sampled_from([2**31, 2**32, 2**40, 2**62, I64[1], -1, I64[0]]),
    st.integers(*I64),
)
wild_shapes = st.one_of(
    st.lists(st.integers(0, 5), max_size=6),
    st.lists(dims, max_size=5),
    st.lists(st.integers(0, 1), min_size=31, max_size=70),
    st.sampled_from(HUGE_SHAPES),
)
shapes = st.one_of(good_shapes, wild_shapes, st.sampled_from(HUGE_SHAPES))
FILLS = ["normal", "normal", "bytes", "nan", "inf", "huge", "zeros", "const", "tiny"]
fills = st.sampled_from(FILLS)
seeds = st.integers(0, 2**32 - 1)


def fill_bytes(n: int, np_dtype: np.dtype | None, fill: str, seed: int) -> bytes:
    """n bytes of tensor data: values of `np_dtype` in a pattern, or plain random bytes."""
    rng = np.random.default_rng(seed)
    if np_dtype is None or fill == "bytes":
        return rng.bytes(n)
    count, rest = divmod(n, np_dtype.itemsize)
    sign = rng.choice([-1.0, 1.0], count)
    if fill == "zeros":
        values = np.zeros(count)
    elif fill == "const":
        values = np.full(count, 1.5)
    elif fill == "huge":
        values = sign * float(np.finfo(np_dtype).max)
    elif fill == "tiny":
        values = sign * float(np.finfo(np_dtype).smallest_subnormal)
    else:
        values = rng.normal(size=count) * 10.0 ** int(rng.integers(-3, 4))
        if fill in ("nan", "inf") and count:
            values[rng.integers(0, count)] = math.nan if fill == "nan" else -math.inf
    with np.errstate(all="ignore"):
        return values.astype(np_dtype).tobytes() + rng.bytes(rest)


@st.composite
def tensors(draw: st.DrawFn, shape_strategy: st.SearchStrategy[list[int]] = shapes) -> pb.Tensor:
    """A Tensor whose data may agree with its dtype and shape, or lie about them."""
    dtype = draw(dtypes)
    shape = draw(shape_strategy)
    np_dtype = wire.FLOAT_DTYPES.get(dtype)
    itemsize = 4 if np_dtype is None else np_dtype.itemsize
    declared = math.prod(shape) * itemsize if all(d >= 0 for d in shape) else -1
    fits = 0 <= declared <= MAX_DATA
    mode = draw(st.sampled_from(["exact", "exact", "exact", "short", "long", "empty", "random"]))
    if mode == "exact" and fits:
        n = declared
    elif mode == "short" and declared > 0:
        n = max(min(declared, MAX_DATA) - draw(st.integers(1, 2 * itemsize)), 0)
    elif mode == "long":
        n = (declared if fits else 0) + draw(st.integers(1, 16))
    elif mode == "empty":
        n = 0
    else:
        n = draw(st.integers(0, 64))
    data = fill_bytes(n, np_dtype, draw(fills), draw(seeds))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


any_float = st.sampled_from(FLOAT_NAMES)
FLAWS = ["none", "none", "none", "none", "channels", "rank", "short", "long", "dtype", "dim"]


@st.composite
def fitted_tensors(
    draw: st.DrawFn,
    shape: list[int],
    float_names: st.SearchStrategy[str] = any_float,
) -> pb.Tensor:
    """A float tensor of `shape` with the right number of bytes, or wrong in one way."""
    shape = list(shape)
    flaw = draw(st.sampled_from(FLAWS))
    if flaw == "channels":
        shape[min(1, len(shape) - 1)] += draw(st.sampled_from([-1, 1, 2**40]))
    elif flaw == "rank":
        shape = shape[:-1] if draw(st.booleans()) else [*shape, draw(st.integers(0, 2))]
    elif flaw == "dim":
        shape[draw(st.integers(0, len(shape) - 1))] = draw(dims)
    dtype = draw(float_names)
    np_dtype = wire.FLOAT_DTYPES[dtype]
    declared = math.prod(shape) * np_dtype.itemsize if all(d >= 0 for d in shape) else -1
    n = declared if 0 <= declared <= MAX_DATA else draw(st.integers(0, 64))
    if flaw == "short":
        n = max(n - draw(st.integers(1, np_dtype.itemsize)), 0)
    elif flaw == "long":
        n += draw(st.integers(1, np_dtype.itemsize))
    data = fill_bytes(n, np_dtype, draw(fills), draw(seeds))
    if flaw == "dtype":
        dtype = draw(st.sampled_from(BAD_DTYPES))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


MODULE_SPECS = {**KEEP, **SCRATCH_SPECS}


@st.composite
def module_inputs(draw: st.DrawFn) -> tuple[str, pb.Tensor]:
    """The name of a module that exists, and an input that fits it or misses by one thing."""
    name = draw(st.sampled_from(list(MODULE_SPECS)))
    spec = MODULE_SPECS[name]
    ndim = draw(st.sampled_from(spec.ndims))
    shape = [draw(st.integers(0, 6)), spec.channels]
    shape += [draw(st.integers(0, 4)) for _ in range(ndim - 2)]
    return name, draw(fitted_tensors(shape))


def f64_vector(c: int, fill: str = "normal", seed: int = 0) -> pb.Tensor:
    return pb.Tensor(
        dtype="float64", shape=[c], data=fill_bytes(8 * c, np.dtype("<f8"), fill, seed)
    )


def keep_config(name: str) -> pb.ModuleConfig:
    """The exact config of a KEEP module (a get-or-create of it must change nothing)."""
    spec = KEEP[name]
    kind = {
        "1d": pb.MODULE_KIND_BATCH_NORM_1D,
        "2d": pb.MODULE_KIND_BATCH_NORM_2D,
        "sync": pb.MODULE_KIND_SYNC_BATCH_NORM,
    }[spec.kind]
    config = pb.ModuleConfig(
        kind=kind,
        num_features=spec.channels,
        eps=1e-5,
        momentum=0.9,
        affine=True,
        track_running_stats=True,
    )
    if spec.kind == "sync":
        config.sync.CopyFrom(
            pb.SyncConfig(group=spec.group, rank=0, world_size=1, eps_mode=pb.EPS_MODE_ADDITIVE)
        )
    return config


@st.composite
def plausible_configs(draw: st.DrawFn) -> pb.ModuleConfig:
    """A config that is valid, or nearly: one field may be off."""
    kind = draw(st.sampled_from([1, 2, 3]))
    config = pb.ModuleConfig(
        kind=kind,
        num_features=draw(st.integers(1, 8)),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.5])),
        momentum=draw(st.sampled_from([0.9, 0.0, 1.0, 0.5])),
        affine=draw(st.booleans()),
        track_running_stats=True,
        freeze=draw(st.booleans()),
    )
    if kind == pb.MODULE_KIND_SYNC_BATCH_NORM:
        world_size = draw(st.integers(1, 4))
        config.sync.CopyFrom(
            pb.SyncConfig(
                group=draw(st.sampled_from(["fz.g", "g"])),
                rank=draw(st.integers(0, world_size - 1)),
                world_size=world_size,
                eps_mode=draw(st.sampled_from([0, 1, 2])),
            )
        )
    flaw = draw(st.sampled_from(["none", "none", "eps", "momentum", "features", "stats", "sync"]))
    if flaw == "eps":
        config.eps = draw(doubles)
    elif flaw == "momentum":
        config.momentum = draw(doubles)
    elif flaw == "features":
        config.num_features = draw(int64s)
    elif flaw == "stats":
        config.track_running_stats = False
    elif flaw == "sync":
        config.sync.world_size = draw(int32s)
    return config


@st.composite
def configs(draw: st.DrawFn) -> pb.ModuleConfig:
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return keep_config(draw(st.sampled_from(list(KEEP))))
    if choice <= 3:
        return draw(plausible_configs())
    config = pb.ModuleConfig(
        kind=draw(enums),
        num_features=draw(
            st.one_of(st.integers(-1, 8), st.sampled_from([2**20, 2**20 + 1]), int64s)
        ),
        eps=draw(doubles),
        momentum=draw(doubles),
        affine=draw(st.booleans()),
        track_running_stats=draw(st.booleans()),
        freeze=draw(st.booleans()),
    )
    if draw(st.booleans()):
        config.sync.CopyFrom(
            pb.SyncConfig(
                group=draw(names),
                rank=draw(ranks),
                world_size=draw(st.one_of(st.integers(-1, 4), int32s)),
                eps_mode=draw(enums),
            )
        )
    return config


@st.composite
def create_requests(draw: st.DrawFn) -> pb.CreateModuleRequest:
    request = pb.CreateModuleRequest(ref=draw(refs))
    if draw(st.integers(0, 9)):
        request.config.CopyFrom(draw(configs()))
    return request


@st.composite
def forward_requests(draw: st.DrawFn) -> pb.ForwardRequest:
    request = pb.ForwardRequest(
        ref=draw(refs), keep_for_backward=draw(st.booleans()), request_id=draw(strings)
    )
    if draw(st.booleans()):  # aimed at a module that exists
        name, x = draw(module_inputs())
        request.ref.CopyFrom(pb.ModuleRef(name=name))
        request.input.CopyFrom(x)
    elif draw(st.integers(0, 9)):
        request.input.CopyFrom(draw(tensors()))
    return request


handles = st.one_of(
    st.just(""),
    st.text(max_size=8),
    st.text("0123456789abcdef", min_size=32, max_size=32),
    st.sampled_from(LONG_STRINGS),
)
#: Gradients for the handles of HANDLE_INPUT: mostly of its shape and dtype.
grad_tensors = st.one_of(
    fitted_tensors(
        list(HANDLE_INPUT.shape), st.sampled_from(["float32", "float32", "float16", "float64"])
    ),
    tensors(st.just(list(HANDLE_INPUT.shape))),
    tensors(),
)
handle_sources = st.one_of(st.none(), st.sampled_from(["fz.scratch.bn1d", "fz.scratch.sync"]))


@st.composite
def backward_requests(draw: st.DrawFn) -> tuple[pb.BackwardRequest, str | None]:
    """A BackwardRequest, and the module whose real handle replaces its handle (or None)."""
    source = draw(handle_sources)
    ref = draw(refs)
    if source is not None and draw(st.integers(0, 3)):
        ref = pb.ModuleRef(name=source)
    request = pb.BackwardRequest(ref=ref, backward_handle=draw(handles))
    if source is not None and draw(st.booleans()):  # a gradient the handle accepts
        x = HANDLE_INPUT.shape
        data = fill_bytes(HANDLE_INPUT.nbytes, HANDLE_INPUT.dtype, draw(fills), draw(seeds))
        request.grad_output.CopyFrom(pb.Tensor(dtype="float32", shape=x, data=data))
    elif draw(st.integers(0, 9)):
        request.grad_output.CopyFrom(draw(grad_tensors))
    return request, source


state_shapes = st.one_of(
    st.sampled_from([[1, c, 1, 1] for c in (1, 2, 3, 4)] + [[c] for c in (1, 2, 3, 4)]),
    shapes,
)


@st.composite
def load_state_requests(draw: st.DrawFn) -> pb.LoadStateRequest:
    request = pb.LoadStateRequest(ref=draw(refs), strict=draw(st.booleans()))
    if draw(st.booleans()):  # aimed at a module that exists, entries of about its size
        name = draw(st.sampled_from(list(MODULE_SPECS)))
        request.ref.CopyFrom(pb.ModuleRef(name=name))
        c = MODULE_SPECS[name].channels
        for key in STATE_KEYS:
            if draw(st.integers(0, 3)):
                shape = draw(st.sampled_from([[1, c, 1, 1], [c]]))
                getattr(request.state, key).CopyFrom(draw(fitted_tensors(shape)))
        return request
    for key in STATE_KEYS:
        if draw(st.booleans()):
            getattr(request.state, key).CopyFrom(draw(tensors(state_shapes)))
    return request


rounds = st.builds(
    lambda g, m, p: pb.Ticket(group=g, module=m, phase=p),
    names,
    names,
    st.one_of(st.sampled_from([1, 2, 1, 2, 0]), enums),
)
counts = st.one_of(st.integers(0, 10), int64s, st.sampled_from([2**62, I64[1]]))
peer_counts = st.one_of(
    st.integers(0, 10), st.sampled_from([2**62, I64[1]]), st.integers(0, I64[1])
)


@st.composite
def reduce_requests(draw: st.DrawFn) -> pb.ReduceRequest:
    c = draw(st.integers(0, 4))
    if draw(st.integers(0, 3)):
        vectors = [f64_vector(c, draw(fills), draw(seeds)) for _ in range(2)]
    else:
        vectors = draw(
            st.lists(
                tensors(st.one_of(st.lists(st.integers(0, 4), max_size=2), shapes)), max_size=3
            )
        )
    ticket = draw(rounds)
    ticket.rank = draw(st.one_of(st.integers(0, 3), int32s))
    ticket.world_size = draw(st.one_of(st.just(1), st.integers(2, 4), int32s))
    ticket.signature = draw(strings)
    return pb.ReduceRequest(ticket=ticket, count=draw(counts), vectors=vectors)


@st.composite
def full_rounds(draw: st.DrawFn) -> pb.ReduceRequest:
    """A well-formed contribution to a round of 2-4 ranks (its peers are sent with it)."""
    c = draw(st.integers(0, 4))
    world_size = draw(st.integers(2, 4))
    return pb.ReduceRequest(
        ticket=pb.Ticket(
            group=draw(st.sampled_from(["fz.g", "g"])),
            module=draw(st.sampled_from(["fz.m", "m"])),
            phase=draw(st.sampled_from([pb.PHASE_FORWARD, pb.PHASE_BACKWARD])),
            rank=draw(st.integers(0, world_size - 1)),
            world_size=world_size,
            signature=draw(strings),
        ),
        count=draw(peer_counts),
        vectors=[f64_vector(c, draw(fills), draw(seeds)) for _ in range(2)],
    )


def _abort_request(t: pb.Ticket, rank: int, reason: str, ws: int) -> pb.AbortRequest:
    t.rank, t.world_size = rank, ws
    return pb.AbortRequest(ticket=t, reason=reason)


abort_requests = st.builds(
    _abort_request,
    rounds,
    int32s,
    strings,
    st.one_of(st.integers(-1, 4), int32s),
)


def ref_requests(cls: type[Message]) -> st.SearchStrategy[Message]:
    """Requests that are a ModuleRef (GetModule, DeleteModule, GetState, Reset*), or empty."""
    return st.one_of(st.builds(lambda r: cls(ref=r), refs), st.just(cls()))


#: Structured request strategies, by method (unary methods and Reduce/Abort).
UNARY_REQUESTS: dict[str, st.SearchStrategy[Message]] = {
    "CreateModule": create_requests(),
    "GetModule": ref_requests(pb.GetModuleRequest),
    "ListModules": st.just(pb.ListModulesRequest()),
    "DeleteModule": ref_requests(pb.DeleteModuleRequest),
    "Forward": forward_requests(),
    "Backward": backward_requests().map(lambda rs: rs[0]),
    "SetTraining": st.builds(
        lambda r, t: pb.SetTrainingRequest(ref=r, training=t), refs, st.booleans()
    ),
    "GetState": ref_requests(pb.GetStateRequest),
    "LoadState": load_state_requests(),
    "ResetRunningStats": ref_requests(pb.ResetRequest),
    "ResetParameters": ref_requests(pb.ResetRequest),
    "Reduce": reduce_requests(),
    "Abort": abort_requests,
    "Describe": st.just(pb.DescribeRequest()),
}

LIES = [
    *["none"] * 6,
    "data_in_header",
    "no_header",
    "second_header",
    "drop_tail",
    "extra",
    "empty_stream",
    "header_only",
    "empty_chunks",
]


@st.composite
def chunk_streams(
    draw: st.DrawFn, header: Message, tensor_field: str, chunk_cls: type[Message]
) -> list[Message]:
    """The chunk messages of a streamed request, honest or lying about its header."""
    tensor = getattr(header, tensor_field)
    data = tensor.data
    lie = draw(st.sampled_from(LIES))
    if lie != "data_in_header":
        tensor.data = b""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    messages: list[Any] = [chunk_cls(header=header, data=pieces[0])]
    messages += [chunk_cls(data=piece) for piece in pieces[1:]]
    if lie == "no_header":
        messages[0].ClearField("header")
    elif lie == "second_header":
        messages.append(chunk_cls(header=header))
    elif lie == "drop_tail":
        if len(messages) > 1:
            messages.pop()
        else:
            messages[0].data = messages[0].data[:-1]
    elif lie == "extra":
        messages.append(chunk_cls(data=draw(st.binary(min_size=1, max_size=16))))
    elif lie == "empty_stream":
        messages = []
    elif lie == "header_only":
        messages = [chunk_cls(header=header)]
    elif lie == "empty_chunks":
        messages[1:1] = [chunk_cls(), chunk_cls()]
    return messages


@st.composite
def forward_streams(draw: st.DrawFn) -> list[Message]:
    return draw(chunk_streams(draw(forward_requests()), "input", pb.ForwardChunk))


@st.composite
def backward_streams(draw: st.DrawFn) -> tuple[list[Message], str | None]:
    request, source = draw(backward_requests())
    return draw(chunk_streams(request, "grad_output", pb.BackwardChunk)), source


#: Every message type a payload can be borrowed from (sent to the wrong method).
ANY_MESSAGE = st.one_of(
    *UNARY_REQUESTS.values(),
    forward_streams().map(lambda ms: ms[0] if ms else pb.ForwardChunk()),
    backward_streams().map(lambda ms: ms[0][0] if ms[0] else pb.BackwardChunk()),
)
BOMBS = [
    b"\xff",
    b"\x80",
    b"\x0a",
    b"\x0a\xff\xff\xff\xff\x0f",  # a field declaring 4 GiB
    b"\x0a\x05ab",  # a field declaring more bytes than follow
    b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # an 11-byte varint
    b"\x07",  # field 0
    b"\x0f\x00",  # wire type 7
    b"\x0a\x04\x0a\x02\xc3\x28",  # a string that is not UTF-8
    b"\x0b" * 300 + b"\x0c" * 300,  # groups nested 300 deep
    b"\x0c",  # an end-group with no start
    b"\x08" + b"\xff" * 9 + b"\x01",  # varint that overflows 64 bits
]


@st.composite
def raw_payloads(draw: st.DrawFn, own: st.SearchStrategy[Message]) -> bytes:
    """Bytes that are not (quite) the method's request: random, cut, flipped, borrowed."""
    kind = draw(st.sampled_from(["random", "cut", "cut", "flipped", "borrowed", "bomb", "empty"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "bomb":
        return draw(st.sampled_from(BOMBS))
    if kind == "empty":
        return b""
    if kind == "borrowed":
        return draw(ANY_MESSAGE).SerializeToString()
    valid = draw(own).SerializeToString()
    if not valid:
        return b"\xff"
    i = draw(st.integers(0, len(valid) - 1))
    if kind == "cut":
        return valid[:i]
    return valid[:i] + bytes([valid[i] ^ draw(st.integers(1, 255))]) + valid[i + 1 :]


@dataclass
class Case:
    """One call: where it goes and the raw bytes of its request (or stream messages)."""

    target: str
    service: str
    method: str
    payloads: list[bytes]
    handle_from: str | None = None  # Backward: the module a real handle comes from
    complete: bool = False  # Reduce: send the round's other ranks too
    peer_counts: tuple[int, ...] = ()


def serialize(messages: list[Message]) -> list[bytes]:
    return [m.SerializeToString() for m in messages]


targets = st.sampled_from(TARGETS)


def unary_cases(method: str) -> st.SearchStrategy[Case]:
    service = COORD if method in ("Reduce", "Abort") else BN
    where = targets if service == COORD else st.just("server")
    if method in ("ListModules", "Describe"):  # no fields: anything that parses
        return st.builds(
            lambda m: Case("server", BN, method, [m.SerializeToString()]),
            st.one_of(st.just(request_class(BN, method)()), ANY_MESSAGE),
        )
    if method == "Backward":
        return st.builds(
            lambda rs: Case("server", BN, method, [rs[0].SerializeToString()], rs[1]),
            backward_requests(),
        )
    if method == "Reduce":
        return st.builds(
            lambda t, r, complete, peers: Case(
                t, COORD, method, [r.SerializeToString()], None, complete, tuple(peers)
            ),
            where,
            st.one_of(reduce_requests(), full_rounds()),
            st.sampled_from([True, True, True, False]),
            st.lists(peer_counts, min_size=4, max_size=4),
        )
    return st.builds(
        lambda t, r: Case(t, service, method, [r.SerializeToString()]),
        where,
        UNARY_REQUESTS[method],
    )


def _session_message(request: Message) -> pb.SessionRequest:
    message = pb.SessionRequest()
    if isinstance(request, pb.ForwardRequest):
        message.forward.CopyFrom(request)
    elif isinstance(request, pb.BackwardRequest):
        message.backward.CopyFrom(request)
    return message


STREAM_CASES: dict[str, st.SearchStrategy[Case]] = {
    # One message a stream: each message of a Session is a call of its own (guarded alone).
    "Session": st.one_of(
        forward_requests(), backward_requests().map(lambda rs: rs[0]), st.just(pb.ForwardRequest())
    ).map(lambda r: Case("server", BN, "Session", [_session_message(r).SerializeToString()])),
    "StreamForward": forward_streams().map(
        lambda ms: Case("server", BN, "StreamForward", serialize(ms))
    ),
    "StreamBackward": backward_streams().map(
        lambda msr: Case("server", BN, "StreamBackward", serialize(msr[0]), msr[1])
    ),
}
#: Every method but the servers' Rounds stream, which tests/fuzz/test_rounds.py fuzzes.
ALL_METHODS = [(s, m.name) for s in SERVICES for m in SERVICES[s].methods if m.name != "Rounds"]


@st.composite
def raw_cases(draw: st.DrawFn) -> Case:
    """Bytes that may not parse, to any method of either service on either process."""
    service, method = draw(st.sampled_from(ALL_METHODS))
    target = draw(targets)
    if method in STREAMING:
        own = STREAM_CASES[method].map(
            lambda c: (
                request_class(c.service, c.method).FromString(c.payloads[0])
                if c.payloads
                else request_class(c.service, c.method)()
            )
        )
        payloads = draw(st.lists(raw_payloads(own), max_size=3))
        if draw(st.booleans()):  # a well-formed stream with one bad message in it
            payloads = [*draw(STREAM_CASES[method]).payloads, *payloads]
        return Case(target, service, method, payloads)
    return Case(target, service, method, [draw(raw_payloads(UNARY_REQUESTS[method]))])


# -- which requests could validly change a KEEP module ---------------------------------


def protected(ref: pb.ModuleRef) -> Spec | None:
    """The KEEP module `ref` names (they all live at rank 0), or None."""
    return KEEP.get(ref.name) if ref.rank == 0 else None


def decodes(tensor: pb.Tensor) -> np.ndarray | None:
    try:
        return wire.decode(tensor)
    except (ValueError, MemoryError):  # numpy may refuse what wire accepts (see the report)
        return None


def forward_is_harmless(spec: Spec, tensor: pb.Tensor | None) -> bool:
    """Whether a forward of `tensor` is certain to leave the module as it was."""
    if tensor is None or not spec.training:
        return True  # eval with running statistics changes nothing
    x = decodes(tensor)
    if x is None or x.ndim not in spec.ndims or x.shape[1] != spec.channels:
        return True
    if x.size // spec.channels <= 1:
        return True
    with np.errstate(all="ignore"):
        return not bool(np.isfinite(x).all())


def load_is_harmless(spec: Spec, state: pb.ModuleState) -> bool:
    """Whether a LoadState of `state` is certain to be rejected."""
    c = spec.channels
    present = [k for k in STATE_KEYS if state.HasField(k)]
    for key in present:
        value = decodes(getattr(state, key))
        if value is None or value.shape not in ((1, c, 1, 1), (c,)):
            return True
        with np.errstate(all="ignore"):
            vec = value.reshape(c).astype(np.float32)
        if not np.isfinite(vec).all() or (key == "running_var" and (vec < 0).any()):
            return True
    return False


def assembled(messages: list[Any], field_name: str) -> pb.Tensor | None:
    """The tensor a chunk stream carries if the server would accept the stream, else None."""
    if not messages or not messages[0].HasField("header"):
        return None
    declared: pb.Tensor = getattr(messages[0].header, field_name)
    if declared.data or any(m.HasField("header") for m in messages[1:]):
        return None
    try:
        _, nbytes = wire.check_header(declared.dtype, list(declared.shape))
    except wire.WireError:
        return None
    data = b"".join(m.data for m in messages)
    if len(data) != nbytes:
        return None
    return pb.Tensor(dtype=declared.dtype, shape=declared.shape, data=data)


def redirect(ref: pb.ModuleRef) -> None:
    ref.name = SCRATCH[ref.name]


def guard(method: str, messages: list[Message]) -> bool:
    """Point a request that could validly change a KEEP module at its scratch twin.

    Invalid requests keep their KEEP target: the module must survive them unchanged.
    Returns whether `messages` were changed.
    """
    if not messages:
        return False
    first: Any = messages[0]
    if method in ("DeleteModule", "SetTraining", "ResetRunningStats", "ResetParameters"):
        ref = first.ref
        harmless = protected(ref) is None
    elif method == "LoadState":
        ref = first.ref
        spec = protected(ref)
        harmless = spec is None or load_is_harmless(spec, first.state)
    elif method == "Forward":
        ref = first.ref
        spec = protected(ref)
        x = first.input if first.HasField("input") else None
        harmless = spec is None or forward_is_harmless(spec, x)
    elif method == "Session" and first.HasField("forward"):
        ref = first.forward.ref
        spec = protected(ref)
        x = first.forward.input if first.forward.HasField("input") else None
        harmless = spec is None or forward_is_harmless(spec, x)
    elif method == "StreamForward" and first.HasField("header"):
        ref = first.header.ref
        spec = protected(ref)
        harmless = spec is None or forward_is_harmless(spec, assembled(messages, "input"))
    else:
        return False  # creating (get-or-create), reading, backward, coordinator calls
    if not harmless:
        redirect(ref)
    return not harmless


def guarded_session(payload: bytes) -> bytes:
    """A Session message pointed at a KEEP module's scratch twin if it could change it."""
    try:
        message = pb.SessionRequest.FromString(payload)
    except DecodeError:
        return payload
    return message.SerializeToString() if guard("Session", [message]) else payload


def parse(cls: type[Message], payloads: list[bytes]) -> list[Message] | None:
    try:
        return [cls.FromString(p) for p in payloads]
    except DecodeError:
        return None


def reduce_is_valid(request: pb.ReduceRequest) -> bool:
    """Whether the coordinator would accept this contribution (so a round can complete)."""
    r = request.ticket
    if r.phase not in (pb.PHASE_FORWARD, pb.PHASE_BACKWARD) or not (r.group and r.module):
        return False
    vectors = [decodes(v) for v in request.vectors]
    if len(vectors) != 2 or any(v is None for v in vectors) or request.count < 0:
        return False
    a, b = vectors
    assert a is not None and b is not None
    return a.ndim == 1 and a.shape == b.shape and a.dtype == b.dtype == np.float64


# -- sending and judging ---------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    elapsed: float
    replies: list[bytes]


def status_of(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    if isinstance(err, grpc.Call):
        return err.code(), err.details() or ""
    return grpc.StatusCode.UNKNOWN, str(err)


@dataclass
class Finding:
    problem: str
    rpc: str
    code: str
    details: str
    example: str
    size: tuple[int, int]  # (request bytes, description length) of the example
    targets: set[str] = field(default_factory=set)
    times: int = 0


def shorten(text: str) -> str:
    """Collapse long quoted strings of a text-format message."""

    def cut(match: re.Match[str]) -> str:
        body = match.group(1)
        return f'"{body[:40]}..." ({len(body)} chars)' if len(body) > 60 else match.group(0)

    return re.sub(r'"((?:[^"\\]|\\.)*)"', cut, text)


def shorten_text(text: str, keep: int = 200) -> str:
    return text if len(text) <= keep else f"{text[:keep]}... ({len(text)} characters)"


def describe(cls: type[Message], payloads: list[bytes]) -> str:
    parts = []
    for payload in payloads:
        try:
            text = text_format.MessageToString(cls.FromString(payload), as_one_line=True)
            parts.append("{" + shorten(text) + "}")
        except DecodeError:
            parts.append(f"<{len(payload)} unparseable bytes {payload[:40]!r}>")
    return " | ".join(parts) if parts else "<empty stream>"


class Fuzzer:
    """Sends cases, keeps score, and keeps the scratch modules there to be fuzzed."""

    def __init__(self, processes: dict[str, ServerProcess]) -> None:
        self.processes = processes
        self.channels = {
            t: grpc.insecure_channel(p.address, options=CHANNEL_OPTIONS)
            for t, p in processes.items()
        }
        self.cases: Counter[tuple[str, str]] = Counter()
        self.codes: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()  # OK answers, by method
        self.findings: dict[tuple[str, ...], Finding] = {}
        self.waiting: dict[tuple[str, int], int] = {}  # scratch sync modules, world_size > 1
        self.unique = itertools.count()
        self.long_details = 0
        self.baseline = {name: self.observe(name) for name in KEEP}

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()

    # -- transport ---------------------------------------------------------------

    def _unary(self, target: str, service: str, method: str) -> Any:
        return self.channels[target].unary_unary(
            rpc_path(service, method), request_serializer=None, response_deserializer=None
        )

    def call(self, target: str, service: str, method: str, payloads: list[bytes], timeout: float):
        start = time.monotonic()
        try:
            if method in STREAMING:
                fn = self.channels[target].stream_stream(
                    rpc_path(service, method), request_serializer=None, response_deserializer=None
                )
                replies = list(fn(iter(payloads), timeout=timeout))
            else:
                replies = [self._unary(target, service, method)(payloads[0], timeout=timeout)]
        except grpc.RpcError as err:
            return Outcome(*status_of(err), time.monotonic() - start, [])
        return Outcome(grpc.StatusCode.OK, "", time.monotonic() - start, replies)

    def call_waiting(self, target: str, service: str, method: str, payloads: list[bytes]):
        """A call that may wait for sync peers: cancelled after WAIT_TIMEOUT unless answered.

        Cancelling (rather than a short deadline, which the server sees expire at about
        the same moment as the client) makes the outcome independent of timing: CANCELLED
        if the server waited, else the server's own answer.
        """
        start = time.monotonic()
        if method in STREAMING:
            fn = self.channels[target].stream_stream(
                rpc_path(service, method), request_serializer=None, response_deserializer=None
            )
            call = fn(iter(payloads), timeout=WAIT_DEADLINE)
            timer = threading.Timer(WAIT_TIMEOUT, call.cancel)
            timer.start()
            try:
                replies = list(call)
            except grpc.RpcError as err:
                return Outcome(*status_of(err), time.monotonic() - start, [])
            finally:
                timer.cancel()
            return Outcome(grpc.StatusCode.OK, "", time.monotonic() - start, replies)
        future = self._unary(target, service, method).future(payloads[0], timeout=WAIT_DEADLINE)
        try:
            reply = future.result(timeout=WAIT_TIMEOUT)
        except grpc.FutureTimeoutError:
            future.cancel()
            return Outcome(grpc.StatusCode.CANCELLED, "", time.monotonic() - start, [])
        except grpc.RpcError as err:
            return Outcome(*status_of(err), time.monotonic() - start, [])
        return Outcome(grpc.StatusCode.OK, "", time.monotonic() - start, [reply])

    # -- judging ------------------------------------------------------------------

    def record(
        self,
        case: Case,
        payloads: list[bytes],
        outcome: Outcome,
        timeout: float,
        may_wait: bool,
        note: str = "",
    ) -> None:
        self.cases[(case.service, case.method)] += 1
        self.codes[outcome.code.name] += 1
        if outcome.code is grpc.StatusCode.OK:
            self.accepted[case.method] += 1
        code, details = outcome.code, outcome.details
        if len(details) > 2000:
            self.long_details += 1
        problem = None
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            problem = f"status {code.name}"
        elif len(details) > STATUS_LIMIT or "metadata size exceeds" in details:
            problem = (
                f"an error message of {len(details)} characters, more than a default gRPC "
                f"client accepts ({STATUS_LIMIT} bytes of metadata)"
            )
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED and not may_wait:
            # Only the client's deadline ends a call this late: the server never answered.
            hung = outcome.elapsed >= timeout - 0.1
            problem = f"no answer within the {timeout:g} s deadline" if hung else None
        if problem is not None:
            example = note + describe(request_class(case.service, case.method), payloads)
            self.report(problem, case.target, case.method, code.name, details, example, payloads)

    def report(
        self,
        problem: str,
        target: str,
        rpc: str,
        code: str,
        details: str,
        example: str,
        payloads: list[bytes],
    ) -> None:
        norm = re.sub(r"\d+", "#", details)[:90]
        key = (problem, rpc, code, norm)
        size = (sum(len(p) for p in payloads), len(example))
        found = self.findings.get(key)
        if found is None:
            found = self.findings[key] = Finding(problem, rpc, code, details, example, size)
        elif size < found.size:
            found.example, found.details, found.size = example, details, size
        found.targets.add(target)
        found.times += 1

    # -- cases --------------------------------------------------------------------

    def send(self, case: Case) -> None:
        cls = request_class(case.service, case.method)
        messages = parse(cls, case.payloads)
        payloads = case.payloads
        # A call with a message that does not parse must fail as a whole, so it goes out
        # unguarded: whatever KEEP module it names must not change.
        if case.method == "Session" and messages is None:
            # Each message is a call of its own: those that parse run even if another
            # does not, so each is guarded alone.
            payloads = [guarded_session(p) for p in payloads]
        if messages is not None and case.target == "server" and case.service == BN:
            changed = self.inject_handle(case, messages)
            if guard(case.method, messages) or changed:
                payloads = serialize(messages)
        if case.method == "Reduce" and messages:
            self.send_reduce(case, messages[0])  # type: ignore[arg-type]
            return
        if messages is not None and self.may_wait(case, messages):
            outcome = self.call_waiting(case.target, case.service, case.method, payloads)
            self.record(case, payloads, outcome, WAIT_DEADLINE, True)
        else:
            outcome = self.call(case.target, case.service, case.method, payloads, CALL_TIMEOUT)
            self.record(case, payloads, outcome, CALL_TIMEOUT, False)
        if outcome.code is grpc.StatusCode.OK and case.service == BN and messages:
            if case.method == "CreateModule":
                self.created(pb.ModuleInfo.FromString(outcome.replies[0]))
            elif case.method == "DeleteModule":
                self.deleted(messages[0].ref)  # type: ignore[attr-defined]
        for name in self.keep_names(case, payloads):
            self.check_unchanged(name, case, payloads, outcome)

    # -- the KEEP modules -----------------------------------------------------------

    def observe(self, name: str) -> tuple[bytes, bool] | None:
        """A KEEP module's state (serialized) and training flag, as the server reports them."""
        ref = pb.ModuleRef(name=name)
        state = self.helper("GetState", pb.GetStateRequest(ref=ref))
        info = self.helper("GetModule", pb.GetModuleRequest(ref=ref))
        if state.code is not grpc.StatusCode.OK or info.code is not grpc.StatusCode.OK:
            return None
        return state.replies[0], pb.ModuleInfo.FromString(info.replies[0]).training

    def keep_names(self, case: Case, payloads: list[bytes]) -> set[str]:
        """The KEEP modules any parseable message of a call names."""
        if case.target != "server" or case.service != BN:
            return set()
        cls = request_class(case.service, case.method)
        names = set()
        for payload in payloads:
            try:
                message: Any = cls.FromString(payload)
            except DecodeError:
                continue
            if case.method == "Session":
                inner = message.forward if message.HasField("forward") else message.backward
                ref = inner.ref
            else:
                ref = (
                    message.header.ref
                    if case.method in STREAMING
                    else getattr(message, "ref", None)
                )
            if ref is not None and ref.rank == 0 and ref.name in KEEP:
                names.add(ref.name)
        return names

    def check_unchanged(self, name: str, case: Case, payloads: list[bytes], outcome: Outcome):
        """After a call that named a KEEP module: report it if the module changed."""
        now = self.observe(name)
        if now == self.baseline[name]:
            return
        self.baseline[name] = now  # later changes are reported as calls of their own
        self.report(
            f"a call answered {outcome.code.name} but changed module {name}",
            case.target,
            case.method,
            outcome.code.name,
            outcome.details,
            describe(request_class(case.service, case.method), payloads),
            payloads,
        )

    def may_wait(self, case: Case, messages: list[Message]) -> bool:
        """Whether the call could block on sync peers (a scratch sync module of world_size > 1)."""
        if case.target != "server" or case.method not in (
            "Forward",
            "Backward",
            *STREAMING,
        ):
            return False
        first: Any = messages[0] if messages else None
        if first is None:
            return False
        if case.method == "Session":
            first = first.forward if first.HasField("forward") else first.backward
        elif case.method in STREAMING:
            if not first.HasField("header"):
                return False
            first = first.header
        return (first.ref.name, first.ref.rank) in self.waiting

    def send_reduce(self, case: Case, request: pb.ReduceRequest) -> None:
        ws, rank = request.ticket.world_size, request.ticket.rank
        if not (ws >= 2 and 0 <= rank < ws):
            outcome = self.call(case.target, COORD, "Reduce", case.payloads, CALL_TIMEOUT)
            self.record(case, case.payloads, outcome, CALL_TIMEOUT, False)
            return
        # The call could wait for peers: a round of its own, so that nothing else joins it.
        if request.ticket.module:
            request.ticket.module = f"{request.ticket.module[:64]}#{next(self.unique)}"
        payloads = [request.SerializeToString()]
        if not reduce_is_valid(request):
            # Answered at once; the deadline only matters if the server disagrees.
            outcome = self.call(case.target, COORD, "Reduce", payloads, WAIT_DEADLINE)
            self.record(case, payloads, outcome, WAIT_DEADLINE, True)
            return
        if not (case.complete and ws <= 4):
            outcome = self.call_waiting(case.target, COORD, "Reduce", payloads)
            self.record(case, payloads, outcome, WAIT_DEADLINE, True)
            return
        # Every rank at once: the round completes and merges the fuzzed numbers.
        fn = self._unary(case.target, COORD, "Reduce")
        calls = []
        all_counts = [request.count if r == rank else case.peer_counts[r] for r in range(ws)]
        note = f"ranks 0..{ws - 1} sent together, with counts {all_counts}; rank {rank}: "
        for r in range(ws):
            peer = pb.ReduceRequest()
            peer.CopyFrom(request)
            peer.ticket.rank = r
            peer.count = all_counts[r]
            payload = peer.SerializeToString()
            calls.append((payload, time.monotonic(), fn.future(payload, timeout=ROUND_TIMEOUT)))
        for payload, start, future in calls:
            try:
                future.result()
                outcome = Outcome(grpc.StatusCode.OK, "", time.monotonic() - start, [])
            except grpc.RpcError as err:
                outcome = Outcome(*status_of(err), time.monotonic() - start, [])
            self.record(case, [payload], outcome, ROUND_TIMEOUT, False, note)

    # -- scratch modules ------------------------------------------------------------

    def helper(self, method: str, request: Message) -> Outcome:
        """A well-formed call the fuzz needs (not counted as a case)."""
        return self.call("server", BN, method, [request.SerializeToString()], CALL_TIMEOUT)

    def inject_handle(self, case: Case, messages: list[Message]) -> bool:
        """Give a Backward case a real handle, from a forward kept for backward."""
        if case.handle_from is None or not messages:
            return False
        first: Any = messages[0]
        if case.method == "StreamBackward":
            if not first.HasField("header"):
                return False
            first = first.header
        if (case.handle_from, 0) in self.waiting:
            return False
        request = pb.ForwardRequest(ref=pb.ModuleRef(name=case.handle_from), keep_for_backward=True)
        wire.encode(HANDLE_INPUT, request.input)
        outcome = self.helper("Forward", request)
        if outcome.code is not grpc.StatusCode.OK:
            return False
        first.backward_handle = pb.ForwardResponse.FromString(outcome.replies[0]).backward_handle
        return True

    def created(self, info: pb.ModuleInfo) -> None:
        key = (info.ref.name, info.ref.rank)
        if key in ((name, 0) for name in KEEP):
            return
        if key in ((name, 0) for name in SCRATCH_SPECS):
            sync = info.config.kind == pb.MODULE_KIND_SYNC_BATCH_NORM
            if sync and info.config.sync.world_size > 1:
                self.waiting[key] = info.config.sync.world_size
            return
        # Anything else the fuzz created goes at once: memory must not fill with modules.
        self.helper("DeleteModule", pb.DeleteModuleRequest(ref=info.ref))

    def deleted(self, ref: pb.ModuleRef) -> None:
        key = (ref.name, ref.rank)
        self.waiting.pop(key, None)
        spec = SCRATCH_SPECS.get(ref.name)
        if spec is not None and ref.rank == 0:  # bring the scratch module back
            with Client(self.processes["server"].address, timeout=CALL_TIMEOUT) as client:
                create_module(client, ref.name, spec)


# -- what the processes look like from outside -------------------------------------------


def status_mb(pid: int, field_name: str = "VmRSS") -> float:
    """A memory figure of /proc/PID/status, in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssWatch:
    """Samples each process's RSS; kills one that runs away (the machine must survive)."""

    def __init__(self, processes: dict[str, ServerProcess]) -> None:
        self.processes = processes
        self.base = {t: status_mb(p.proc.pid) for t, p in processes.items()}
        self.peak = dict(self.base)
        # VmPeak: the most address space ever reserved, touched or not.
        self.vm_base = {t: status_mb(p.proc.pid, "VmPeak") for t, p in processes.items()}
        self.vm_peak = dict(self.vm_base)
        self.killed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()

    def sample(self) -> None:
        for target, process in self.processes.items():
            if process.proc.poll() is not None:
                continue
            try:
                now = status_mb(process.proc.pid)
                self.vm_peak[target] = status_mb(process.proc.pid, "VmPeak")
            except OSError:
                continue
            self.peak[target] = max(self.peak[target], now)
            if now - self.base[target] > RSS_KILL_MB and target not in self.killed:
                self.killed.append(target)
                process.kill()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def tracebacks(stderr: str) -> Counter[str]:
    """The exception line ending each traceback in a log, counted."""
    found: Counter[str] = Counter()
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            for later in lines[i + 1 :]:
                if later and not later[0].isspace():
                    last = re.sub(r"'bnservice\.v1\.\w+'", "<request type>", later)
                    found[re.sub(r"\d{6,}", "<n>", last)[:200]] += 1
                    break
    return found


def snapshot(module: Any) -> tuple[dict[str, tuple[str, tuple[int, ...], bytes]], bool]:
    state = {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in module.state_dict().items()}
    return state, module.training


# -- the test -----------------------------------------------------------------------------


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[dict[str, ServerProcess]]:
    sync_timeout = ("--sync-timeout", str(SYNC_TIMEOUT))
    server = start_server(tmp_path / "state", *sync_timeout)
    try:
        coordinator = start_coordinator(*sync_timeout)
    except BaseException:
        server.kill()
        raise
    procs = {"server": server, "coordinator": coordinator}
    yield procs
    for proc in procs.values():
        proc.kill()


def fuzz(strategy: st.SearchStrategy[Case], examples: int, send: Callable[[Case], None]) -> None:
    """Send `examples` hypothesis-generated cases, the same ones on every run."""

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    @given(strategy)
    def run(case: Case) -> None:
        send(case)

    run()


#: Hypothesis examples per method (structured), on top of the raw-bytes cases.
EXAMPLES = {
    "CreateModule": 400,
    "GetModule": 150,
    "ListModules": 120,
    "DeleteModule": 150,
    "Forward": 800,
    "Backward": 400,
    "StreamForward": 600,
    "StreamBackward": 350,
    "SetTraining": 150,
    "GetState": 150,
    "LoadState": 500,
    "ResetRunningStats": 120,
    "ResetParameters": 120,
    "Reduce": 700,
    "Abort": 300,
    "Describe": 100,
    "Session": 400,
}
RAW_EXAMPLES = 1200
#: World sizes of the rounds left to time out (each rank but 0 missing); 4096 is the
#: largest group the server accepts.
EXPIRE_WORLD_SIZES = (2, 1000, 4096)


def expiring_rounds(fz: Fuzzer) -> None:
    """Rounds that time out must answer DEADLINE_EXCEEDED, however many ranks are missing.

    Sent all at once: a Reduce to each coordinator, and a forward of a SyncBatchNorm
    whose peers never come.
    """
    sent: list[Case] = []
    for ws in EXPIRE_WORLD_SIZES:
        request = pb.ReduceRequest(
            ticket=pb.Ticket(
                group="fz.expire",
                module=f"m{ws}",
                phase=pb.PHASE_FORWARD,
                rank=0,
                world_size=ws,
                signature="s",
            ),
            count=4,
            vectors=[f64_vector(3), f64_vector(3)],
        )
        for target in TARGETS:
            sent.append(Case(target, COORD, "Reduce", [request.SerializeToString()]))
        name = f"fz.expire.{ws}"
        config = keep_config("fz.keep.sync")
        config.sync.group, config.sync.world_size = "fz.expire", ws
        fz.helper(
            "CreateModule", pb.CreateModuleRequest(ref=pb.ModuleRef(name=name), config=config)
        )
        forward = pb.ForwardRequest(ref=pb.ModuleRef(name=name))
        wire.encode(HANDLE_INPUT, forward.input)
        sent.append(Case("server", BN, "Forward", [forward.SerializeToString()]))
    futures = []
    for case in sent:
        fn = fz._unary(case.target, case.service, case.method)
        futures.append((case, time.monotonic(), fn.future(case.payloads[0], timeout=CALL_TIMEOUT)))
    for case, start, future in futures:
        try:
            future.result()
            outcome = Outcome(grpc.StatusCode.OK, "", time.monotonic() - start, [])
        except grpc.RpcError as err:
            outcome = Outcome(*status_of(err), time.monotonic() - start, [])
        fz.record(case, case.payloads, outcome, CALL_TIMEOUT, True)
        if outcome.code is not grpc.StatusCode.DEADLINE_EXCEEDED or outcome.elapsed > 3.0:
            fz.report(
                f"a round left to time out answered {outcome.code.name} after "
                f"{outcome.elapsed:.1f} s (expected DEADLINE_EXCEEDED after {SYNC_TIMEOUT} s)",
                case.target,
                case.method,
                outcome.code.name,
                outcome.details,
                describe(request_class(case.service, case.method), case.payloads),
                case.payloads,
            )
    for ws in EXPIRE_WORLD_SIZES:
        fz.helper("DeleteModule", pb.DeleteModuleRequest(ref=pb.ModuleRef(name=f"fz.expire.{ws}")))


def test_hostile_input(processes: dict[str, ServerProcess]) -> None:
    started = time.monotonic()
    server = processes["server"]
    client = Client(server.address, timeout=CALL_TIMEOUT)
    rng = np.random.default_rng(0)
    keep = {}
    for name, spec in KEEP.items():
        module = create_module(client, name, spec)
        c = spec.channels
        module.load_state_dict(
            {
                "weight": rng.normal(size=c),
                "bias": rng.normal(size=c),
                "running_mean": rng.normal(size=c),
                "running_var": rng.uniform(0.5, 2.0, size=c),
            }
        )
        shape = (5, c, 2, 2) if spec.kind == "2d" else (6, c)
        module(rng.normal(size=shape).astype(np.float32))  # running stats off their defaults
        if not spec.training:
            module.eval()
        keep[name] = module
    for name, spec in SCRATCH_SPECS.items():
        create_module(client, name, spec)
    before = {name: snapshot(module) for name, module in keep.items()}
    infos_before = {i.name: i for i in client.list_modules() if i.name in KEEP}

    fz = Fuzzer(processes)
    watch = RssWatch(processes)
    try:
        for method, examples in EXAMPLES.items():
            strategy = STREAM_CASES[method] if method in STREAMING else unary_cases(method)
            fuzz(strategy, examples, fz.send)
        fuzz(raw_cases(), RAW_EXAMPLES, fz.send)
        expiring_rounds(fz)
    finally:
        watch.stop()
        fz.close()
    elapsed = time.monotonic() - started

    problems: list[str] = []
    for target, process in processes.items():
        if process.proc.poll() is not None:
            problems.append(f"the {target} process died (exit code {process.proc.returncode})")
        elif not serving(process.address):
            problems.append(f"the {target} process no longer answers health SERVING")
        for line, times in tracebacks(process.stderr).items():
            problems.append(f"the {target} logged {times} traceback(s) ending in: {line}")
        grown = watch.peak[target] - watch.base[target]
        if target in watch.killed or grown > RSS_LIMIT_MB:
            problems.append(
                f"the {target}'s RSS grew by {grown:.0f} MB (from {watch.base[target]:.0f} MB), "
                f"over the {RSS_LIMIT_MB} MB allowed"
            )
    if server.proc.poll() is None:
        infos_after = {i.name: i for i in client.list_modules() if i.name in KEEP}
        for name, module in keep.items():
            if name not in infos_after:
                problems.append(f"module {name} is gone")
                continue
            if infos_after[name] != infos_before[name]:
                problems.append(
                    f"module {name} changed: {infos_before[name]} -> {infos_after[name]}"
                )
            state, training = snapshot(module)
            if training != before[name][1]:
                problems.append(f"module {name}'s training flag changed to {training}")
            for key, value in before[name][0].items():
                if state.get(key) != value:
                    problems.append(f"module {name}'s {key} changed")
    client.close()

    total = sum(fz.cases.values())
    per_method = Counter({m: n for (_, m), n in fz.cases.items()})
    print(f"\nfuzz: {total} cases in {elapsed:.1f} s")
    print(
        "fuzz: per RPC (cases/OK): "
        + ", ".join(f"{m} {n}/{fz.accepted[m]}" for m, n in sorted(per_method.items()))
    )
    print("fuzz: statuses: " + ", ".join(f"{c} {n}" for c, n in fz.codes.most_common()))
    print(
        "fuzz: RSS MB (base -> peak): "
        + ", ".join(f"{t} {watch.base[t]:.0f} -> {watch.peak[t]:.0f}" for t in processes)
    )
    print(
        "fuzz: VmPeak MB (base -> end): "
        + ", ".join(f"{t} {watch.vm_base[t]:.0f} -> {watch.vm_peak[t]:.0f}" for t in processes)
    )
    print(f"fuzz: error messages over 2000 characters: {fz.long_details}")
    for f in sorted(fz.findings.values(), key=lambda f: (f.problem, f.rpc)):
        problems.append(
            f"{f.problem}: {f.rpc} on the {' and the '.join(sorted(f.targets))} "
            f"({f.times} case(s)), answered {f.code} {shorten_text(f.details)!r}; "
            f"smallest input: {f.example[:600]}"
        )
    for problem in problems:
        print("fuzz: PROBLEM: " + problem)

    missing = [f"{s}.{m}" for s, m in ALL_METHODS if fz.cases[(s, m)] < 100]
    assert not missing, f"RPCs fuzzed fewer than 100 times: {missing}"
    assert total >= MIN_CASES, f"only {total} cases ran"
    assert not problems, f"{len(problems)} problem(s) in {total} cases:\n" + "\n".join(problems)
