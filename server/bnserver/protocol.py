"""Conversions between protocol messages and domain objects (no logic beyond that)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from bnserver.config import Kind, ModuleConfig, SyncSpec
from bnserver.engine import ModuleInfo
from bnserver.errors import InvalidArgument
from bnserver.limits import Limits
from bnserver.modules import STATE_KEYS
from bnserver.registry import ModuleKey
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb

_KINDS = {
    pb.MODULE_KIND_BATCH_NORM_1D: Kind.BATCH_NORM_1D,
    pb.MODULE_KIND_BATCH_NORM_2D: Kind.BATCH_NORM_2D,
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
        momentum=msg.momentum,
        affine=msg.affine,
        track_running_stats=msg.track_running_stats,
        freeze=msg.freeze,
        sync=sync,
    ).validate()


def config_to_pb(config: ModuleConfig, out: pb.ModuleConfig) -> None:
    out.kind = _KIND_CODES[config.kind]
    out.num_features = config.num_features
    out.eps = config.eps
    out.momentum = config.momentum
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


def state_to_pb(state: Mapping[str, np.ndarray]) -> pb.ModuleState:
    msg = pb.ModuleState()
    for key, value in state.items():
        wire.encode(value, getattr(msg, key))
    return msg


def state_from_pb(msg: pb.ModuleState) -> dict[str, np.ndarray]:
    """Decode the present entries of a ModuleState."""
    return {key: decode(getattr(msg, key)) for key in STATE_KEYS if msg.HasField(key)}  # type: ignore[arg-type]


def decode(tensor: pb.Tensor, limits: Limits | None = None) -> np.ndarray:
    """wire.decode (malformed: InvalidArgument), then the size limits (ResourceExhausted)."""
    try:
        array = wire.decode(tensor)
    except wire.WireError as exc:
        raise InvalidArgument(str(exc)) from None
    if limits is not None:
        limits.check_tensor(array.shape, array.nbytes)
    return array
