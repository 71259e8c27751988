"""Conversions between protocol messages and domain objects (no logic beyond that)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from bnserver.core.config import Kind, ModuleConfig, SyncSpec
from bnserver.engine import ModuleInfo
from bnserver.errors import InvalidArgument
from bnserver.limits import Limits
from bnserver.state.batchnorm import COUNT_KEY, STATE_KEYS, CallParams
from bnserver.state.registry import ModuleKey
from bnserver.sync.ticket import Contribution, Outcome, Phase, RunningState, Ticket
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb

_KINDS = {
    pb.MODULE_KIND_BATCH_NORM_1D: Kind.BATCH_NORM_1D,
    pb.MODULE_KIND_BATCH_NORM_2D: Kind.BATCH_NORM_2D,
    pb.MODULE_KIND_BATCH_NORM_3D: Kind.BATCH_NORM_3D,
    pb.MODULE_KIND_SYNC_BATCH_NORM: Kind.SYNC_BATCH_NORM,
}
_KIND_CODES = {kind: code for code, kind in _KINDS.items()}
_EPS_MODES = {
    pb.EPS_MODE_UNSPECIFIED: "additive",
    pb.EPS_MODE_ADDITIVE: "additive",
    pb.EPS_MODE_MAX: "max",
}
_EPS_MODE_CODES = {"additive": pb.EPS_MODE_ADDITIVE, "max": pb.EPS_MODE_MAX}


def key_from_pb(ref: pb.ModuleRef, tenant: str = "") -> ModuleKey:
    return ModuleKey(ref.name, ref.rank, tenant)


def key_to_pb(key: ModuleKey, out: pb.ModuleRef) -> None:
    out.name = key.name
    out.rank = key.rank


def config_from_pb(msg: pb.ModuleConfig) -> ModuleConfig:
    """A validated ModuleConfig; unknown enum values are InvalidArgument."""
    kind = _KINDS.get(msg.kind)
    if kind is None:
        raise InvalidArgument(f"unknown module kind {msg.kind}")
    sync = None
    if kind is Kind.SYNC_BATCH_NORM:
        mode = _EPS_MODES.get(msg.sync.eps_mode)
        if mode is None:
            raise InvalidArgument(f"unknown eps_mode {msg.sync.eps_mode}")
        sync = SyncSpec(msg.sync.group, msg.sync.rank, msg.sync.world_size, mode)
    elif msg.HasField("sync"):
        raise InvalidArgument(f"{kind.value} takes no sync settings (group, rank, world_size)")
    return ModuleConfig(
        kind=kind,
        num_features=msg.num_features,
        eps=msg.eps,
        momentum=None if msg.cumulative_average else msg.momentum,
        affine=msg.affine,
        track_running_stats=msg.track_running_stats,
        freeze=msg.freeze,
        sync=sync,
    ).validate()


def config_to_pb(config: ModuleConfig, out: pb.ModuleConfig) -> None:
    out.kind = _KIND_CODES[config.kind]
    out.num_features = config.num_features
    out.eps = config.eps
    out.momentum = 0.0 if config.momentum is None else config.momentum
    out.cumulative_average = config.momentum is None
    out.affine = config.affine
    out.track_running_stats = config.track_running_stats
    out.freeze = config.freeze
    if config.sync is not None:
        out.sync.group = config.sync.group
        out.sync.rank = config.sync.rank
        out.sync.world_size = config.sync.world_size
        out.sync.eps_mode = _EPS_MODE_CODES[config.sync.eps_mode]


def info_to_pb(info: ModuleInfo, out: pb.ModuleInfo | None = None) -> pb.ModuleInfo:
    msg = pb.ModuleInfo() if out is None else out
    key_to_pb(info.key, msg.ref)
    config_to_pb(info.config, msg.config)
    msg.training = info.training
    return msg


def state_to_pb(
    state: Mapping[str, np.ndarray], out: pb.ModuleState | None = None
) -> pb.ModuleState:
    msg = pb.ModuleState() if out is None else out
    for key, value in state.items():
        if key == COUNT_KEY:
            msg.num_batches_tracked = int(value)
        else:
            wire.encode(value, getattr(msg, key))
    return msg


def state_from_pb(msg: pb.ModuleState) -> dict[str, np.ndarray]:
    """Decode the present entries of a ModuleState (num_batches_tracked as int64 0-d)."""
    state = {key: decode(getattr(msg, key)) for key in STATE_KEYS if msg.HasField(key)}  # type: ignore[arg-type]
    if msg.HasField("num_batches_tracked"):
        state[COUNT_KEY] = np.array(msg.num_batches_tracked, np.int64)
    return state


def params_from_pb(msg: pb.ForwardRequest, limits: Limits | None = None) -> CallParams | None:
    """A forward's own weight, bias (float64 (C,)) and mode; None when it brings none."""
    training = msg.training if msg.HasField("training") else None
    vectors: list[np.ndarray | None] = []
    for what in ("weight", "bias"):
        if not msg.HasField(what):  # type: ignore[arg-type]
            vectors.append(None)
            continue
        array = decode(getattr(msg, what), limits, what)
        if array.ndim == 4 and array.shape[0] == array.shape[2] == array.shape[3] == 1:
            array = array.reshape(-1)  # MegEngine's (1, C, 1, 1)
        vectors.append(array.astype(np.float64))
    if training is None and vectors == [None, None]:
        return None
    return CallParams(vectors[0], vectors[1], training)


def require(tensor: pb.Tensor, what: str) -> pb.Tensor:
    """`tensor`, or InvalidArgument naming the field (`what`: "input") if it is absent."""
    if tensor.ByteSize() == 0:
        raise InvalidArgument(f"the request has no {what} tensor")
    return tensor


def decode(tensor: pb.Tensor, limits: Limits | None = None, what: str = "") -> np.ndarray:
    """wire.decode (malformed or absent: InvalidArgument), then the size limits
    (ResourceExhausted). `what` names the field in messages ("input")."""
    if what:
        require(tensor, what)
    try:
        array = wire.decode(tensor)
    except wire.WireError as exc:
        raise InvalidArgument(str(exc)) from None
    if limits is not None:
        limits.check_tensor(array.shape, array.nbytes)
    return array


# -- the coordinator's messages ---------------------------------------------------------

_PHASES = {pb.PHASE_FORWARD: Phase.FORWARD, pb.PHASE_BACKWARD: Phase.BACKWARD}
_PHASE_CODES = {phase: code for code, phase in _PHASES.items()}


def ticket_to_pb(ticket: Ticket, out: pb.Ticket) -> None:
    out.tenant = ticket.tenant
    out.group = ticket.group
    out.module = ticket.module
    out.phase = _PHASE_CODES[ticket.phase]
    out.rank = ticket.rank
    out.world_size = ticket.world_size
    out.signature = ticket.signature


def ticket_from_pb(msg: pb.Ticket) -> Ticket:
    """A checked Ticket; an unknown phase or out-of-range rank is InvalidArgument."""
    phase = _PHASES.get(msg.phase)
    if phase is None:
        raise InvalidArgument(f"unknown phase {msg.phase}")
    return Ticket(
        msg.tenant, msg.group, msg.module, phase, msg.rank, msg.world_size, msg.signature
    ).check()


def _state_to_pb(state: RunningState, out: pb.RunningState) -> None:
    out.version = state.version
    wire.encode(state.mean, out.mean)
    wire.encode(state.var, out.var)


def _state_from_pb(msg: pb.RunningState) -> RunningState:
    return RunningState(msg.version, decode(msg.mean), decode(msg.var))


def reduce_request(ticket: Ticket, part: Contribution) -> pb.ReduceRequest:
    msg = pb.ReduceRequest(count=part.count)
    ticket_to_pb(ticket, msg.ticket)
    for vector in part.vectors:
        wire.encode(vector, msg.vectors.add())
    if part.state is not None:
        _state_to_pb(part.state, msg.state)
    return msg


def contribution_from_pb(msg: pb.ReduceRequest) -> Contribution:
    """The request's checked numbers (malformed: InvalidArgument)."""
    state = _state_from_pb(msg.state) if msg.HasField("state") else None
    return Contribution(msg.count, tuple(decode(v) for v in msg.vectors), state).check()


def outcome_to_pb(outcome: Outcome) -> pb.ReduceResponse:
    msg = pb.ReduceResponse(count=outcome.count, reference_rank=outcome.reference_rank)
    for vector in outcome.vectors:
        wire.encode(vector, msg.vectors.add())
    if outcome.reference is not None:
        _state_to_pb(outcome.reference, msg.reference)
        msg.stale_ranks.extend(outcome.stale)
    return msg


def outcome_from_pb(msg: pb.ReduceResponse) -> Outcome:
    reference = _state_from_pb(msg.reference) if msg.HasField("reference") else None
    return Outcome(
        msg.count,
        tuple(np.array(decode(v)) for v in msg.vectors),
        reference,
        msg.reference_rank,
        tuple(msg.stale_ranks),
    )
