"""The `bnserver` command line (DESIGN.md section 8)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from grpc_health.v1 import health

from bnserver.engine import Engine
from bnserver.handles import BackwardStore
from bnserver.persistence import StateDir
from bnserver.server import create_server

log = logging.getLogger("bnserver")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_STATE_DIR = Path("bnserver-state")


def _wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT (Ctrl-C)."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    stop.wait()


def serve(args: argparse.Namespace) -> int:
    state = StateDir(args.state_dir)
    engine = Engine(handles=BackwardStore(args.max_backward_handles, args.max_backward_bytes))
    restored = state.load_into(engine.registry)
    health_servicer = health.HealthServicer()
    server, port = create_server(
        f"{args.host}:{args.port}", engine, health_servicer=health_servicer
    )
    server.start()
    log.info("restored %d module(s) from %s", restored, args.state_dir)
    # Tests and `bnserver up` read this line to learn the bound port.
    print(f"bnserver listening on {args.host}:{port}", flush=True)
    _wait_for_signal()
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=args.grace).wait()
    saved = state.save_all(engine.registry)
    log.info("saved %d module(s) to %s; bye", saved, args.state_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnserver", description="BatchNorm as a gRPC service.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run a server (with an embedded coordinator)")
    s.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="port; 0 picks a free one")
    s.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"where module state is kept (default ./{DEFAULT_STATE_DIR})",
    )
    s.add_argument("--max-backward-handles", type=int, default=64, help="backward handles held")
    s.add_argument(
        "--max-backward-bytes", type=int, default=2 << 30, help="bytes held for backward"
    )
    s.add_argument(
        "--grace", type=float, default=10.0, help="seconds in-flight calls get on shutdown"
    )
    s.set_defaults(func=serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
