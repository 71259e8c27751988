"""gRPC servicer for bnservice.v1.CoordinatorService: decode, call the Coordinator, encode.

Only peers (servers) call it; `bnserver.rpc.auth` refuses tenants' tokens
before a call gets here. A part that does not decode aborts its round for
the peers: the servicer runs it as a `SyncStep`, like a server's own step.

`Rounds` is the stream servers use: parts arrive tagged with ids and are given
to the coordinator without waiting (one reader thread per stream); each round's
end is sent back, tagged, as soon as it ends.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from bnserver.rpc.codec import contribution_from_pb, outcome_to_pb, ticket_from_pb
from bnserver.rpc.shell import rpc, rpc_stream
from bnserver.rpc.status import status_of
from bnserver.sync.step import Reducer, SyncStep
from bnserver.sync.ticket import Outcome
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """Thin shell over a Coordinator (any Reducer; `Rounds` needs one that can `submit`).
    Each waiting Reduce holds one server thread; a Rounds stream holds two."""

    def __init__(self, coordinator: Reducer) -> None:
        self.coordinator = coordinator

    @rpc
    def Reduce(self, request: pb.ReduceRequest, context: Any) -> pb.ReduceResponse:
        ticket = ticket_from_pb(request.ticket)
        with SyncStep(ticket, self.coordinator) as step:
            part = contribution_from_pb(request)
            return outcome_to_pb(step.reduce(part))

    @rpc_stream
    def Rounds(
        self, request_iterator: Iterator[pb.RoundPart], context: Any
    ) -> Iterator[pb.RoundEnd]:
        ends: queue.SimpleQueue[pb.RoundEnd | Exception | None] = queue.SimpleQueue()

        def read() -> None:
            try:
                for message in request_iterator:
                    self._give(message, ends.put)
                ends.put(None)
            except Exception as exc:  # bytes that do not parse, or the stream's end
                ends.put(exc)

        threading.Thread(target=read, name="coordinator-rounds-reader", daemon=True).start()
        while (end := ends.get()) is not None:
            if isinstance(end, Exception):
                raise end
            yield end

    def _give(self, message: pb.RoundPart, send: Callable[[pb.RoundEnd], None]) -> None:
        """Give one streamed part to the coordinator; `send` its round's end, tagged."""
        tag = message.id

        def done(outcome: Outcome | None, error: Exception | None) -> None:
            send(_round_end(tag, outcome, error))

        try:
            ticket = ticket_from_pb(message.part.ticket)
            with SyncStep(ticket, self.coordinator) as step:
                step.submit(contribution_from_pb(message.part), done)
        except Exception as exc:
            done(None, exc)

    @rpc
    def Abort(self, request: pb.AbortRequest, context: Any) -> pb.AbortResponse:
        self.coordinator.abort(ticket_from_pb(request.ticket), request.reason)
        return pb.AbortResponse()


def _round_end(tag: int, outcome: Outcome | None, error: Exception | None) -> pb.RoundEnd:
    if error is not None:
        code, message = status_of(error)
        return pb.RoundEnd(id=tag, code=code.value[0], message=message)
    assert outcome is not None
    return pb.RoundEnd(id=tag, outcome=outcome_to_pb(outcome))
