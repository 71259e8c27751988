"""gRPC servicer for bnservice.v1.BatchNormService: decode, call the engine, encode.

Domain errors become status codes through the one table in `bnserver.rpc.status`.
A forward or backward opens its engine step as soon as it knows its module,
before decoding the tensor, so that a tensor refused here aborts a
SyncBatchNorm round for the peers like any other failure of the step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from bnserver.calls import CallContext
from bnserver.engine import Engine
from bnserver.errors import DeadlineExceeded, InvalidArgument
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
from bnserver.rpc.observe import message_record, note_shared
from bnserver.rpc.shell import NO_DEADLINE, call_context, rpc, rpc_stream
from bnserver.rpc.shm import SharedMemory, host_id
from bnserver.rpc.status import status_of
from bnserver.state.registry import ModuleKey
from bnserver.sync.ticket import Phase
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class BatchNormServicer(pb_grpc.BatchNormServiceServicer):
    """Thin shell over an Engine.

    shm: the same-host shared-memory segments (None: shared memory off).
    idle_timeout: the server's --idle-timeout, told to clients by Describe.
    """

    def __init__(
        self,
        engine: Engine,
        auth: Authenticator | None = None,
        shm: SharedMemory | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.engine = engine
        self.limits = engine.limits
        self.auth = auth if auth is not None else Authenticator()
        self.shm = shm
        self.idle_timeout = idle_timeout
        self.host_id = host_id()

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

    def _forward_step(self, key: ModuleKey, request: pb.ForwardRequest, call: CallContext) -> Any:
        training = request.training if request.HasField("training") else None
        return self.engine.step(key, Phase.FORWARD, call, training)

    def _forward_reply(
        self, key: ModuleKey, request: pb.ForwardRequest, handle: str
    ) -> pb.ForwardResponse:
        reply = pb.ForwardResponse(backward_handle=handle)
        if request.return_running_stats:
            state_to_pb(self.engine.running_stats(key), reply.running_stats)
        return reply

    @contextlib.contextmanager
    def _region(
        self, tenant: str, region: pb.SharedRegion, tensor: pb.Tensor, what: str
    ) -> Iterator[np.ndarray]:
        if self.shm is None:
            raise InvalidArgument(f"{what}: this server does not use shared memory")
        with self.shm.region(tenant, region, tensor, what) as view:
            note_shared(view.nbytes)
            yield view

    def _forward(
        self, key: ModuleKey, request: pb.ForwardRequest, call: CallContext
    ) -> pb.ForwardResponse:
        """One forward: the input inline or in a shared region (output written over it)."""
        with self._forward_step(key, request, call) as step:
            if not request.HasField("input_region"):
                x = decode(request.input, self.limits, "input")
                params = params_from_pb(request, self.limits)
                y, handle = self.engine.forward(
                    key, x, request.keep_for_backward, request.request_id, step, params
                )
                reply = self._forward_reply(key, request, handle)
                wire.encode(y, reply.output)
                return reply
            region = request.input_region
            with self._region(key.tenant, region, request.input, "input") as view:
                params = params_from_pb(request, self.limits)
                # A kept input must not change under its backward: the client reuses
                # its segment, so backward keeps a copy.
                x = np.array(view) if request.keep_for_backward else view
                y, handle = self.engine.forward(
                    key, x, request.keep_for_backward, request.request_id, step, params, view
                )
        reply = self._forward_reply(key, request, handle)
        reply.output.dtype = request.input.dtype
        reply.output.shape.extend(request.input.shape)
        return reply

    def _backward(
        self, key: ModuleKey, request: pb.BackwardRequest, call: CallContext
    ) -> pb.BackwardResponse:
        """One backward: grad_output inline or in a shared region (dx written over it)."""
        reply = pb.BackwardResponse()
        with self.engine.step(key, Phase.BACKWARD, call) as step:
            if request.HasField("grad_output_region"):
                region, meta = request.grad_output_region, request.grad_output
                with self._region(key.tenant, region, meta, "grad_output") as view:
                    grads = self.engine.backward(key, request.backward_handle, view, step, view)
                reply.grad_input.dtype = meta.dtype
                reply.grad_input.shape.extend(meta.shape)
            else:
                dy = decode(request.grad_output, self.limits, "grad_output")
                grads = self.engine.backward(key, request.backward_handle, dy, step)
                wire.encode(grads.grad_input, reply.grad_input)
        if grads.grad_weight is not None and grads.grad_bias is not None:
            wire.encode(grads.grad_weight, reply.grad_weight)
            wire.encode(grads.grad_bias, reply.grad_bias)
        return reply

    @rpc
    def Forward(self, request: pb.ForwardRequest, context: Any) -> pb.ForwardResponse:
        key = self._key(request.ref, context)
        return self._forward(key, request, call_context(context))

    @rpc
    def Backward(self, request: pb.BackwardRequest, context: Any) -> pb.BackwardResponse:
        key = self._key(request.ref, context)
        return self._backward(key, request, call_context(context))

    @rpc
    def Describe(self, request: pb.DescribeRequest, context: Any) -> pb.ServerDescription:
        self.auth.tenant(context)  # only the server's tenants learn where its socket is
        reply = pb.ServerDescription(host_id=self.host_id, pid=os.getpid())
        if self.shm is not None:
            reply.instance = self.shm.instance
            reply.shm_socket = str(self.shm.path)
        reply.idle_timeout = self.idle_timeout or 0.0
        return reply

    @rpc_stream
    def Session(
        self, request_iterator: Iterator[pb.SessionRequest], context: Any
    ) -> Iterator[pb.SessionReply]:
        tenant = self.auth.tenant(context)
        stream = call_context(context)
        for request in request_iterator:
            yield self._session_message(request, tenant, stream)

    def _session_message(
        self, request: pb.SessionRequest, tenant: str, stream: CallContext
    ) -> pb.SessionReply:
        """One message of a Session: its call, its own status, its own access-log line."""
        which = request.WhichOneof("call")
        inner: Any = request.forward if which == "forward" else request.backward
        reply = pb.SessionReply()
        status = grpc.StatusCode.OK
        with message_record("Backward" if which == "backward" else "Forward", inner) as record:
            record.bytes_in = request.ByteSize()
            try:
                if which is None:
                    raise InvalidArgument("a session message carries a forward or a backward")
                # The message's own deadline, within the stream's; the stream's
                # cancellation cancels it.
                deadline = stream.deadline
                if 0 < request.timeout < NO_DEADLINE:
                    mine = time.monotonic() + request.timeout
                    deadline = mine if deadline is None else min(deadline, mine)
                call = CallContext(deadline, stream.cancelled)
                if call.expired():
                    raise DeadlineExceeded("the message's deadline passed before it ran")
                key = key_from_pb(inner.ref, tenant)
                if which == "forward":
                    reply.forward.CopyFrom(self._forward(key, inner, call))
                else:
                    reply.backward.CopyFrom(self._backward(key, inner, call))
            except Exception as exc:
                if stream.cancelled.is_set():
                    raise  # the stream has gone: end it, as a unary call would
                status, message = status_of(exc)
                if status is grpc.StatusCode.INTERNAL:
                    log.exception("Session %s failed", which)
                exc.__traceback__ = None  # no handler frames (and their buffers) kept
                reply.Clear()
                reply.code, reply.message = status.value[0], message
            record.code = status.name
            record.bytes_out = reply.ByteSize()
        return reply

    @rpc_stream
    def StreamForward(
        self, request_iterator: Iterator[pb.ForwardChunk], context: Any
    ) -> Iterator[pb.ForwardReplyChunk]:
        request, first = wire.receive_header(request_iterator)
        key = self._key(request.ref, context)
        with self._forward_step(key, request, call_context(context)) as step:
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
