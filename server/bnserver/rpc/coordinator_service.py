"""gRPC servicer for bnservice.v1.CoordinatorService: decode, call the Coordinator, encode.

Only peers (servers) call it; `bnserver.rpc.auth` refuses tenants' tokens
before a call gets here. A part that does not decode aborts its round for
the peers: the servicer runs it as a `SyncStep`, like a server's own step.
"""

from __future__ import annotations

from typing import Any

from bnserver.rpc.codec import contribution_from_pb, outcome_to_pb, ticket_from_pb
from bnserver.rpc.shell import rpc
from bnserver.sync.step import Reducer, SyncStep
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """Thin shell over a Coordinator (any Reducer); each waiting call holds one server thread."""

    def __init__(self, coordinator: Reducer) -> None:
        self.coordinator = coordinator

    @rpc
    def Reduce(self, request: pb.ReduceRequest, context: Any) -> pb.ReduceResponse:
        ticket = ticket_from_pb(request.ticket)
        with SyncStep(ticket, self.coordinator) as step:
            part = contribution_from_pb(request)
            return outcome_to_pb(step.reduce(part))

    @rpc
    def Abort(self, request: pb.AbortRequest, context: Any) -> pb.AbortResponse:
        self.coordinator.abort(ticket_from_pb(request.ticket), request.reason)
        return pb.AbortResponse()
