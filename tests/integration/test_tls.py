"""TLS (`--tls-cert/--tls-key`) on a server and on a coordinator, with a certificate made
at test time for 127.0.0.1 (tests/integration/certs.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import bnclient
from bnclient import Client
from bnserver.cli.processes import ServerProcess, start_coordinator, start_server
from tests.integration.certs import Certificate, self_signed

C = 3
#: Seconds within which a refused connection must fail (a hang takes 30 s, see below).
HANG = 12


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_cert(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A certificate of another, untrusted, authority."""
    return self_signed(tmp_path_factory.mktemp("other"), "not the server")


def tls_flags(cert: Certificate) -> tuple[str, ...]:
    return ("--tls-cert", str(cert.cert_file), "--tls-key", str(cert.key_file))


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, cert: Certificate
) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path_factory.mktemp("state"), *tls_flags(cert), root_certificates=cert.cert_pem
    )
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def tls_coordinator(cert: Certificate) -> Iterator[ServerProcess]:
    proc = start_coordinator(
        *tls_flags(cert), "--sync-timeout", "5", root_certificates=cert.cert_pem
    )
    yield proc
    proc.kill()


def batch(seed: int, n: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    loc = np.linspace(-2.0, 3.0, C).reshape(1, C, 1, 1)
    return (rng.standard_normal((n, C, 2, 3)) * 1.5 + loc).astype(np.float32)


def normalized(x: np.ndarray) -> np.ndarray:
    """float64 reference: x normalized with its own batch statistics (eps 1e-5)."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3), keepdims=True)
    var = x64.var(axis=(0, 2, 3), keepdims=True)
    return (x64 - mean) / np.sqrt(var + 1e-5)


def test_forward_over_tls(tls_server: ServerProcess, cert: Certificate) -> None:
    x = batch(1)
    with Client(tls_server.address, root_certificates=cert.cert_pem, timeout=10) as c:
        bn = c.batch_norm_2d("tls.forward", C)
        y = bn(x)
        streamed = Client(tls_server.address, root_certificates=cert.cert_pem, stream_threshold=64)
        with streamed:
            y_streamed = streamed.batch_norm_2d("tls.forward", C).eval()(x)
        state = bn.state_dict()
    np.testing.assert_allclose(y, normalized(x), rtol=1e-4, atol=1e-4)
    # The eval forward, streamed in chunks over TLS, used the updated running stats.
    mean = state["running_mean"].astype(np.float64)
    var = state["running_var"].astype(np.float64)
    expected = (x - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(y_streamed, expected, rtol=1e-4, atol=1e-4)


def test_health_over_tls(tls_server: ServerProcess, cert: Certificate) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=cert.cert_pem)
    with grpc.secure_channel(tls_server.address, creds) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # `bnserver health --ca` too.
    result = subprocess.run(
        [
            *(sys.executable, "-m", "bnserver.cli", "health"),
            *("--address", tls_server.address, "--ca", str(cert.cert_file)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout


def test_insecure_client_fails_fast_with_unavailable(tls_server: ServerProcess) -> None:
    start = time.monotonic()
    with (
        Client(tls_server.address, timeout=5) as c,
        pytest.raises(bnclient.UnavailableError) as info,
    ):
        c.batch_norm_2d("tls.insecure", C)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    # Not a hang: that would be DEADLINE_EXCEEDED after 5 s per attempt (with the SDK's
    # retries, 30 s); failing fast, the retries' backoff takes about 3 s in all.
    assert time.monotonic() - start < HANG


def test_untrusted_certificate_fails_with_unavailable(
    tls_server: ServerProcess, cert: Certificate, other_cert: Certificate
) -> None:
    start = time.monotonic()
    with (
        Client(tls_server.address, root_certificates=other_cert.cert_pem, timeout=5) as c,
        pytest.raises(bnclient.UnavailableError),
    ):
        c.batch_norm_2d("tls.untrusted", C)
    assert time.monotonic() - start < HANG
    with Client(tls_server.address, root_certificates=cert.cert_pem, timeout=5) as c:
        assert "tls.untrusted" not in [m.name for m in c.list_modules()]


def _two_ranks(addresses: list[str], name: str, retries: int = 5) -> tuple[Any, Any, float]:
    def step(address: str, rank: int) -> Any:
        with Client(address, timeout=30, retries=retries) as c:
            bn = c.sync_batch_norm(name, C, group="tls", rank=rank, world_size=2)
            try:
                return bn(batch(10 + rank))
            except bnclient.ServiceError as exc:
                return exc

    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        f0 = pool.submit(step, addresses[0], 0)
        f1 = pool.submit(step, addresses[1], 1)
        return f0.result(), f1.result(), time.monotonic() - start


def test_servers_sync_through_a_tls_coordinator(
    tmp_path: Path, tls_coordinator: ServerProcess, cert: Certificate
) -> None:
    servers = [
        start_server(
            tmp_path / f"s{i}",
            "--coordinator",
            tls_coordinator.address,
            "--coordinator-ca",
            str(cert.cert_file),
            "--sync-timeout",
            "5",
        )
        for i in range(2)
    ]
    try:
        y0, y1, _ = _two_ranks([s.address for s in servers], "tls.sync")
    finally:
        for s in servers:
            s.kill()
    assert isinstance(y0, np.ndarray), y0
    assert isinstance(y1, np.ndarray), y1
    expected = normalized(np.concatenate([batch(10), batch(11)]))
    np.testing.assert_allclose(np.concatenate([y0, y1]), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ca", ["none", "untrusted"])
def test_server_without_the_coordinators_ca_fails_fast(
    tmp_path: Path, tls_coordinator: ServerProcess, other_cert: Certificate, ca: str
) -> None:
    """The control: a plaintext or wrongly trusting link to the TLS coordinator fails at
    once (it does not wait out the round), so the step above really went over TLS."""
    extra = () if ca == "none" else ("--coordinator-ca", str(other_cert.cert_file))
    server = start_server(
        tmp_path / "s", "--coordinator", tls_coordinator.address, *extra, "--sync-timeout", "5"
    )
    try:
        # No SDK retries: the question is whether one step waits out the round.
        r0, r1, elapsed = _two_ranks([server.address, server.address], "tls.denied", retries=0)
    finally:
        server.kill()
    for r in (r0, r1):
        assert isinstance(r, bnclient.ServiceError), r
        assert r.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED), r
    assert elapsed < 4, elapsed
