"""Module proxies: remote BatchNorm modules that feel like framework modules.

A proxy holds only the module's name and config; parameters, running
statistics and the training flag live on the server and every property reads
them from there (only the entry it names).

Proxies pickle and deep-copy: a copy is another proxy of the same server
module (see `Client` for how the connection travels).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from bnclient import errors
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb

if TYPE_CHECKING:
    from bnclient.client import Client

STATE_KEYS = ("weight", "bias", "running_mean", "running_var")

#: The training-update count, accepted by load_state_dict (PyTorch's state_dict key).
COUNT_KEY = "num_batches_tracked"

_KIND_NAMES = {
    pb.MODULE_KIND_BATCH_NORM_1D: "BatchNorm1d",
    pb.MODULE_KIND_BATCH_NORM_2D: "BatchNorm2d",
    pb.MODULE_KIND_BATCH_NORM_3D: "BatchNorm3d",
    pb.MODULE_KIND_SYNC_BATCH_NORM: "SyncBatchNorm",
}


@dataclass(frozen=True)
class ModuleInfo:
    """A module as the server describes it (MegEngine's config names and momentum;
    momentum None is the cumulative average)."""

    name: str
    kind: str  # "BatchNorm1d", "BatchNorm2d", "BatchNorm3d" or "SyncBatchNorm"
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    freeze: bool
    training: bool
    rank: int = 0
    group: str = ""
    world_size: int = 0
    eps_mode: str = "additive"


def _info_from_pb(msg: pb.ModuleInfo) -> ModuleInfo:
    c = msg.config
    return ModuleInfo(
        name=msg.ref.name,
        kind=_KIND_NAMES.get(c.kind, "unknown"),
        num_features=c.num_features,
        eps=c.eps,
        momentum=None if c.cumulative_average else c.momentum,
        affine=c.affine,
        track_running_stats=c.track_running_stats,
        freeze=c.freeze,
        training=msg.training,
        rank=msg.ref.rank,
        group=c.sync.group,
        world_size=c.sync.world_size,
        eps_mode="max" if c.sync.eps_mode == pb.EPS_MODE_MAX else "additive",
    )


def _as_input(x: Any) -> np.ndarray:
    """`x` as a float16/32/64 ndarray, or InvalidArgumentError."""
    array = np.asarray(x)
    if array.dtype.name not in wire.FLOAT_DTYPES:
        raise errors.InvalidArgumentError(
            f"input dtype must be float16, float32 or float64, got {array.dtype}"
        )
    return array


def _writable(array: np.ndarray) -> np.ndarray:
    """`array`, copied if it is a read-only view of a reply's bytes."""
    return array if array.flags.writeable else np.array(array)


def _as_count(value: Any) -> int:
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "iu":
        raise errors.InvalidArgumentError(f"{COUNT_KEY!r} must be one integer, got {array!r}")
    return int(array.reshape(()))


@dataclass(frozen=True)
class _ForwardResult:
    """What one forward call returned (the torch modules use every part)."""

    output: np.ndarray
    handle: str
    running_stats: dict[str, Any]


class BatchNorm:
    """Proxy of a named BatchNorm module on a server.

    Call it like a module: ``y = bn(x)``. Attributes mirror MegEngine's
    constructor (num_features, eps, momentum, affine, track_running_stats,
    freeze). weight, bias, running_mean and running_var are float32
    (1, C, 1, 1) arrays read from the server, or None when the module has none.

    Get one from a `Client` (``client.batch_norm_2d(...)``, ``client.module(name)``),
    or build one from a `ModuleInfo` the server gave.
    """

    def __init__(self, client: Client, info: ModuleInfo) -> None:
        self._client = client
        self._ref = pb.ModuleRef(name=info.name, rank=info.rank)
        self.name: str = info.name
        self.num_features: int = info.num_features
        self.eps: float = info.eps
        self.momentum: float | None = info.momentum
        self.affine: bool = info.affine
        self.track_running_stats: bool = info.track_running_stats
        self.freeze: bool = info.freeze

    @property
    def client(self) -> Client:
        """The connection this proxy calls through."""
        return self._client

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, {self.num_features}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, freeze={self.freeze}) "
            f"on {self._client.target}"
        )

    # -- compute ------------------------------------------------------------

    def __call__(self, x: Any) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: Any) -> np.ndarray:
        """Normalize `x`; in training mode this updates the running statistics."""
        return _writable(self._forward(_as_input(x), keep_for_backward=False).output)

    def vjp(self, x: Any) -> tuple[np.ndarray, VJP]:
        """Forward that keeps what backward needs; returns (y, vjp) like torch.func.vjp.

        ``dx, dweight, dbias = vjp(dy)``; the server holds the context until
        then (one use; the oldest contexts are evicted when too many are held).
        """
        result = self._forward(_as_input(x), keep_for_backward=True)
        return _writable(result.output), VJP(self, result.handle)

    def _forward(
        self,
        array: np.ndarray,
        keep_for_backward: bool,
        weight: np.ndarray | None = None,
        bias: np.ndarray | None = None,
        training: bool | None = None,
        return_running_stats: bool = False,
    ) -> _ForwardResult:
        """One Forward call (see `Client._forward` for how it travels).

        weight, bias, training: the caller's own for this call (stored with it).
        """
        request = pb.ForwardRequest(
            ref=self._ref,
            keep_for_backward=keep_for_backward,
            request_id=uuid.uuid4().hex,
            return_running_stats=return_running_stats,
        )
        if weight is not None and bias is not None:
            wire.encode(weight, request.weight)
            wire.encode(bias, request.bias)
        if training is not None:
            request.training = training
        # Shared memory, a stream, a Session message or a unary call, by size; retried
        # with the request id, which makes a retry apply at most once.
        reply, y = self._client._forward(request, array)
        stats = _state_from_pb(reply.running_stats) if return_running_stats else {}
        return _ForwardResult(y, reply.backward_handle, stats)

    # -- mode ---------------------------------------------------------------

    def train(self, mode: bool = True) -> Self:
        """Set training mode on the server's module; returns self."""
        self._client._call("SetTraining", pb.SetTrainingRequest(ref=self._ref, training=mode))
        return self

    def eval(self) -> Self:
        """Set evaluation mode (running statistics); returns self."""
        return self.train(False)

    @property
    def training(self) -> bool:
        """The server module's mode (one call that carries no tensors)."""
        info: pb.ModuleInfo = self._client._call("GetModule", pb.GetModuleRequest(ref=self._ref))
        return info.training

    def info(self) -> ModuleInfo:
        """The module as the server describes it now (config and mode)."""
        return _info_from_pb(self._client._call("GetModule", pb.GetModuleRequest(ref=self._ref)))

    # -- state --------------------------------------------------------------

    def _state(self, entries: tuple[str, ...] = ()) -> dict[str, Any]:
        request = pb.GetStateRequest(ref=self._ref, entries=entries)
        return _state_from_pb(self._client._call("GetState", request))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the module's present entries, float32 (1, C, 1, 1)."""
        return {k: v for k, v in self._state(STATE_KEYS).items() if k in STATE_KEYS}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Load (1, C, 1, 1) or (C,) arrays; with strict, exactly the module's entries.

        Also accepts PyTorch's state_dict of a BatchNorm: its `num_batches_tracked`
        (an integer, never required) sets the module's count of training updates.
        """
        request = pb.LoadStateRequest(ref=self._ref, strict=strict)
        for key, value in state.items():
            if key == COUNT_KEY:
                if value is not None:
                    request.state.num_batches_tracked = _as_count(value)
                continue
            if key not in STATE_KEYS:
                raise errors.InvalidArgumentError(
                    f"unexpected state entry {key!r}; entries are {[*STATE_KEYS, COUNT_KEY]}"
                )
            if value is not None:
                wire.encode(_as_input(value), getattr(request.state, key))
        self._client._call("LoadState", request)

    def _entry(self, key: str) -> np.ndarray | None:
        value = self._state((key,)).get(key)
        return None if value is None else np.asarray(value)

    @property
    def weight(self) -> np.ndarray | None:
        return self._entry("weight")

    @property
    def bias(self) -> np.ndarray | None:
        return self._entry("bias")

    @property
    def running_mean(self) -> np.ndarray | None:
        return self._entry("running_mean")

    @property
    def running_var(self) -> np.ndarray | None:
        return self._entry("running_var")

    @property
    def num_batches_tracked(self) -> int | None:
        """Training updates of the running statistics so far (None without them)."""
        value = self._state((COUNT_KEY,)).get(COUNT_KEY)
        return None if value is None else int(value)

    def reset_running_stats(self) -> None:
        """running_mean to zeros, running_var to ones, num_batches_tracked to 0."""
        self._client._call("ResetRunningStats", pb.ResetRequest(ref=self._ref))

    def reset_parameters(self) -> None:
        """reset_running_stats(), then weight to ones and bias to zeros."""
        self._client._call("ResetParameters", pb.ResetRequest(ref=self._ref))


def _state_from_pb(msg: pb.ModuleState) -> dict[str, Any]:
    """The present entries: float32 (1, C, 1, 1) copies, num_batches_tracked an int."""
    state: dict[str, Any] = {
        k: np.array(wire.decode(getattr(msg, k)))
        for k in STATE_KEYS
        if msg.HasField(k)  # type: ignore[arg-type]
    }
    if msg.HasField("num_batches_tracked"):
        state[COUNT_KEY] = msg.num_batches_tracked
    return state


class BatchNorm1d(BatchNorm):
    """BatchNorm over (N, C) or (N, C, L) input."""


class BatchNorm2d(BatchNorm):
    """BatchNorm over (N, C, H, W) input."""


class BatchNorm3d(BatchNorm):
    """BatchNorm over (N, C, D, H, W) input (PyTorch's BatchNorm3d)."""


class SyncBatchNorm(BatchNorm):
    """One rank of a SyncBatchNorm group: batch statistics span every rank's batch.

    In training (or with track_running_stats=False) each call waits for the
    other ranks' calls of the same step; eval with running statistics and
    freeze=True run alone. A forward whose reply was lost is retried with its
    request id and gets its round's committed result.
    """

    def __init__(self, client: Client, info: ModuleInfo) -> None:
        super().__init__(client, info)
        self.group: str = info.group
        self.rank: int = info.rank
        self.world_size: int = info.world_size
        self.eps_mode: str = info.eps_mode

    def __repr__(self) -> str:
        return (
            super()
            .__repr__()
            .replace(
                ") on ",
                f", group={self.group!r}, rank={self.rank}, "
                f"world_size={self.world_size}, eps_mode={self.eps_mode!r}) on ",
                1,
            )
        )


#: The proxy class of each module kind.
PROXY_CLASSES: dict[str, type[BatchNorm]] = {
    "BatchNorm1d": BatchNorm1d,
    "BatchNorm2d": BatchNorm2d,
    "BatchNorm3d": BatchNorm3d,
    "SyncBatchNorm": SyncBatchNorm,
}


class VJP:
    """The backward of one `BatchNorm.vjp` forward; call it once with dy."""

    def __init__(self, module: BatchNorm, handle: str) -> None:
        self._module = module
        self.handle = handle

    def __call__(self, dy: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Return (dx, dweight, dbias); dweight and dbias are None without affine or with freeze."""
        dx, dweight, dbias = self._call(_as_input(dy))
        return _writable(dx), dweight, dbias

    def _call(self, grad: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Backward; dx may be a read-only view of the reply."""
        client = self._module._client
        request = pb.BackwardRequest(ref=self._module._ref, backward_handle=self.handle)
        reply, dx = client._backward(request, grad)
        if not reply.HasField("grad_weight"):
            return dx, None, None
        return dx, np.array(wire.decode(reply.grad_weight)), np.array(wire.decode(reply.grad_bias))
