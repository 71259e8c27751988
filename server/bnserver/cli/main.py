"""The `bnserver` command line.

bnserver serve [--host H] [--port P] [--state-dir DIR] [--coordinator HOST:PORT]
bnserver coordinator [--host H] [--port P]
bnserver up [--servers N]
bnserver health [--address HOST:PORT]
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bnserver.engine import Engine
from bnserver.limits import Limits
from bnserver.malloc import tune_malloc
from bnserver.rpc.admission import Policy
from bnserver.rpc.auth import Tokens, load_peer_tokens
from bnserver.rpc.coordinator_client import RemoteCoordinator
from bnserver.rpc.server import create_server
from bnserver.state.batchnorm import DEDUP_WINDOW
from bnserver.state.persistence import (
    Durability,
    Persister,
    StateDir,
    StateDirBusy,
    StateDirLock,
)
from bnserver.sync.coordinator import Coordinator

log = logging.getLogger("bnserver")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_COORDINATOR_PORT = 50050
DEFAULT_STATE_DIR = Path("bnserver-state")
DEFAULT_SYNC_TIMEOUT = 30.0


class StartupError(Exception):
    """A reason the process cannot start, printed as one line (no traceback)."""


def _stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C)."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _run_until_signal(
    server: grpc.Server, health_servicer: health.HealthServicer, address: str, grace: float
) -> None:
    """Start `server`, announce it, and on SIGTERM/SIGINT drain calls for up to `grace` s."""
    stop = _stop_event()
    server.start()
    # `bnserver up`, the tests and the benchmarks read this line for the port.
    print(f"bnserver listening on {address}", flush=True)
    stop.wait()
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=grace).wait()


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})


def _tokens(args: argparse.Namespace) -> Tokens | None:
    auth_file = getattr(args, "auth_file", None)
    return Tokens.load(auth_file) if auth_file else None


def _peer_tokens(args: argparse.Namespace) -> list[str] | None:
    return load_peer_tokens(args.peer_token_file) if args.peer_token_file else None


def _coordinator_token(args: argparse.Namespace) -> str | None:
    """The peer token this server presents to its --coordinator."""
    if args.coordinator_token_file:
        return load_peer_tokens(args.coordinator_token_file)[0]
    return os.environ.get("BNSERVER_COORDINATOR_TOKEN") or None


def _policy(args: argparse.Namespace) -> Policy:
    return Policy(args.max_calls_per_tenant, args.max_anonymous_calls, args.idle_timeout)


def _bind(address: str, *args: Any, **kwargs: Any) -> tuple[grpc.Server, int]:
    """`create_server`, with a port that cannot be bound as a StartupError.

    The port is tried with a plain socket first, so that a taken port is our one
    line and not gRPC's log line as well.
    """
    host, _, port = address.rpartition(":")
    try:
        with socket.create_server((host.strip("[]"), int(port))):
            pass
    except OSError as exc:
        why = {
            errno.EADDRINUSE: "the port is taken (another bnserver?)",
            errno.EADDRNOTAVAIL: "the address is not one of this machine's",
            errno.EACCES: "permission denied",
        }.get(exc.errno or 0, str(exc))
        raise StartupError(f"cannot listen on {address}: {why}") from None
    try:
        return create_server(address, *args, **kwargs)
    except OSError as exc:
        raise StartupError(str(exc)) from None


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0..65535 (0 picks a free one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (0..65535)")
    return port


def _coordinator(args: argparse.Namespace) -> Coordinator:
    return Coordinator(args.sync_timeout, args.max_rounds, args.max_rounds_per_tenant)


def _server_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    if not (args.tls_cert or args.tls_key):
        return None
    if not (args.tls_cert and args.tls_key):
        raise SystemExit("bnserver: --tls-cert and --tls-key go together")
    pair = (Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes())
    return grpc.ssl_server_credentials([pair])


def serve(args: argparse.Namespace) -> int:
    tune_malloc()
    coordinator = None
    if args.coordinator:
        ca = Path(args.coordinator_ca).read_bytes() if args.coordinator_ca else None
        reducer: Coordinator | RemoteCoordinator = RemoteCoordinator(
            args.coordinator,
            args.sync_timeout,
            credentials=grpc.ssl_channel_credentials(ca) if ca else None,
            token=_coordinator_token(args),
        )
    else:
        reducer = coordinator = _coordinator(args)
    engine = Engine(reducer, _limits(args), args.dedup_window)
    try:
        lock = StateDirLock(Path(args.state_dir))
    except StateDirBusy as exc:
        raise StartupError(str(exc)) from None
    state = StateDir(args.state_dir, engine.registry)
    restored = state.load()
    engine.account_restored()
    persister = Persister(state, args.snapshot_interval, Durability(args.durability))
    engine.persistence = persister
    health_servicer = health.HealthServicer()
    server, port = _bind(
        f"{args.host}:{args.port}",
        engine,
        coordinator,
        max_workers=args.max_workers,
        health_servicer=health_servicer,
        tokens=_tokens(args),
        peer_tokens=_peer_tokens(args),
        credentials=_server_credentials(args),
        policy=_policy(args),
    )
    where = f"coordinator {args.coordinator}" if args.coordinator else "embedded coordinator"
    log.info("restored %d module(s) from %s; %s", restored, args.state_dir, where)
    _run_until_signal(server, health_servicer, f"{args.host}:{port}", args.grace)
    saved = persister.close()
    lock.release()
    log.info("saved %d module(s) to %s; bye", saved, args.state_dir)
    return 0


def coordinator(args: argparse.Namespace) -> int:
    health_servicer = health.HealthServicer()
    server, port = _bind(
        f"{args.host}:{args.port}",
        coordinator=_coordinator(args),
        max_workers=args.max_workers,
        health_servicer=health_servicer,
        peer_tokens=_peer_tokens(args),
        credentials=_server_credentials(args),
        policy=_policy(args),
    )
    _run_until_signal(server, health_servicer, f"{args.host}:{port}", args.grace)
    log.info("coordinator stopped")
    return 0


def up(args: argparse.Namespace) -> int:
    from bnserver.cli.cluster import run_cluster

    return run_cluster(
        servers=args.servers,
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        sync_timeout=args.sync_timeout,
        stop=_stop_event(),
    )


def check_health(args: argparse.Namespace) -> int:
    """Exit 0 when the service at --address answers SERVING (for container health checks)."""
    if args.ca:
        creds = grpc.ssl_channel_credentials(Path(args.ca).read_bytes())
        channel = grpc.secure_channel(args.address, creds)
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            print(f"{args.address}: {err.code().name}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _add_common(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    p.add_argument("--port", type=_port, default=port, help=f"port (default {port}; 0 picks one)")
    p.add_argument(
        "--sync-timeout",
        type=float,
        default=DEFAULT_SYNC_TIMEOUT,
        help="seconds a SyncBatchNorm round waits for all ranks (default 30)",
    )


def _add_server_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-workers", type=int, default=256, help="gRPC worker threads (default 256)")
    p.add_argument(
        "--max-calls-per-tenant",
        type=int,
        default=64,
        help="calls of one tenant in progress at once (default 64; without --auth-file "
        "every caller is one tenant)",
    )
    p.add_argument(
        "--max-anonymous-calls",
        type=int,
        default=32,
        help="health checks in progress at once (default 32)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        help="seconds a call may wait for its next message, or for its client to read "
        "one, before it is cancelled (default 30)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds in-flight calls get on shutdown (default 10)",
    )
    p.add_argument(
        "--max-rounds",
        type=int,
        default=4096,
        help="sync rounds (open or failed) the coordinator holds at once (default 4096)",
    )
    p.add_argument(
        "--max-rounds-per-tenant",
        type=int,
        default=1024,
        help="the same, per tenant (default 1024)",
    )
    p.add_argument(
        "--peer-token-file",
        type=Path,
        help="tokens (one a line) of servers allowed on the coordinator service",
    )
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnserver", description="BatchNorm as a gRPC service.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run a server (with an embedded coordinator by default)")
    _add_common(s, DEFAULT_PORT)
    s.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"where module state is kept (default ./{DEFAULT_STATE_DIR})",
    )
    s.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="use this coordinator instead of the embedded one",
    )
    s.add_argument(
        "--coordinator-ca", metavar="FILE", help="PEM root certificate of a TLS coordinator"
    )
    s.add_argument(
        "--coordinator-token-file",
        type=Path,
        help="peer token to present to --coordinator (default: $BNSERVER_COORDINATOR_TOKEN)",
    )
    s.add_argument(
        "--auth-file", type=Path, help="'TENANT TOKEN' lines; calls need a tenant's token"
    )
    s.add_argument(
        "--snapshot-interval",
        type=float,
        default=1.0,
        help="seconds between writes of running statistics (default 1)",
    )
    s.add_argument(
        "--dedup-window",
        type=float,
        default=DEDUP_WINDOW,
        help=f"seconds a forward's request id is remembered, so that a retry is applied "
        f"at most once (default {DEDUP_WINDOW:g}; kept with the module's state)",
    )
    s.add_argument(
        "--durability",
        choices=[d.value for d in Durability],
        default=Durability.SNAPSHOT.value,
        help="'always': every training forward is on disk before it is answered",
    )
    defaults = Limits()
    for field in dataclasses.fields(Limits):
        s.add_argument(
            "--" + field.name.replace("_", "-"),
            type=int,
            default=getattr(defaults, field.name),
            help=f"limit (default {getattr(defaults, field.name)})",
        )
    _add_server_limits(s)
    s.set_defaults(func=serve)

    c = sub.add_parser("coordinator", help="run a coordinator alone")
    _add_common(c, DEFAULT_COORDINATOR_PORT)
    _add_server_limits(c)
    c.set_defaults(func=coordinator)

    u = sub.add_parser(
        "up", help="a coordinator and N servers as local processes on consecutive ports"
    )
    u.add_argument("--servers", type=int, default=2, help="number of servers (default 2)")
    _add_common(u, DEFAULT_COORDINATOR_PORT)
    u.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="servers keep state in DIR/server-1, DIR/server-2, ...",
    )
    u.set_defaults(func=up)

    h = sub.add_parser("health", help="check a server's or coordinator's gRPC health")
    h.add_argument("--address", default=f"{DEFAULT_HOST}:{DEFAULT_PORT}")
    h.add_argument("--service", default="", help="service name (default: the whole server)")
    h.add_argument("--timeout", type=float, default=3.0)
    h.add_argument("--ca", metavar="FILE", help="PEM root certificate of a TLS server")
    h.set_defaults(func=check_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except StartupError as exc:
        print(f"bnserver: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
