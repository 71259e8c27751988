"""A raw gRPC echo server: the transport peer the remote benchmarks are measured against.

Usage: python -m bench.echo [--port 0]
Serves /bench.Echo/Unary (returns the request bytes) and /bench.Echo/Stream
(a bidi stream that sends every chunk back as it arrives), with no protobuf
and no work: the cheapest gRPC can move the same bytes on this machine.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from bnservice import wire

UNARY = "/bench.Echo/Unary"
STREAM = "/bench.Echo/Stream"
_OPTIONS = [
    ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
]


def _unary(request: bytes, context: Any) -> bytes:
    return request


def _stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
    yield from requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-workers", type=int, default=64)
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(args.max_workers), options=_OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Stream": grpc.stream_stream_rpc_method_handler(_stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"echo listening on 127.0.0.1:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(0)


class EchoClient:
    """Calls the echo server with raw bytes."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=_OPTIONS)
        # No serializers: requests and replies are raw bytes.
        self.unary = self.channel.unary_unary(
            UNARY, request_serializer=None, response_deserializer=None
        )
        self.stream = self.channel.stream_stream(
            STREAM, request_serializer=None, response_deserializer=None
        )

    def echo_chunks(self, chunks: list[bytes]) -> int:
        """Stream `chunks` and read them all back; return the bytes received."""
        return sum(len(c) for c in self.stream(iter(chunks)))

    def close(self) -> None:
        self.channel.close()


if __name__ == "__main__":
    main()
