"""Module proxies: remote BatchNorm modules that feel like framework modules.

A proxy holds only the module's name and config; parameters, running
statistics and the training flag live on the server and every property reads
them from there.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from bnclient import errors
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb

if TYPE_CHECKING:
    from bnclient.client import Client

STATE_KEYS = ("weight", "bias", "running_mean", "running_var")


def _as_input(x: Any) -> np.ndarray:
    """`x` as a float16/32/64 ndarray, or InvalidArgumentError."""
    array = np.asarray(x)
    if array.dtype.name not in wire.FLOAT_DTYPES:
        raise errors.InvalidArgumentError(
            f"input dtype must be float16, float32 or float64, got {array.dtype}"
        )
    return array


class BatchNorm:
    """Proxy of a named BatchNorm module on a server.

    Call it like a module: ``y = bn(x)``. Attributes mirror MegEngine's
    constructor (num_features, eps, momentum, affine, track_running_stats,
    freeze). weight, bias, running_mean and running_var are float32
    (1, C, 1, 1) arrays read from the server, or None when the module has none.
    """

    def __init__(self, client: Client, info: pb.ModuleInfo) -> None:
        self._client = client
        self._ref = pb.ModuleRef()
        self._ref.CopyFrom(info.ref)
        c = info.config
        self.name: str = info.ref.name
        self.num_features: int = c.num_features
        self.eps: float = c.eps
        self.momentum: float = c.momentum
        self.affine: bool = c.affine
        self.track_running_stats: bool = c.track_running_stats
        self.freeze: bool = c.freeze

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
        return self._forward(x, keep_for_backward=False)[0]

    def vjp(self, x: Any) -> tuple[np.ndarray, VJP]:
        """Forward that keeps what backward needs; returns (y, vjp) like torch.func.vjp.

        ``dx, dweight, dbias = vjp(dy)``; the server holds the context until
        then (one use; the oldest contexts are evicted when too many are held).
        """
        y, handle = self._forward(x, keep_for_backward=True)
        return y, VJP(self, handle)

    def _forward(self, x: Any, keep_for_backward: bool) -> tuple[np.ndarray, str]:
        """(output, backward handle), streamed in chunks when `x` is large."""
        array = _as_input(x)
        request = pb.ForwardRequest(
            ref=self._ref, keep_for_backward=keep_for_backward, request_id=uuid.uuid4().hex
        )
        retry = True  # the request id makes a retry apply at most once
        if array.nbytes > self._client.stream_threshold:
            sent = wire.encode_header(array, request.input)
            header, y = self._client._stream(
                "StreamForward",
                lambda: wire.send(pb.ForwardChunk, request, sent),
                lambda h: h.output,
                retry,
            )
            return y, header.backward_handle
        wire.encode(array, request.input)
        reply: pb.ForwardResponse = self._client._call("Forward", request, retry)
        return np.array(wire.decode(reply.output)), reply.backward_handle

    # -- mode ---------------------------------------------------------------

    def train(self, mode: bool = True) -> BatchNorm:
        """Set training mode on the server's module; returns self."""
        self._client._call("SetTraining", pb.SetTrainingRequest(ref=self._ref, training=mode))
        return self

    def eval(self) -> BatchNorm:
        """Set evaluation mode (running statistics); returns self."""
        return self.train(False)

    @property
    def training(self) -> bool:
        info: pb.ModuleInfo = self._client._call("GetModule", pb.GetModuleRequest(ref=self._ref))
        return info.training

    # -- state --------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the module's present entries, float32 (1, C, 1, 1)."""
        reply = self._client._call("GetState", pb.GetStateRequest(ref=self._ref))
        return {
            k: np.array(wire.decode(getattr(reply, k))) for k in STATE_KEYS if reply.HasField(k)
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Load (1, C, 1, 1) or (C,) arrays; with strict, exactly the module's entries."""
        request = pb.LoadStateRequest(ref=self._ref, strict=strict)
        for key, value in state.items():
            if key not in STATE_KEYS:
                raise errors.InvalidArgumentError(
                    f"unexpected state entry {key!r}; entries are {list(STATE_KEYS)}"
                )
            if value is not None:
                wire.encode(_as_input(value), getattr(request.state, key))
        self._client._call("LoadState", request)

    def _entry(self, key: str) -> np.ndarray | None:
        return self.state_dict().get(key)

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

    def reset_running_stats(self) -> None:
        self._client._call("ResetRunningStats", pb.ResetRequest(ref=self._ref))

    def reset_parameters(self) -> None:
        """reset_running_stats(), then weight to ones and bias to zeros."""
        self._client._call("ResetParameters", pb.ResetRequest(ref=self._ref))


class BatchNorm1d(BatchNorm):
    """BatchNorm over (N, C) or (N, C, L) input."""


class BatchNorm2d(BatchNorm):
    """BatchNorm over (N, C, H, W) input."""


class SyncBatchNorm(BatchNorm):
    """One rank of a SyncBatchNorm group: batch statistics span every rank's batch.

    In training (or with track_running_stats=False) each call waits for the
    other ranks' calls of the same step; eval with running statistics and
    freeze=True run alone. A forward whose reply was lost is retried with its
    request id and gets its round's committed result.
    """

    def __init__(self, client: Client, info: pb.ModuleInfo) -> None:
        super().__init__(client, info)
        s = info.config.sync
        self.group: str = s.group
        self.rank: int = s.rank
        self.world_size: int = s.world_size
        self.eps_mode: str = "max" if s.eps_mode == pb.EPS_MODE_MAX else "additive"

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


class VJP:
    """The backward of one `BatchNorm.vjp` forward; call it once with dy."""

    def __init__(self, module: BatchNorm, handle: str) -> None:
        self._module = module
        self.handle = handle

    def __call__(self, dy: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Return (dx, dweight, dbias); dweight and dbias are None without affine or with freeze."""
        client = self._module._client
        grad = _as_input(dy)
        request = pb.BackwardRequest(ref=self._module._ref, backward_handle=self.handle)
        reply: pb.BackwardResponse
        if grad.nbytes > client.stream_threshold:
            sent = wire.encode_header(grad, request.grad_output)
            reply, dx = client._stream(
                "StreamBackward",
                lambda: wire.send(pb.BackwardChunk, request, sent),
                lambda h: h.grad_input,
            )
        else:
            wire.encode(grad, request.grad_output)
            reply = client._call("Backward", request)
            dx = np.array(wire.decode(reply.grad_input))
        if not reply.HasField("grad_weight"):
            return dx, None, None
        return dx, np.array(wire.decode(reply.grad_weight)), np.array(wire.decode(reply.grad_bias))
