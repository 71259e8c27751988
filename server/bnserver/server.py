"""Building the gRPC server: services, health, reflection, message limits."""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bnserver.engine import Engine
from bnserver.service import BatchNormServicer
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

#: Largest message either side accepts. gRPC cannot carry a message of 2 GiB
#: or more, so this is the ceiling for a single unary call.
MAX_MESSAGE_BYTES = (2 << 30) - 1

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BatchNormService"].full_name


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def create_server(
    address: str = "127.0.0.1:0",
    engine: Engine | None = None,
    *,
    max_workers: int = 16,
    health_servicer: health.HealthServicer | None = None,
) -> tuple[grpc.Server, int]:
    """A not-yet-started server bound to `address`, and the port it bound (use port 0 for any).

    Health (overall and per service) reports SERVING once the server is started.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="bnserver"),
        options=channel_options(),
    )
    pb_grpc.add_BatchNormServiceServicer_to_server(
        BatchNormServicer(engine if engine is not None else Engine()), server
    )
    health_servicer = health_servicer or health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return server, port
