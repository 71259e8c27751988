"""`RemoteCoordinator`: the `bnserver.sync.step.Reducer` of a server started with
`--coordinator HOST:PORT`.

One long-lived channel per server, and on it one long-lived `Rounds` stream:
each part goes up tagged with an id and its round's end comes back with it, so
a part costs a message, not a call (a unary call per part spends most of a
round in gRPC's per-call work). A stream that breaks fails its parts in flight
with UNAVAILABLE and is reopened by the next part. The channel reconnects
quickly after a coordinator restart (backoff capped at `RECONNECT_MAX_MS`) and
fails fast while the coordinator is down, so a step during an outage answers
UNAVAILABLE at once and the first step after it succeeds.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from bnserver.errors import Aborted, DeadlineExceeded, Unavailable
from bnserver.rpc.codec import outcome_from_pb, reduce_request, ticket_to_pb
from bnserver.rpc.status import error_for
from bnserver.sync.ticket import Contribution, Outcome, Ticket
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

#: Extra seconds a server waits on the coordinator beyond the round timeout,
#: so that the coordinator's own, more informative, timeout arrives first.
DEADLINE_MARGIN = 5.0

#: Longest pause between reconnection attempts to a coordinator that is down.
RECONNECT_MAX_MS = 1000

_OPTIONS = [
    # Contributions are O(C) float64 numbers; this admits C up to a few million.
    ("grpc.max_receive_message_length", 1 << 28),
    ("grpc.max_send_message_length", 1 << 28),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


#: gRPC status codes by number (a RoundEnd carries the number).
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _stream_error(err: grpc.RpcError) -> Exception:
    """The domain error for a broken Rounds stream: Unavailable when the coordinator is
    gone (its parts' rounds are lost), else the coordinator's refusal (say, a bad token)."""
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
        return Unavailable(f"the stream to the coordinator broke ({details})")
    return error_for(code, details)


class _RoundStream:
    """One Rounds stream: parts sent with ids, their ends matched back to futures."""

    def __init__(self, stub: pb_grpc.CoordinatorServiceStub, metadata: tuple[tuple[str, str], ...]):
        self._outbox: queue.SimpleQueue[pb.RoundPart | None] = queue.SimpleQueue()
        self._pending: dict[int, Future[pb.RoundEnd]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.broken: Exception | None = None
        self._call = stub.Rounds(self._parts(), metadata=metadata)
        threading.Thread(target=self._read, name="coordinator-rounds", daemon=True).start()

    def _parts(self) -> Iterator[pb.RoundPart]:
        while (part := self._outbox.get()) is not None:
            yield part

    def send(self, request: pb.ReduceRequest) -> Future[pb.RoundEnd]:
        future: Future[pb.RoundEnd] = Future()
        with self._lock:
            if self.broken is not None:
                raise self.broken
            tag = next(self._ids)
            self._pending[tag] = future
        self._outbox.put(pb.RoundPart(id=tag, part=request))
        return future

    def _read(self) -> None:
        broken: Exception = Unavailable("the stream to the coordinator ended")
        try:
            for end in self._call:
                with self._lock:
                    future = self._pending.pop(end.id, None)
                if future is not None:
                    future.set_result(end)
        except grpc.RpcError as err:
            broken = _stream_error(err)
        finally:
            with self._lock:
                self.broken = broken
                pending, self._pending = self._pending, {}
            self._outbox.put(None)  # ends gRPC's thread that reads our parts
            for future in pending.values():
                future.set_exception(broken)

    def close(self) -> None:
        self._outbox.put(None)
        self._call.cancel()  # type: ignore[attr-defined,no-untyped-call]


class RemoteCoordinator:
    """A Reducer backed by the coordinator at `target` ("host:port").

    timeout: the coordinator's round timeout; a part waits a margin longer.
    credentials: TLS channel credentials when the coordinator speaks TLS.
    token: the peer token (the coordinator's --peer-token-file) when it needs one.
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
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=_OPTIONS)
        self._stub = pb_grpc.CoordinatorServiceStub(self._channel)
        self._lock = threading.Lock()
        self._stream: _RoundStream | None = None

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()
        self._channel.close()

    def _rounds(self) -> _RoundStream:
        """The open Rounds stream, or a new one if there is none or it broke."""
        with self._lock:
            if self._stream is None or self._stream.broken is not None:
                if self._stream is not None:
                    self._stream.close()
                self._stream = _RoundStream(self._stub, self._metadata)
            return self._stream

    def contribute(self, ticket: Ticket, part: Contribution) -> Outcome:
        """Send this rank's part and wait for the round's outcome.

        The wait is bounded by the round timeout, not by the caller: once
        given, a part stays in its round, and this server applies the outcome
        whether or not its caller is still waiting.
        """
        try:
            future = self._rounds().send(reduce_request(ticket, part))
            end = future.result(timeout=self.timeout + DEADLINE_MARGIN)
        except Unavailable as exc:
            raise Unavailable(
                f"{ticket}: coordinator {self.target} unavailable ({exc}); "
                f"this rank applied nothing, retry the step"
            ) from None
        except FutureTimeout:
            raise DeadlineExceeded(
                f"{ticket}: coordinator {self.target} did not answer within "
                f"{self.timeout + DEADLINE_MARGIN:g} s"
            ) from None
        if end.code != 0:
            code = _CODES.get(end.code, grpc.StatusCode.UNKNOWN)
            if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                raise Aborted(f"{ticket} lost: coordinator {self.target} failed ({end.message})")
            raise error_for(code, end.message)
        return outcome_from_pb(end.outcome)

    def abort(self, ticket: Ticket, reason: str) -> None:
        request = pb.AbortRequest(reason=reason)
        ticket_to_pb(ticket, request.ticket)
        # Best effort: if the abort is lost, the peers still time out.
        with contextlib.suppress(grpc.RpcError):
            self._stub.Abort(request, timeout=DEADLINE_MARGIN, metadata=self._metadata)
