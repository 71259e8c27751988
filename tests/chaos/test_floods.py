"""No call, however slow or incomplete, starves the others: floods of stalled calls
against a real server, with a legitimate client measured alongside.

Each test opens hundreds of calls that never send their request (or send a
header and stall, or wait for a sync peer that never comes), then checks that
alice's forwards still complete, that health answers, and prints the latencies
(`pytest -s` shows them). "Completes" means within a deadline of seconds: a
hang, not a slowdown, is the failure these tests catch.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bnclient import Client, ResourceExhaustedError
from bnserver.cli.processes import ServerProcess, start_server
from bnservice.v1 import bnservice_pb2 as pb
from tests.integration.certs import Certificate, self_signed

C = 8
ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789"
#: A legitimate call must finish within this (a hang would take the whole flood).
DEADLINE = 10.0


def auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"alice {ALICE}\nbob {BOB}\n")
    return path


def x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, C)).astype(np.float32)


class Stalled:
    """Calls that start and never send a message (or send `first` and stall)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.release = threading.Event()
        self.futures: list[Any] = []

    def _requests(self, first: bytes | None) -> Iterator[bytes]:
        if first is not None:
            yield first
        self.release.wait()

    def open(self, method: str, n: int, metadata: Any = (), first: bytes | None = None) -> None:
        call = self.channel.stream_stream(method)  # type: ignore[call-arg]
        for _ in range(n):
            replies = call(self._requests(first), metadata=metadata)
            self.futures.append(replies)

    def open_unary(self, method: str, n: int, metadata: Any = ()) -> None:
        call = self.channel.stream_unary(method)  # type: ignore[call-arg]
        for _ in range(n):
            self.futures.append(call.future(self._requests(None), metadata=metadata))

    def codes(self, timeout: float = 5.0) -> list[grpc.StatusCode | None]:
        """The status each call ended with so far (None: still open)."""
        out: list[grpc.StatusCode | None] = []
        deadline = time.monotonic() + timeout
        for f in self.futures:
            done = f.done() if hasattr(f, "done") else not f.is_active()
            if not done and time.monotonic() < deadline:
                time.sleep(0.01)
                done = f.done() if hasattr(f, "done") else not f.is_active()
            out.append(f.code() if done else None)
        return out

    def close(self) -> None:
        self.release.set()
        for f in self.futures:
            f.cancel()


def legit_latencies(client: Client, name: str, n: int = 20) -> list[float]:
    bn = client.batch_norm_1d(name, C)
    times = []
    for i in range(n):
        start = time.perf_counter()
        bn(x(i))
        times.append(time.perf_counter() - start)
    return times


def health_ok(address: str, creds: grpc.ChannelCredentials | None = None) -> bool:
    channel = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=DEADLINE
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def procs() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for p in started:
        p.kill()


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_calls_without_a_token_hold_no_worker(
    tmp_path: Path, procs: list[ServerProcess], tls: bool
) -> None:
    """300 calls without a token that never send their request (more than the 256
    workers): each is refused at once, and alice's forwards and health never wait."""
    extra: tuple[str, ...] = ("--auth-file", str(auth_file(tmp_path)))
    cert: Certificate | None = None
    if tls:
        cert = self_signed(tmp_path / "cert")
        extra += ("--tls-cert", str(cert.cert_file), "--tls-key", str(cert.key_file))
    procs.append(
        start_server(
            tmp_path / "s", *extra, root_certificates=None if cert is None else cert.cert_pem
        )
    )
    address = procs[0].address
    creds = None if cert is None else grpc.ssl_channel_credentials(cert.cert_pem)
    channel = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
    stalled = Stalled(channel)
    kwargs: dict[str, Any] = {"token": ALICE, "timeout": DEADLINE}
    if cert is not None:
        kwargs["root_certificates"] = cert.cert_pem
    try:
        with Client(address, **kwargs) as alice:
            before = legit_latencies(alice, "alice.bn")
            stalled.open_unary("/bnservice.v1.BatchNormService/Forward", 300)
            stalled.open("/bnservice.v1.BatchNormService/StreamForward", 50)
            during = legit_latencies(alice, "alice.bn")
            assert health_ok(address, creds)
        codes = stalled.codes()
        assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == len(codes), set(codes)
    finally:
        stalled.close()
        channel.close()
    print(
        f"\nforward latency ({'tls' if tls else 'plaintext'}): median "
        f"{statistics.median(before) * 1e3:.2f} ms before, "
        f"{statistics.median(during) * 1e3:.2f} ms with 350 calls without a token"
    )


def test_a_tenants_stalled_calls_are_bounded_and_cancelled_when_idle(
    tmp_path: Path, procs: list[ServerProcess]
) -> None:
    """bob opens 150 unary calls and 100 streams that send a header and stall: at most
    --max-calls-per-tenant (64) are admitted, the rest are RESOURCE_EXHAUSTED at once;
    alice's forwards stay prompt; after --idle-timeout (2 s) bob's calls are cancelled."""
    procs.append(
        start_server(tmp_path / "s", "--auth-file", str(auth_file(tmp_path)), "--idle-timeout", "2")
    )
    address = procs[0].address
    channel = grpc.insecure_channel(address)
    stalled = Stalled(channel)
    header = pb.ForwardChunk(
        header=pb.ForwardRequest(
            ref=pb.ModuleRef(name="bob.bn"), input=pb.Tensor(dtype="float32", shape=[1024, C])
        )
    ).SerializeToString()
    bob_md = (("authorization", f"Bearer {BOB}"),)
    try:
        with Client(address, token=BOB, timeout=DEADLINE) as bob:
            bob.batch_norm_1d("bob.bn", C)
        with Client(address, token=ALICE, timeout=DEADLINE) as alice:
            before = legit_latencies(alice, "alice.bn")
            stalled.open_unary("/bnservice.v1.BatchNormService/Forward", 150, bob_md)
            stalled.open("/bnservice.v1.BatchNormService/StreamForward", 100, bob_md, header)
            time.sleep(0.5)
            during = legit_latencies(alice, "alice.bn")
            assert health_ok(address)
            early = stalled.codes(timeout=0.5)
            refused = early.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert refused >= 250 - 64, set(early)
            time.sleep(4.0)  # past the idle timeout
            late = stalled.codes()
            assert None not in late, "a stalled call is still open after --idle-timeout"
            assert late.count(grpc.StatusCode.CANCELLED) == 250 - refused
            # bob can work again once his stalled calls are gone.
            with Client(address, token=BOB, timeout=DEADLINE) as bob:
                bob.batch_norm_1d("bob.bn", C)(x())
    finally:
        stalled.close()
        channel.close()
    print(
        f"\nforward latency: median {statistics.median(before) * 1e3:.2f} ms before, "
        f"{statistics.median(during) * 1e3:.2f} ms with 250 stalled calls of another tenant"
    )


def test_sync_forwards_waiting_for_peers_do_not_starve_other_tenants(
    tmp_path: Path, procs: list[ServerProcess]
) -> None:
    """bob starts 100 SyncBatchNorm steps whose peer never comes (sync timeout 5 s):
    his share of workers fills, the rest of his calls are refused at once, and alice
    trains and checks health as before."""
    procs.append(
        start_server(tmp_path / "s", "--auth-file", str(auth_file(tmp_path)), "--sync-timeout", "5")
    )
    address = procs[0].address
    outcomes: list[str] = []
    lock = threading.Lock()

    with Client(address, token=BOB, timeout=DEADLINE) as bob:
        for i in range(100):
            bob.sync_batch_norm(f"bob.{i}", C, group="g", rank=0, world_size=2)

    def bob_step(i: int) -> None:
        with Client(address, token=BOB, timeout=40.0, retries=0) as bob:
            try:
                bn = bob.sync_batch_norm(f"bob.{i}", C, group="g", rank=0, world_size=2)
                bn(x(i))
                result = "ok"
            except ResourceExhaustedError:
                result = "refused"
            except Exception as exc:
                result = type(exc).__name__
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=bob_step, args=(i,), daemon=True) for i in range(100)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with lock:
            if outcomes.count("refused") >= 100 - 64:
                break
        time.sleep(0.1)
    with lock:
        assert outcomes.count("refused") >= 100 - 64, outcomes
    with Client(address, token=ALICE, timeout=DEADLINE) as alice:
        during = legit_latencies(alice, "alice.bn")
        assert health_ok(address)
    for t in threads:
        t.join(20)
    assert outcomes.count("DeadlineExceededError") == 100 - outcomes.count("refused")
    print(
        f"\nforward latency with 64 of bob's sync steps waiting: median "
        f"{statistics.median(during) * 1e3:.2f} ms"
    )


def test_stalled_uploads_are_freed_after_the_idle_timeout(
    tmp_path: Path, procs: list[ServerProcess]
) -> None:
    """16 streams that each send 48 MiB of a 64 MiB tensor and stall: the server's
    memory grows by about 768 MiB, and falls back once --idle-timeout cancels them
    (what stays is heap the allocator keeps for reuse)."""
    procs.append(start_server(tmp_path / "s", "--idle-timeout", "2"))
    server = procs[0]
    with Client(server.address, timeout=DEADLINE) as c:
        c.batch_norm_2d("up.bn", 16)
    base = rss(server)
    channel = grpc.insecure_channel(server.address)
    release = threading.Event()
    chunk = b"\1" * (1 << 20)

    def requests() -> Iterator[bytes]:
        header = pb.ForwardRequest(
            ref=pb.ModuleRef(name="up.bn"),
            input=pb.Tensor(dtype="float32", shape=[16, 16, 256, 256]),
        )
        yield pb.ForwardChunk(header=header).SerializeToString()
        for _ in range(48):
            yield pb.ForwardChunk(data=chunk).SerializeToString()
        release.wait()

    call = channel.stream_stream(  # type: ignore[call-arg]
        "/bnservice.v1.BatchNormService/StreamForward"
    )
    streams = [call(requests()) for _ in range(16)]
    try:
        peak = base
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and peak - base < 600 << 20:
            time.sleep(0.2)
            peak = max(peak, rss(server))
        assert peak - base >= 600 << 20, f"uploads did not arrive: +{(peak - base) >> 20} MiB"
        deadline = time.monotonic() + 10
        now = rss(server)
        while time.monotonic() < deadline and now - base > 256 << 20:
            time.sleep(0.2)
            now = rss(server)
        assert now - base <= 256 << 20, f"+{(now - base) >> 20} MiB still held after the timeout"
    finally:
        release.set()
        for s in streams:
            s.cancel()
        channel.close()
    print(f"\nserver memory: +{(peak - base) >> 20} MiB stalled, +{(now - base) >> 20} MiB after")


def rss(proc: ServerProcess) -> int:
    """Resident bytes of a process."""
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_health_checks_answer_while_hundreds_of_checks_stall(
    tmp_path: Path, procs: list[ServerProcess]
) -> None:
    """300 health checks that never send their request (they need no token): each is
    answered at once, and a real probe still gets SERVING."""
    procs.append(start_server(tmp_path / "s", "--auth-file", str(auth_file(tmp_path))))
    address = procs[0].address
    channel = grpc.insecure_channel(address)
    stalled = Stalled(channel)
    try:
        stalled.open_unary("/grpc.health.v1.Health/Check", 300)
        assert health_ok(address)
        with Client(address, token=ALICE, timeout=DEADLINE) as alice:
            legit_latencies(alice, "alice.bn", n=5)
        codes = stalled.codes()
        assert codes.count(grpc.StatusCode.OK) == len(codes), set(codes)
    finally:
        stalled.close()
        channel.close()
