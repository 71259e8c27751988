"""The coordinator over gRPC: its servicer, and the client servers use to reach it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable
from typing import Any

import grpc
import numpy as np

from bnserver.calls import CallContext
from bnserver.config import MAX_WORLD_SIZE
from bnserver.coordinator import Contribution, Coordinator, Phase, RoundKey
from bnserver.errors import Aborted, InvalidArgument
from bnserver.protocol import decode
from bnserver.status import call_context, error_for, rpc
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

_PHASES = {pb.PHASE_FORWARD: Phase.FORWARD, pb.PHASE_BACKWARD: Phase.BACKWARD}
_PHASE_CODES = {phase: code for code, phase in _PHASES.items()}

#: Contributions are O(C) float64 numbers; this admits C up to a few million.
_OPTIONS = [
    ("grpc.max_receive_message_length", 1 << 28),
    ("grpc.max_send_message_length", 1 << 28),
]

#: Extra seconds a server waits on the coordinator beyond the round timeout,
#: so that the coordinator's own, more informative, timeout arrives first.
DEADLINE_MARGIN = 5.0


def _round_key(ref: pb.RoundRef) -> RoundKey:
    phase = _PHASES.get(ref.phase)
    if phase is None:
        raise InvalidArgument(f"unknown phase {ref.phase}")
    if not ref.group or not ref.module:
        raise InvalidArgument("a round needs a group and a module name")
    return RoundKey(ref.group, ref.module, phase)


def _contribution(request: pb.ReduceRequest) -> tuple[Contribution, tuple[int, ...]]:
    """The request's numbers, and the vector shape (part of what ranks must agree on)."""
    vectors = tuple(decode(v) for v in request.vectors)
    if len(vectors) != 2:
        raise InvalidArgument(f"a contribution carries 2 vectors, got {len(vectors)}")
    shape = vectors[0].shape
    if len(shape) != 1 or any(v.shape != shape or v.dtype != np.float64 for v in vectors):
        raise InvalidArgument("contribution vectors must be float64 of one shape (C,)")
    return Contribution(request.count, vectors), shape


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """Thin shell over a Coordinator; each waiting call holds one server thread."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    @rpc
    def Reduce(self, request: pb.ReduceRequest, context: Any) -> pb.ReduceResponse:
        key = _round_key(request.round)
        try:
            part, shape = _contribution(request)
        except InvalidArgument as exc:
            # This rank cannot take part: fail its round for the peers at once.
            if 1 <= request.world_size <= MAX_WORLD_SIZE and 0 <= request.rank < request.world_size:
                self.coordinator.abort(key, request.rank, request.world_size, str(exc))
            raise
        signature = (request.signature, shape)
        merged = self.coordinator.contribute(
            key, request.rank, request.world_size, signature, part, call_context(context)
        )
        reply = pb.ReduceResponse(count=merged.count)
        for vector in merged.vectors:
            wire.encode(vector, reply.vectors.add())
        return reply

    @rpc
    def Abort(self, request: pb.AbortRequest, context: Any) -> pb.AbortResponse:
        key = _round_key(request.round)
        self.coordinator.abort(key, request.rank, request.world_size, request.reason)
        return pb.AbortResponse()


class RemoteCoordinator:
    """A `bnserver.sync.Reducer` backed by a coordinator at `target` ("host:port").

    timeout: the coordinator's round timeout; calls wait a margin longer.
    credentials: TLS channel credentials when the coordinator speaks TLS.
    token: bearer token when the coordinator requires one.
    """

    def __init__(
        self,
        target: str,
        timeout: float = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=_OPTIONS)
        self._stub = pb_grpc.CoordinatorServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def contribute(
        self,
        key: RoundKey,
        rank: int,
        world_size: int,
        signature: Hashable,
        part: Contribution,
        call: CallContext | None = None,
    ) -> Contribution:
        """Send this rank's part and wait for the merged result.

        The caller's deadline travels with the request, and its cancellation
        cancels it, so the coordinator withdraws the part of a call that failed.
        """
        request = pb.ReduceRequest(
            round=self._round_ref(key),
            rank=rank,
            world_size=world_size,
            signature=str(signature),
            count=part.count,
        )
        for vector in part.vectors:
            wire.encode(vector, request.vectors.add())
        timeout = self.timeout + DEADLINE_MARGIN
        remaining = None if call is None else call.remaining()
        if remaining is not None:
            timeout = min(timeout, max(remaining, 0.0))
        future = self._stub.Reduce.future(request, timeout=timeout, metadata=self._metadata)
        if call is not None:
            done = threading.Event()
            future.add_done_callback(lambda _: done.set())  # type: ignore[no-untyped-call]
            # Wake at once when the round completes; check for cancellation meanwhile.
            while not done.wait(Coordinator.POLL_SECONDS):
                if call.cancelled.is_set():
                    future.cancel()  # type: ignore[no-untyped-call]
                    raise Aborted(f"{key}: the call was cancelled while waiting for peers")
        try:
            reply = future.result()
        except grpc.RpcError as err:
            raise self._error(err, key) from None
        return Contribution(reply.count, tuple(np.array(decode(v)) for v in reply.vectors))

    def abort(self, key: RoundKey, rank: int, world_size: int, reason: str) -> None:
        request = pb.AbortRequest(
            round=self._round_ref(key), rank=rank, world_size=world_size, reason=reason
        )
        # Best effort: if the abort is lost, the peers still time out.
        with contextlib.suppress(grpc.RpcError):
            self._stub.Abort(request, timeout=DEADLINE_MARGIN, metadata=self._metadata)

    @staticmethod
    def _round_ref(key: RoundKey) -> pb.RoundRef:
        return pb.RoundRef(group=key.group, module=key.module, phase=_PHASE_CODES[key.phase])

    def _error(self, err: grpc.RpcError, key: RoundKey) -> Exception:
        code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
        if code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.UNKNOWN,
        ):
            # The coordinator went away (restart, crash, network): the round is lost.
            return Aborted(f"{key} lost: coordinator {self.target} unavailable ({details})")
        return error_for(code, details)
