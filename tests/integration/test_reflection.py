"""Server reflection answers on both grpc.reflection.v1 (what current tools ask for first)
and v1alpha, and describes the services, the v1 reflection service included."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def ask(address: str, path: str, **request: str) -> reflection_pb2.ServerReflectionResponse:
    # v1 and v1alpha messages are the same on the wire; only the service path differs.
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            path,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (reply,) = list(call(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=5))
        return reply


def files(
    reply: reflection_pb2.ServerReflectionResponse,
) -> list[descriptor_pb2.FileDescriptorProto]:
    assert reply.HasField("file_descriptor_response"), reply
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]


@pytest.mark.parametrize("path", [V1, V1ALPHA])
def test_reflection_lists_and_describes_the_services(server, path: str) -> None:
    listed = ask(server.address, path, list_services="")
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "bnservice.v1.BatchNormService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    (proto,) = files(
        ask(server.address, path, file_containing_symbol="bnservice.v1.BatchNormService")
    )
    assert proto.name == "bnservice/v1/bnservice.proto"
    assert "StreamForward" in [m.name for m in proto.service[0].method]


def test_reflection_describes_its_v1_service(server) -> None:
    (proto,) = files(
        ask(server.address, V1, file_containing_symbol="grpc.reflection.v1.ServerReflection")
    )
    assert (proto.name, proto.package) == (
        "grpc/reflection/v1/reflection.proto",
        "grpc.reflection.v1",
    )
    (method,) = proto.service[0].method
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert {m.name for m in proto.message_type} >= {"ServerReflectionRequest", "ErrorResponse"}
