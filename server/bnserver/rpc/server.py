"""Building gRPC servers: services, health, reflection, message limits, the call observer."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bnserver.engine import Engine
from bnserver.metrics import Metrics
from bnserver.rpc.admission import Admission, Policy
from bnserver.rpc.auth import Authenticator, Gate, Tokens
from bnserver.rpc.batchnorm_service import BatchNormServicer
from bnserver.rpc.coordinator_service import CoordinatorServicer
from bnserver.rpc.observe import CallObserver
from bnserver.rpc.reflection import enable_reflection
from bnserver.rpc.registration import add_servicer
from bnserver.rpc.shm import SharedMemory
from bnserver.sync.step import Reducer
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb

BATCH_NORM_SERVICE = pb.DESCRIPTOR.services_by_name["BatchNormService"].full_name
COORDINATOR_SERVICE = pb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name


def create_server(
    address: str = "127.0.0.1:0",
    engine: Engine | None = None,
    coordinator: Reducer | None = None,
    *,
    max_workers: int = 256,
    health_servicer: health.HealthServicer | None = None,
    tokens: Tokens | None = None,
    peer_tokens: Sequence[str] | None = None,
    credentials: grpc.ServerCredentials | None = None,
    metrics: Metrics | None = None,
    policy: Policy | None = None,
    shm: SharedMemory | None = None,
) -> tuple[grpc.Server, int]:
    """A not-yet-started server bound to `address`, and the port it bound (port 0: any).

    Serves the BatchNorm service over `engine` and/or the coordinator service
    over `coordinator`, plus health (SERVING once started) and reflection.
    With `tokens` every call but health checks needs a tenant's bearer token,
    and the coordinator service needs one of `peer_tokens` (see
    `bnserver.rpc.auth`); with `credentials` the port speaks TLS. `policy`
    bounds what one tenant's calls can hold (`bnserver.rpc.admission`): each
    call waiting for sync peers, or idle on I/O until cancelled, holds a worker,
    so `max_workers` must exceed a tenant's share. Every call gets an
    access-log line (`bnserver.rpc.observe`) and, with `metrics`, is counted
    there, as are the coordinator's rounds. `shm`: the Unix socket and segments
    of same-host shared memory (None: off; see `bnserver.rpc.shm`).
    Raises OSError when `address` cannot be bound.
    """
    if engine is None and coordinator is None:
        raise ValueError("a server needs an engine, a coordinator or both")
    max_message = wire.MAX_MESSAGE_BYTES
    if engine is not None:
        # gRPC refuses larger messages itself, with a message that cannot name our
        # flag; the slack lets a request just over --max-request-bytes (or a stream
        # chunk with its framing) reach the server's own check, which does.
        slack = wire.CHUNK_BYTES + (1 << 20)
        max_message = min(max_message, max(engine.limits.max_request_bytes, 0) + slack)
    policy = policy or Policy()
    health_servicer = health_servicer or health.HealthServicer()

    def overall_health() -> health_pb2.HealthCheckResponse:
        # Service "" is always set, so Check never needs a context to report NOT_FOUND.
        reply: health_pb2.HealthCheckResponse = health_servicer.Check(
            health_pb2.HealthCheckRequest(service=""),
            None,  # type: ignore[arg-type]
        )
        return reply

    # The observer goes first, so that it also sees the calls the gate refuses.
    interceptors: list[grpc.ServerInterceptor] = [  # type: ignore[type-arg]
        CallObserver(metrics, tokens),
        Gate(tokens, peer_tokens, Admission(policy), overall_health),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="bnserver"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
            # One server per port: a second one must fail to bind, not share the port.
            ("grpc.so_reuseport", 0),
        ],
    )
    services = []
    if engine is not None:
        servicer = BatchNormServicer(engine, Authenticator(tokens), shm, policy.idle_timeout)
        add_servicer(servicer, "BatchNormService", server)
        services.append(BATCH_NORM_SERVICE)
    if coordinator is not None:
        if metrics is not None:
            coordinator = metrics.observe_reducer(coordinator)
        add_servicer(CoordinatorServicer(coordinator), "CoordinatorService", server)
        services.append(COORDINATOR_SERVICE)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    enable_reflection((*services, health.SERVICE_NAME), server)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # gRPC's "Failed to bind to address ..."
        raise OSError(f"could not bind {address} (is the port taken?)") from exc
    if port == 0:
        raise OSError(f"could not bind {address} (is the port taken?)")
    return server, port
