"""Starting `bnserver` child processes: bind port 0, read the port, wait for health, stop.

Used by `bnserver up`, the integration tests and the benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_METRICS = re.compile(r"metrics on http://(\S+):(\d+)/metrics")


class ServerProcess:
    """A `bnserver <command>` child process bound to a free port on 127.0.0.1."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        startup_timeout: float = 30.0,
        capture_stderr: bool = True,
        root_certificates: bytes | None = None,
        stderr_path: Path | None = None,
    ) -> None:
        """Start `bnserver *args`; capture_stderr keeps its log in .stderr, else it is inherited.

        stderr_path: write the log to this file instead (no thread of this process reads
        it: what benchmarks want, so that the access log costs only the server).

        root_certificates: PEM of the CA of a TLS server's certificate (health is then
        checked over TLS); None checks it over an insecure channel.
        """
        self.args = [sys.executable, "-m", "bnserver.cli", *args]
        if stderr_path is not None:
            capture_stderr = False
        with contextlib.ExitStack() as files:
            log = files.enter_context(open(stderr_path, "ab")) if stderr_path else None
            self.proc = subprocess.Popen(
                self.args,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if capture_stderr else log,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.stderr_lines: list[str] = []
        #: stdout up to the "listening on" line (the metrics line comes before it).
        self.stdout_lines: list[str] = []
        if capture_stderr:
            threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.port = self._read_port(startup_timeout)
        self.address = f"127.0.0.1:{self.port}"
        found = [m for m in map(_METRICS.search, self.stdout_lines) if m]
        #: The --metrics-port it bound, or None without one.
        self.metrics_port = int(found[0].group(2)) if found else None
        wait_serving(self.address, startup_timeout, root_certificates=root_certificates)

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def _read_port(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        found: list[int] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.stdout_lines.append(line)
                match = _LISTENING.search(line)
                if match:
                    found.append(int(match.group(2)))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            self.kill()
            raise RuntimeError(f"{self.args} did not start:\n{self.stderr}")
        return found[0]

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def wait_serving(
    address: str, timeout: float = 30.0, *, root_certificates: bytes | None = None
) -> None:
    """Poll the standard health service until it answers SERVING (over TLS with a CA)."""
    deadline = time.monotonic() + timeout
    if root_certificates is None:
        channel = grpc.insecure_channel(address)
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        channel = grpc.secure_channel(address, creds)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout} s")
            time.sleep(0.05)


def start_server(
    state_dir: Path | str,
    *extra: str,
    root_certificates: bytes | None = None,
    stderr_path: Path | None = None,
) -> ServerProcess:
    return ServerProcess(
        ["serve", "--port", "0", "--state-dir", str(state_dir), *extra],
        root_certificates=root_certificates,
        stderr_path=stderr_path,
    )


def start_coordinator(
    *extra: str, root_certificates: bytes | None = None, stderr_path: Path | None = None
) -> ServerProcess:
    return ServerProcess(
        ["coordinator", "--port", "0", *extra],
        root_certificates=root_certificates,
        stderr_path=stderr_path,
    )
