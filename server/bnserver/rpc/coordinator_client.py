"""`RemoteCoordinator`: the `bnserver.sync.step.Reducer` of a server started with
`--coordinator HOST:PORT`.

One long-lived channel per server; each part is one blocking unary call
(measured faster than a future, which starts a polling thread per call). The
channel reconnects quickly after a coordinator restart (backoff capped at
`RECONNECT_MAX_MS`) and fails fast while the coordinator is down, so a step
during an outage answers UNAVAILABLE at once and the first step after it
succeeds.
"""

from __future__ import annotations

import contextlib

import grpc

from bnserver.errors import Aborted, Unavailable
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


class RemoteCoordinator:
    """A Reducer backed by the coordinator at `target` ("host:port").

    timeout: the coordinator's round timeout; calls wait a margin longer.
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
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=_OPTIONS)
        self._stub = pb_grpc.CoordinatorServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def contribute(self, ticket: Ticket, part: Contribution) -> Outcome:
        """Send this rank's part and wait for the round's outcome.

        The wait is bounded by the round timeout, not by the caller: once
        given, a part stays in its round, and this server applies the outcome
        whether or not its caller is still waiting.
        """
        request = reduce_request(ticket, part)
        try:
            reply = self._stub.Reduce(
                request, timeout=self.timeout + DEADLINE_MARGIN, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise self._error(err, ticket) from None
        return outcome_from_pb(reply)

    def abort(self, ticket: Ticket, reason: str) -> None:
        request = pb.AbortRequest(reason=reason)
        ticket_to_pb(ticket, request.ticket)
        # Best effort: if the abort is lost, the peers still time out.
        with contextlib.suppress(grpc.RpcError):
            self._stub.Abort(request, timeout=DEADLINE_MARGIN, metadata=self._metadata)

    def _error(self, err: grpc.RpcError, ticket: Ticket) -> Exception:
        code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return Unavailable(
                f"{ticket}: coordinator {self.target} unavailable ({details}); "
                f"nothing was applied, retry the step"
            )
        if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
            return Aborted(f"{ticket} lost: coordinator {self.target} failed ({details})")
        return error_for(code, details)
