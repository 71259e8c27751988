"""The `bnserver` command line.

bnserver serve [--host H] [--port P] [--state-dir DIR] [--coordinator HOST:PORT] [--metrics-port P]
bnserver coordinator [--host H] [--port P] [--metrics-port P]
bnserver up [--servers N]
bnserver health [--address HOST:PORT]
bnserver ls | show NAME | rm NAME | export NAME FILE | import NAME FILE   (see `cli.admin`)

Start-up failures (a taken port, an unreadable file) are one line on stderr
and exit code 1; bad arguments are argparse's usage message and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bnserver import __version__
from bnserver.cli import admin, logs
from bnserver.engine import Engine
from bnserver.limits import Limits
from bnserver.malloc import tune_malloc
from bnserver.metrics import Metrics
from bnserver.rpc.admission import Policy
from bnserver.rpc.auth import Tokens, load_peer_tokens
from bnserver.rpc.coordinator_client import RemoteCoordinator
from bnserver.rpc.server import create_server
from bnserver.rpc.shm import SharedMemory
from bnserver.state.batchnorm import DEDUP_WINDOW
from bnserver.state.persistence import (
    Durability,
    Persister,
    StateDir,
    StateDirBusy,
    StateDirLock,
)
from bnserver.sync.coordinator import Coordinator
from bnserver.sync.step import Reducer

log = logging.getLogger("bnserver")

T = TypeVar("T")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_COORDINATOR_PORT = 50050
DEFAULT_STATE_DIR = Path("bnserver-state")
DEFAULT_SYNC_TIMEOUT = 30.0


class StartupError(Exception):
    """A reason the process cannot start, reported as one line and exit code 1."""


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is out of range (0-65535; 0 picks a free one)")
    return value


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


def _read(flag: str, path: Path, load: Callable[[Path], T]) -> T:
    """`load(path)`, with an unreadable or malformed file as a StartupError naming `flag`."""
    try:
        return load(path)
    except OSError as exc:
        raise StartupError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise StartupError(f"{flag}: {exc}") from None


def _tokens(args: argparse.Namespace) -> Tokens | None:
    auth_file = getattr(args, "auth_file", None)
    return _read("--auth-file", auth_file, Tokens.load) if auth_file else None


def _peer_tokens(args: argparse.Namespace) -> list[str] | None:
    if not args.peer_token_file:
        return None
    return _read("--peer-token-file", args.peer_token_file, load_peer_tokens)


def _coordinator_token(args: argparse.Namespace) -> str | None:
    """The peer token this server presents to its --coordinator."""
    if args.coordinator_token_file:
        path = args.coordinator_token_file
        return _read("--coordinator-token-file", path, load_peer_tokens)[0]
    return os.environ.get("BNSERVER_COORDINATOR_TOKEN") or None


def _coordinator(args: argparse.Namespace) -> Coordinator:
    return Coordinator(args.sync_timeout, args.max_rounds, args.max_rounds_per_tenant)


def _server_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    if not (args.tls_cert or args.tls_key):
        return None
    if not (args.tls_cert and args.tls_key):
        raise StartupError("--tls-cert and --tls-key go together")
    key = _read("--tls-key", args.tls_key, Path.read_bytes)
    pair = (key, _read("--tls-cert", args.tls_cert, Path.read_bytes))
    return grpc.ssl_server_credentials([pair])


def _policy(args: argparse.Namespace) -> Policy:
    return Policy(args.max_calls_per_tenant, args.max_anonymous_calls, args.idle_timeout)


def _shared_memory(
    args: argparse.Namespace, tokens: Tokens | None, limits: Limits
) -> SharedMemory | None:
    if args.shm_socket == "none":
        return None
    path = None if args.shm_socket == "auto" else Path(args.shm_socket)
    try:
        return SharedMemory(path, tokens, limits)
    except OSError as exc:
        raise StartupError(f"--shm-socket: cannot listen on {args.shm_socket} ({exc})") from None


def _metrics(args: argparse.Namespace) -> Metrics | None:
    return None if args.metrics_port is None else Metrics()


def _serve_metrics(metrics: Metrics | None, host: str, port: int) -> None:
    """Serve /metrics (before the gRPC port is announced, so that line comes first)."""
    if metrics is None:
        return
    try:
        bound = metrics.serve(host, port)
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
        ) from None
    print(f"bnserver metrics on http://{host}:{bound}/metrics", flush=True)


def _check_free(host: str, port: int) -> None:
    """Fail with one line if host:port cannot be bound (gRPC would log a C-level error first)."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve --host {host}: {exc.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC does: a port whose old connections linger in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {host}:{port}: {exc.strerror} (is the port taken?)"
                ) from None


def _create_server(args: argparse.Namespace, **kwargs: Any) -> tuple[grpc.Server, int]:
    _check_free(args.host, args.port)
    try:
        return create_server(f"{args.host}:{args.port}", **kwargs)
    except OSError as exc:
        raise StartupError(str(exc)) from None


def serve(args: argparse.Namespace) -> int:
    tune_malloc()
    metrics = _metrics(args)
    tokens = _tokens(args)
    coordinator = None
    if args.coordinator:
        ca_file = args.coordinator_ca
        ca = _read("--coordinator-ca", Path(ca_file), Path.read_bytes) if ca_file else None
        reducer: Reducer = RemoteCoordinator(
            args.coordinator,
            args.sync_timeout,
            credentials=grpc.ssl_channel_credentials(ca) if ca else None,
            token=_coordinator_token(args),
        )
    else:
        reducer = coordinator = _coordinator(args)
    if metrics is not None:
        reducer = metrics.observe_reducer(reducer)
    engine = Engine(reducer, _limits(args), args.dedup_window)
    try:
        lock = StateDirLock(Path(args.state_dir))
    except StateDirBusy as exc:
        raise StartupError(str(exc)) from None
    state = StateDir(args.state_dir, engine.registry)
    if metrics is not None:
        metrics.watch_engine(engine, tokens.tenants if tokens else [""])
    shm = _shared_memory(args, tokens, engine.limits)
    server, port = _create_server(
        args,
        engine=engine,
        coordinator=coordinator,
        max_workers=args.max_workers,
        health_servicer=(health_servicer := health.HealthServicer()),
        tokens=tokens,
        peer_tokens=_peer_tokens(args),
        credentials=_server_credentials(args),
        metrics=metrics,
        policy=_policy(args),
        shm=shm,
    )
    _serve_metrics(metrics, args.host, args.metrics_port)
    restored = state.load()
    engine.account_restored()
    persister = Persister(state, args.snapshot_interval, Durability(args.durability))
    if metrics is not None:
        metrics.watch_persister(persister)
    engine.persistence = persister
    where = f"coordinator {args.coordinator}" if args.coordinator else "embedded coordinator"
    log.info("restored %d module(s) from %s; %s", restored, args.state_dir, where)
    _run_until_signal(server, health_servicer, f"{args.host}:{port}", args.grace)
    if shm is not None:
        shm.close()
    saved = persister.close()
    lock.release()
    if metrics is not None:
        metrics.close()
    log.info("saved %d module(s) to %s; bye", saved, args.state_dir)
    return 0


def coordinator(args: argparse.Namespace) -> int:
    metrics = _metrics(args)
    server, port = _create_server(
        args,
        coordinator=_coordinator(args),
        max_workers=args.max_workers,
        health_servicer=(health_servicer := health.HealthServicer()),
        peer_tokens=_peer_tokens(args),
        credentials=_server_credentials(args),
        metrics=metrics,
        policy=_policy(args),
    )
    _serve_metrics(metrics, args.host, args.metrics_port)
    _run_until_signal(server, health_servicer, f"{args.host}:{port}", args.grace)
    if metrics is not None:
        metrics.close()
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
        creds = grpc.ssl_channel_credentials(_read("--ca", Path(args.ca), Path.read_bytes))
        channel = grpc.secure_channel(args.address, creds)
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            code = err.code().name  # type: ignore[attr-defined]
            print(f"{args.address}: {code} ({err.details()})", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _add_common(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    p.add_argument(
        "--port", type=port_number, default=port, help=f"port (default {port}; 0 picks one)"
    )
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
        help="calls needing no token (health watches) in progress at once (default 32)",
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
    p.add_argument(
        "--metrics-port",
        type=port_number,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics on --host (default: off; "
        "0 picks a free port)",
    )


def _logging_options(top: bool) -> argparse.ArgumentParser:
    """--log-level and --log-format, accepted before and after the subcommand.

    The subcommands' copies default to SUPPRESS so that they do not override a
    value given before the subcommand.
    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=logs.LEVELS,
        default="info" if top else argparse.SUPPRESS,
        help="log records at this level and above (default info; every call is one info line)",
    )
    p.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default="text" if top else argparse.SUPPRESS,
        help="text lines or one JSON object a line (default text)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnserver",
        description="BatchNorm as a gRPC service.",
        parents=[_logging_options(top=True)],
    )
    parser.add_argument("--version", action="version", version=f"bnserver {__version__}")
    common = [_logging_options(top=False)]
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve", parents=common, help="run a server (with an embedded coordinator by default)"
    )
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
        help="'always': every training forward is on disk before it is answered (default snapshot)",
    )
    s.add_argument(
        "--shm-socket",
        metavar="PATH",
        default="auto",
        help="Unix socket through which clients on this host hand over shared memory for "
        "their tensors; 'auto' (default): a fresh directory only this user can enter; "
        "'none': no shared memory",
    )
    defaults = Limits()
    for field in dataclasses.fields(Limits):
        s.add_argument(
            "--" + field.name.replace("_", "-"),
            type=int,
            default=getattr(defaults, field.name),
            metavar="N",
            help=f"limit (default {getattr(defaults, field.name)})",
        )
    _add_server_limits(s)
    s.set_defaults(func=serve)

    c = sub.add_parser("coordinator", parents=common, help="run a coordinator alone")
    _add_common(c, DEFAULT_COORDINATOR_PORT)
    _add_server_limits(c)
    c.set_defaults(func=coordinator)

    u = sub.add_parser(
        "up",
        parents=common,
        help="a coordinator and N servers as local processes on consecutive ports",
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

    h = sub.add_parser(
        "health", parents=common, help="check a server's or coordinator's gRPC health"
    )
    h.add_argument(
        "--address",
        default=f"{DEFAULT_HOST}:{DEFAULT_PORT}",
        metavar="HOST:PORT",
        help=f"the server or coordinator to ask (default {DEFAULT_HOST}:{DEFAULT_PORT})",
    )
    h.add_argument("--service", default="", help="service name (default: the whole server)")
    h.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)"
    )
    h.add_argument("--ca", metavar="FILE", help="PEM root certificate of a TLS server")
    h.set_defaults(func=check_health)

    admin.add_parsers(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except StartupError as exc:
        print(f"bnserver {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
