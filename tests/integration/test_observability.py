"""Metrics (`--metrics-port`) and the access log, scraped and read from real server processes."""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bnclient import Client, NotFoundError, UnauthenticatedError
from bnserver.cli.processes import ServerProcess, start_coordinator, start_server
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc
from tests.cluster.conftest import run_ranks

C = 4


def scrape(proc: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the process's /metrics, keyed by (name, sorted labels)."""
    assert proc.metrics_port is not None, proc.stdout_lines
    url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def access_lines(proc: ServerProcess, count: int, timeout: float = 10.0) -> list[dict]:
    """The JSON access-log records of `proc`, once there are at least `count` of them."""
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for line in list(proc.stderr_lines):
            if line.startswith("{"):
                record = json.loads(line)
                if record["logger"] == "bnserver.access":
                    records.append(record)
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


@pytest.fixture
def observed(tmp_path: Path):
    proc = start_server(
        tmp_path / "state", "--metrics-port", "0", "--log-format", "json", "--log-level", "info"
    )
    yield proc
    proc.kill()


@pytest.mark.parametrize("shared", [False, True], ids=["streamed", "shared-memory"])
def test_metrics_count_real_calls_by_logical_method(observed: ServerProcess, shared: bool) -> None:
    """Small calls go as Session messages; the large one streamed, or through shared
    memory: each is counted as its logical method all the same."""
    rng = np.random.default_rng(0)
    small = rng.standard_normal((4, C, 2, 2)).astype(np.float32)
    large = rng.standard_normal((8, C, 128, 128)).astype(np.float32)  # 2 MiB: streamed
    with Client(observed.address, shared_memory=shared) as client:
        bn = client.batch_norm_2d("metrics.private-name", C)
        bn(small)
        bn(small)
        bn(large)
        y, vjp = bn.vjp(small)
        vjp(np.ones_like(y))
        sync = client.sync_batch_norm("metrics.sync", C, group="solo", rank=0, world_size=1)
        sync(small)
        with pytest.raises(NotFoundError):
            client.delete_module("metrics.absent")
    samples = scrape(observed)
    calls = "bnservice_calls_total"
    # Two unary forwards, one streamed, one kept for backward, one sync: all Forward.
    assert value(samples, calls, method="Forward", code="OK") == 5
    assert value(samples, calls, method="Backward", code="OK") == 1
    assert value(samples, calls, method="CreateModule", code="OK") == 2
    assert value(samples, calls, method="DeleteModule", code="NOT_FOUND") == 1
    assert value(samples, calls, method="StreamForward", code="OK") == 0
    assert value(samples, "bnservice_call_seconds_count", method="Forward") == 5
    message_bytes = [value(samples, "bnservice_bytes_total", direction=d) for d in ("in", "out")]
    shared_bytes = value(samples, "bnservice_shared_memory_bytes_total")
    if shared:
        assert shared_bytes == large.nbytes
        assert max(message_bytes) < large.nbytes
    else:
        assert shared_bytes == 0
        assert min(message_bytes) > large.nbytes
    assert value(samples, "bnservice_modules", tenant="") == 2
    assert value(samples, "bnservice_backward_handles") == 0
    assert value(samples, "bnservice_sync_rounds_total", outcome="ok") == 1
    assert value(samples, "bnservice_sync_round_seconds_count") == 1
    assert value(samples, "bnservice_state_write_failures_total") == 0
    assert 0 <= value(samples, "bnservice_snapshot_age_seconds") < 60
    # Bounded labels: no module name ever becomes one.
    labels = {v for (_, pairs) in samples for _, v in pairs}
    assert not [v for v in labels if "metrics." in v]

    records = access_lines(observed, 9)
    forwards = [r for r in records if r["method"] == "Forward"]
    assert len(forwards) == 5
    # The small ones were messages of a Session stream, each with its own line.
    assert sum(r["session"] for r in forwards) == 4
    if shared:
        (big,) = [r for r in forwards if r["shm"]]
        assert big["shm"] == large.nbytes and big["bytes_in"] < 1000 and not big["stream"]
    else:
        (big,) = [r for r in forwards if r["stream"]]
        assert big["bytes_in"] >= large.nbytes and big["shm"] == 0
    assert big["module"] == "metrics.private-name" and big["code"] == "OK"
    (missing,) = [r for r in records if r["method"] == "DeleteModule"]
    assert (missing["module"], missing["code"]) == ("metrics.absent", "NOT_FOUND")
    assert all(r["ms"] >= 0 and r["tenant"] == "" for r in records)
    # Never tensor data: each line is short whatever the tensor's size.
    assert max(len(json.dumps(r)) for r in records) < 1000


def _stalled_stream(ref: pb.ModuleRef, release: threading.Event):
    """A StreamForward request stream that sends its header and one chunk, then stalls."""
    header = pb.ForwardRequest(ref=ref, input=pb.Tensor(dtype="float32", shape=[64, C, 64, 64]))
    yield pb.ForwardChunk(header=header, data=b"\0" * (1 << 20))
    release.wait(30)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_call_that_ends_early_is_one_line_not_a_traceback(tmp_path: Path, how: str) -> None:
    proc = start_server(tmp_path / "state", "--log-format", "json")
    release = threading.Event()
    try:
        with Client(proc.address) as client:
            client.batch_norm_2d("stalled.bn", C)
        with grpc.insecure_channel(proc.address) as channel:
            stub = pb_grpc.BatchNormServiceStub(channel)
            ref = pb.ModuleRef(name="stalled.bn")
            timeout = 1.0 if how == "deadline" else None
            call = stub.StreamForward(_stalled_stream(ref, release), timeout=timeout)
            if how == "cancel":
                time.sleep(0.5)
                call.cancel()
            with pytest.raises(grpc.RpcError):
                list(call)
        expected = "CANCELLED" if how == "cancel" else "DEADLINE_EXCEEDED"
        records = access_lines(proc, 2)
        ended = [r for r in records if r["method"] == "Forward"]
        assert [(r["code"], r["stream"], r["module"]) for r in ended] == [
            (expected, True, "stalled.bn")
        ]
        time.sleep(0.3)  # anything logged after the access line would show up by now
        assert "Traceback" not in proc.stderr
        assert not [line for line in proc.stderr_lines if '"level": "ERROR"' in line]
    finally:
        release.set()
        proc.kill()


def test_access_log_names_tenants_never_tokens(tmp_path: Path) -> None:
    token = "tok-" + secrets.token_hex(16)
    auth = tmp_path / "auth"
    auth.write_text(f"acme {token}\n")
    proc = start_server(
        tmp_path / "state", "--auth-file", str(auth), "--metrics-port", "0", "--log-level", "debug"
    )
    try:
        with Client(proc.address, token=token) as client:
            client.batch_norm_1d("tenant.bn", C)(np.ones((2, C), np.float32))
        with Client(proc.address, token="wrong") as client, pytest.raises(UnauthenticatedError):
            client.list_modules()
        samples = scrape(proc)
        assert value(samples, "bnservice_calls_total", method="ListModules", code="UNAUTHENTICATED")
        assert value(samples, "bnservice_modules", tenant="acme") == 1
        deadline = time.monotonic() + 10
        while "UNAUTHENTICATED" not in proc.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
        text = proc.stderr
        assert "Forward session tenant='acme' module='tenant.bn' OK" in text
        assert "ListModules tenant=- module=- UNAUTHENTICATED" in text
        assert token not in text and "wrong" not in text
    finally:
        proc.kill()


def test_coordinator_metrics_count_the_rounds_it_merges(tmp_path: Path) -> None:
    coordinator = start_coordinator("--metrics-port", "0", "--sync-timeout", "10")
    servers = []
    try:
        for i in range(2):
            servers.append(
                start_server(
                    tmp_path / f"s{i}",
                    "--coordinator",
                    coordinator.address,
                    "--metrics-port",
                    "0",
                )
            )
        x = np.random.default_rng(1).standard_normal((4, C)).astype(np.float32)

        def rank(r: int) -> np.ndarray:
            with Client(servers[r].address) as client:
                bn = client.sync_batch_norm("cm.bn", C, group="cm", rank=r, world_size=2)
                return bn(x[2 * r : 2 * r + 2])

        run_ranks([lambda: rank(0), lambda: rank(1)])
        merged = scrape(coordinator)
        # The servers' parts travel on their Rounds streams: counted as parts, by outcome.
        assert value(merged, "bnservice_sync_rounds_total", outcome="ok") == 2
        for server in servers:
            own = scrape(server)
            assert value(own, "bnservice_sync_rounds_total", outcome="ok") == 1
            assert value(own, "bnservice_calls_total", method="Forward", code="OK") == 1
    finally:
        for proc in [*servers, coordinator]:
            proc.kill()
