"""What a client written from the .proto alone relies on: the file explains itself, and a
request without its tensor says so, unary or streamed."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from bnclient import Client
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

PROTO = Path(__file__).resolve().parents[2] / "proto" / "bnservice" / "v1" / "bnservice.proto"


def test_the_proto_is_self_contained() -> None:
    text = PROTO.read_text()
    tensor_comment = text.split("message Tensor {")[0].rsplit("\n\n", 1)[-1]
    assert "LITTLE-ENDIAN" in tensor_comment and "row-major" in tensor_comment
    for topic in ("4 MiB", "StreamForward", "request_id", "Retry UNAVAILABLE", "server fills"):
        assert topic in text, topic
    assert not re.search(r"DESIGN\.md|\.\./shared|section \d", text)


@pytest.mark.parametrize("streamed", [False, True])
def test_forward_without_input_says_so(server, streamed: bool) -> None:
    with Client(server.address) as client:
        client.batch_norm_1d("contract.noinput", 2)
    request = pb.ForwardRequest(ref=pb.ModuleRef(name="contract.noinput"))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BatchNormServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            if streamed:
                list(stub.StreamForward(iter([pb.ForwardChunk(header=request)]), timeout=10))
            else:
                stub.Forward(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "the request has no input tensor"
