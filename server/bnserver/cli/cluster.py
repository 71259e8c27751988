"""`bnserver up`: a coordinator and N servers as local processes (docker-compose without Docker)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from bnserver.cli.processes import ServerProcess

log = logging.getLogger(__name__)


def cluster_commands(
    servers: int, host: str, port: int, state_dir: Path, sync_timeout: float
) -> list[list[str]]:
    """The `bnserver` argument lists of the topology: coordinator at `port`, servers after it.

    docker-compose.yml runs the same command lines (tests/cluster checks it).
    """
    timeout = ["--sync-timeout", f"{sync_timeout:g}"]
    # Servers reach a coordinator bound to every interface through loopback.
    reach = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    commands = [["coordinator", "--host", host, "--port", str(port), *timeout]]
    for i in range(1, servers + 1):
        commands.append(
            [
                "serve",
                "--host",
                host,
                "--port",
                str(port + i),
                "--state-dir",
                str(state_dir / f"server-{i}"),
                "--coordinator",
                f"{reach}:{port}",
                *timeout,
            ]
        )
    return commands


def run_cluster(
    *,
    servers: int,
    host: str,
    port: int,
    state_dir: Path,
    sync_timeout: float,
    stop: threading.Event,
) -> int:
    """Start the processes, print their addresses, and stop them all when `stop` is set.

    Returns 0 after a requested stop, 1 if a process failed to start or died.
    """
    if servers < 1:
        print("bnserver up: --servers must be at least 1")
        return 2
    procs: list[ServerProcess] = []
    code = 0
    try:
        for i, args in enumerate(cluster_commands(servers, host, port, state_dir, sync_timeout)):
            procs.append(ServerProcess(args, capture_stderr=False))
            role = "coordinator" if i == 0 else f"server-{i}"
            print(f"{role} {host}:{procs[-1].port}", flush=True)
        print(f"bnserver up: {servers} server(s) ready; Ctrl-C stops them", flush=True)
        while not stop.wait(0.5):
            dead = [p for p in procs if p.proc.poll() is not None]
            if dead:
                log.error(
                    "%s exited with %s; stopping the cluster", dead[0].args, dead[0].proc.returncode
                )
                code = 1
                break
    except Exception as exc:
        log.error("bnserver up failed: %s", exc)
        code = 1
    finally:
        # Servers first, so their last calls to the coordinator can still finish.
        for proc in reversed(procs):
            try:
                if proc.terminate() != 0:
                    code = 1
            except Exception:
                proc.kill()
                code = 1
    return code
