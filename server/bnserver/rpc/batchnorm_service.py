"""gRPC servicer for bnservice.v1.BatchNormService: decode, call the engine, encode.

Domain errors become status codes through the one table in `bnserver.rpc.status`.
A forward or backward opens its engine step as soon as it knows its module,
before decoding the tensor, so that a tensor refused here aborts a
SyncBatchNorm round for the peers like any other failure of the step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bnserver.engine import Engine
from bnserver.rpc.auth import Authenticator
from bnserver.rpc.codec import (
    config_from_pb,
    decode,
    info_to_pb,
    key_from_pb,
    params_from_pb,
    require,
    state_from_pb,
    state_to_pb,
)
from bnserver.rpc.shell import call_context, rpc, rpc_stream
from bnserver.state.registry import ModuleKey
from bnserver.sync.ticket import Phase
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc


class BatchNormServicer(pb_grpc.BatchNormServiceServicer):
    """Thin shell over an Engine."""

    def __init__(self, engine: Engine, auth: Authenticator | None = None) -> None:
        self.engine = engine
        self.limits = engine.limits
        self.auth = auth if auth is not None else Authenticator()

    def _key(self, ref: pb.ModuleRef, context: Any) -> ModuleKey:
        """The module a request names, in the namespace of the caller's tenant."""
        return key_from_pb(ref, self.auth.tenant(context))

    @rpc
    def CreateModule(self, request: pb.CreateModuleRequest, context: Any) -> pb.ModuleInfo:
        config = config_from_pb(request.config)
        return info_to_pb(self.engine.create(self._key(request.ref, context), config))

    @rpc
    def GetModule(self, request: pb.GetModuleRequest, context: Any) -> pb.ModuleInfo:
        return info_to_pb(self.engine.get(self._key(request.ref, context)))

    @rpc
    def ListModules(self, request: pb.ListModulesRequest, context: Any) -> pb.ListModulesResponse:
        reply = pb.ListModulesResponse()
        for info in self.engine.list(self.auth.tenant(context)):
            info_to_pb(info, reply.modules.add())
        return reply

    @rpc
    def DeleteModule(
        self, request: pb.DeleteModuleRequest, context: Any
    ) -> pb.DeleteModuleResponse:
        self.engine.delete(self._key(request.ref, context))
        return pb.DeleteModuleResponse()

    def _forward_step(self, key: ModuleKey, request: pb.ForwardRequest, context: Any) -> Any:
        training = request.training if request.HasField("training") else None
        return self.engine.step(key, Phase.FORWARD, call_context(context), training)

    def _forward_reply(
        self, key: ModuleKey, request: pb.ForwardRequest, handle: str
    ) -> pb.ForwardResponse:
        reply = pb.ForwardResponse(backward_handle=handle)
        if request.return_running_stats:
            state_to_pb(self.engine.running_stats(key), reply.running_stats)
        return reply

    @rpc
    def Forward(self, request: pb.ForwardRequest, context: Any) -> pb.ForwardResponse:
        key = self._key(request.ref, context)
        with self._forward_step(key, request, context) as step:
            x = decode(request.input, self.limits, "input")
            params = params_from_pb(request, self.limits)
            y, handle = self.engine.forward(
                key, x, request.keep_for_backward, request.request_id, step, params
            )
        reply = self._forward_reply(key, request, handle)
        wire.encode(y, reply.output)
        return reply

    @rpc
    def Backward(self, request: pb.BackwardRequest, context: Any) -> pb.BackwardResponse:
        key = self._key(request.ref, context)
        with self.engine.step(key, Phase.BACKWARD, call_context(context)) as step:
            dy = decode(request.grad_output, self.limits, "grad_output")
            grads = self.engine.backward(key, request.backward_handle, dy, step)
        reply = pb.BackwardResponse()
        wire.encode(grads.grad_input, reply.grad_input)
        if grads.grad_weight is not None and grads.grad_bias is not None:
            wire.encode(grads.grad_weight, reply.grad_weight)
            wire.encode(grads.grad_bias, reply.grad_bias)
        return reply

    @rpc_stream
    def StreamForward(
        self, request_iterator: Iterator[pb.ForwardChunk], context: Any
    ) -> Iterator[pb.ForwardReplyChunk]:
        request, first = wire.receive_header(request_iterator)
        key = self._key(request.ref, context)
        with self._forward_step(key, request, context) as step:
            params = params_from_pb(request, self.limits)
            x = wire.receive_tensor(
                require(request.input, "input"), first, request_iterator, self.limits.check_tensor
            )
            y, handle = self.engine.forward(
                key, x, request.keep_for_backward, request.request_id, step, params
            )
        reply = self._forward_reply(key, request, handle)
        yield from wire.send(pb.ForwardReplyChunk, reply, wire.encode_header(y, reply.output))

    @rpc_stream
    def StreamBackward(
        self, request_iterator: Iterator[pb.BackwardChunk], context: Any
    ) -> Iterator[pb.BackwardReplyChunk]:
        request, first = wire.receive_header(request_iterator)
        key = self._key(request.ref, context)
        with self.engine.step(key, Phase.BACKWARD, call_context(context)) as step:
            dy = wire.receive_tensor(
                require(request.grad_output, "grad_output"),
                first,
                request_iterator,
                self.limits.check_tensor,
            )
            grads = self.engine.backward(key, request.backward_handle, dy, step)
        reply = pb.BackwardResponse()
        if grads.grad_weight is not None and grads.grad_bias is not None:
            wire.encode(grads.grad_weight, reply.grad_weight)
            wire.encode(grads.grad_bias, reply.grad_bias)
        dx = wire.encode_header(grads.grad_input, reply.grad_input)
        yield from wire.send(pb.BackwardReplyChunk, reply, dx)

    @rpc
    def SetTraining(self, request: pb.SetTrainingRequest, context: Any) -> pb.ModuleInfo:
        return info_to_pb(
            self.engine.set_training(self._key(request.ref, context), request.training)
        )

    @rpc
    def GetState(self, request: pb.GetStateRequest, context: Any) -> pb.ModuleState:
        key = self._key(request.ref, context)
        return state_to_pb(self.engine.state(key, tuple(request.entries)))

    @rpc
    def LoadState(self, request: pb.LoadStateRequest, context: Any) -> pb.ModuleInfo:
        state = state_from_pb(request.state)
        key = self._key(request.ref, context)
        return info_to_pb(self.engine.load_state(key, state, request.strict))

    @rpc
    def ResetRunningStats(self, request: pb.ResetRequest, context: Any) -> pb.ModuleInfo:
        return info_to_pb(self.engine.reset_running_stats(self._key(request.ref, context)))

    @rpc
    def ResetParameters(self, request: pb.ResetRequest, context: Any) -> pb.ModuleInfo:
        return info_to_pb(self.engine.reset_parameters(self._key(request.ref, context)))
