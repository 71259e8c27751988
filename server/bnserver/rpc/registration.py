"""Registering servicers so that request bytes are parsed under our control.

gRPC-Python's generated registration parses requests before our code runs:
bytes that do not parse end a unary call with INTERNAL, and end a request
stream as if it were complete (so a truncated stream could be taken for a
whole one). Here handlers receive the raw bytes and parse them themselves; a
message that does not parse is INVALID_ARGUMENT, and inside a stream it fails
the whole call before anything is applied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from bnserver.errors import InvalidArgument
from bnserver.rpc.observe import note_request
from bnserver.rpc.shell import abort_with
from bnservice.v1 import bnservice_pb2 as pb

Behaviour = Callable[[Any, grpc.ServicerContext], Any]


def _parse(message_type: type[Message], raw: bytes) -> Message:
    try:
        request = message_type.FromString(raw)
    except DecodeError as exc:
        raise InvalidArgument(
            f"request is not a valid {message_type.DESCRIPTOR.full_name} message ({exc})"
        ) from None
    note_request(request)  # the access log names the module
    return request


def _unary(behaviour: Behaviour, message_type: type[Message]) -> Behaviour:
    def handle(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = _parse(message_type, raw)
        except InvalidArgument as exc:
            abort_with(context, exc, message_type.DESCRIPTOR.name)
        return behaviour(request, context)

    return handle


def _streaming(behaviour: Behaviour, message_type: type[Message]) -> Behaviour:
    def handle(raw: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        # Parse lazily: a bad message raises InvalidArgument inside the servicer,
        # which fails the call with everything it had read.
        return behaviour((_parse(message_type, r) for r in raw), context)

    return handle


def add_servicer(servicer: Any, service_name: str, server: grpc.Server) -> None:
    """Serve `servicer`'s methods for bnservice.v1 service `service_name`, parsing requests."""
    service: ServiceDescriptor = pb.DESCRIPTOR.services_by_name[service_name]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        serialize = getattr(pb, method.output_type.name).SerializeToString
        behaviour = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _streaming(behaviour, request_type), response_serializer=serialize
            )
        elif not (method.client_streaming or method.server_streaming):
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(behaviour, request_type), response_serializer=serialize
            )
        else:
            raise NotImplementedError(f"{method.full_name}: no handler for this streaming shape")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
