"""gRPC servicer for bnservice.v1.BatchNormService: decode, call the engine, encode.

Domain errors become status codes here, in one table (DESIGN.md section 5).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from bnserver import errors
from bnserver.engine import Engine
from bnserver.protocol import (
    config_from_pb,
    decode,
    info_to_pb,
    key_from_pb,
    state_from_pb,
    state_to_pb,
)
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: The one mapping from domain errors to gRPC status codes.
STATUS_CODES: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed call answers with."""
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)  # type: ignore[call-overload]
        if code is not None:
            return code, str(exc)
    if isinstance(exc, wire.WireError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


F = TypeVar("F", bound=Callable[..., Any])


def rpc(method: F) -> F:
    """Wrap a servicer method so every exception ends the call with a mapped status."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            code, message = status_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method.__name__)
            context.abort(code, message)

    return wrapper  # type: ignore[return-value]


class BatchNormServicer(pb_grpc.BatchNormServiceServicer):
    """Thin shell over an Engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @rpc
    def CreateModule(self, request: pb.CreateModuleRequest, context: Any) -> pb.ModuleInfo:
        config = config_from_pb(request.config)
        return info_to_pb(self.engine.create(key_from_pb(request.ref), config))

    @rpc
    def GetModule(self, request: pb.GetModuleRequest, context: Any) -> pb.ModuleInfo:
        return info_to_pb(self.engine.get(key_from_pb(request.ref)))

    @rpc
    def ListModules(self, request: pb.ListModulesRequest, context: Any) -> pb.ListModulesResponse:
        reply = pb.ListModulesResponse()
        for info in self.engine.list():
            info_to_pb(info, reply.modules.add())
        return reply

    @rpc
    def DeleteModule(
        self, request: pb.DeleteModuleRequest, context: Any
    ) -> pb.DeleteModuleResponse:
        self.engine.delete(key_from_pb(request.ref))
        return pb.DeleteModuleResponse()

    @rpc
    def Forward(self, request: pb.ForwardRequest, context: Any) -> pb.ForwardResponse:
        x = decode(request.input)
        y, handle = self.engine.forward(key_from_pb(request.ref), x, request.keep_for_backward)
        reply = pb.ForwardResponse(backward_handle=handle)
        wire.encode(y, reply.output)
        return reply

    @rpc
    def Backward(self, request: pb.BackwardRequest, context: Any) -> pb.BackwardResponse:
        dy = decode(request.grad_output)
        grads = self.engine.backward(key_from_pb(request.ref), request.backward_handle, dy)
        reply = pb.BackwardResponse()
        wire.encode(grads.grad_input, reply.grad_input)
        if grads.grad_weight is not None and grads.grad_bias is not None:
            wire.encode(grads.grad_weight, reply.grad_weight)
            wire.encode(grads.grad_bias, reply.grad_bias)
        return reply

    @rpc
    def SetTraining(self, request: pb.SetTrainingRequest, context: Any) -> pb.ModuleInfo:
        return info_to_pb(self.engine.set_training(key_from_pb(request.ref), request.training))

    @rpc
    def GetState(self, request: pb.GetStateRequest, context: Any) -> pb.ModuleState:
        return state_to_pb(self.engine.state(key_from_pb(request.ref)))

    @rpc
    def LoadState(self, request: pb.LoadStateRequest, context: Any) -> pb.ModuleInfo:
        state = state_from_pb(request.state)
        key = key_from_pb(request.ref)
        return info_to_pb(self.engine.load_state(key, state, request.strict))

    @rpc
    def ResetRunningStats(self, request: pb.ResetRequest, context: Any) -> pb.ModuleInfo:
        return info_to_pb(self.engine.reset_running_stats(key_from_pb(request.ref)))

    @rpc
    def ResetParameters(self, request: pb.ResetRequest, context: Any) -> pb.ModuleInfo:
        return info_to_pb(self.engine.reset_parameters(key_from_pb(request.ref)))
