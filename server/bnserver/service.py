"""gRPC servicer for bnservice.v1.BatchNormService: decode, call the engine, encode.

Domain errors become status codes through the one table in `bnserver.status`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from bnserver.auth import Authenticator
from bnserver.engine import Engine
from bnserver.errors import ServiceError
from bnserver.protocol import (
    config_from_pb,
    decode,
    info_to_pb,
    key_from_pb,
    state_from_pb,
    state_to_pb,
)
from bnserver.registry import ModuleKey
from bnserver.status import call_context, rpc, rpc_stream
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

    def _decode(
        self, tensor: pb.Tensor, ref: pb.ModuleRef, context: Any, backward: bool
    ) -> np.ndarray:
        """Decode a request's tensor; if it is refused, a sync module's peers hear at once."""
        try:
            return decode(tensor, self.limits)
        except ServiceError as exc:
            self.engine.abandon(self._key(ref, context), backward, str(exc))
            raise

    def _receive(
        self,
        chunks: Iterator[Any],
        tensor_of: Callable[[Any], pb.Tensor],
        context: Any,
        backward: bool,
    ) -> tuple[Any, np.ndarray]:
        """`wire.receive` a chunk stream, telling a sync module's peers if it is refused."""
        headers: list[Any] = []

        def declared(header: Any) -> pb.Tensor:
            headers.append(header)
            return tensor_of(header)

        try:
            return wire.receive(chunks, declared, self.limits.check_tensor)
        except (ServiceError, wire.WireError) as exc:
            if headers:
                self.engine.abandon(self._key(headers[0].ref, context), backward, str(exc))
            raise

    @rpc
    def Forward(self, request: pb.ForwardRequest, context: Any) -> pb.ForwardResponse:
        x = self._decode(request.input, request.ref, context, backward=False)
        key = self._key(request.ref, context)
        y, handle = self.engine.forward(
            key, x, request.keep_for_backward, call_context(context), request.request_id[:128]
        )
        reply = pb.ForwardResponse(backward_handle=handle)
        wire.encode(y, reply.output)
        return reply

    @rpc
    def Backward(self, request: pb.BackwardRequest, context: Any) -> pb.BackwardResponse:
        dy = self._decode(request.grad_output, request.ref, context, backward=True)
        key = self._key(request.ref, context)
        grads = self.engine.backward(key, request.backward_handle, dy, call_context(context))
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
        request, x = self._receive(request_iterator, lambda h: h.input, context, backward=False)
        key = self._key(request.ref, context)
        y, handle = self.engine.forward(
            key, x, request.keep_for_backward, call_context(context), request.request_id[:128]
        )
        reply = pb.ForwardResponse(backward_handle=handle)
        yield from wire.send(pb.ForwardReplyChunk, reply, wire.encode_header(y, reply.output))

    @rpc_stream
    def StreamBackward(
        self, request_iterator: Iterator[pb.BackwardChunk], context: Any
    ) -> Iterator[pb.BackwardReplyChunk]:
        request, dy = self._receive(
            request_iterator, lambda h: h.grad_output, context, backward=True
        )
        key = self._key(request.ref, context)
        grads = self.engine.backward(key, request.backward_handle, dy, call_context(context))
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
        return state_to_pb(self.engine.state(self._key(request.ref, context)))

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
