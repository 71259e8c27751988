"""The `bnserver serve` process: health, reflection, SIGTERM, state across restarts."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bnclient import Client
from bnserver.cli.processes import start_server


def test_health_reports_serving_for_server_and_service(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "bnservice.v1.BatchNormService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert {"bnservice.v1.BatchNormService", "grpc.health.v1.Health"} <= names


def _train(client: Client, name: str, steps: int = 3):
    bn = client.batch_norm_2d(name, 5, momentum=0.8)
    rng = np.random.default_rng(7)
    for _ in range(steps):
        bn(rng.standard_normal((4, 5, 3, 3)).astype(np.float32) * 2 + 1)
    return bn


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_zero_and_state_survives_restart(tmp_path: Path, sig) -> None:
    state_dir = tmp_path / "state"
    with start_server(state_dir) as first:
        with Client(first.address) as client:
            bn = _train(client, "stem.bn")
            one = client.batch_norm_1d("head.bn", 3, affine=False)
            one.eval()
            before = bn.state_dict()
        first.proc.send_signal(sig)
        assert first.proc.wait(30) == 0, first.stderr
    with start_server(state_dir) as second, Client(second.address) as client:
        names = {(m.name, m.kind, m.training) for m in client.list_modules()}
        assert names == {("stem.bn", "BatchNorm2d", True), ("head.bn", "BatchNorm1d", False)}
        after = client.batch_norm_2d("stem.bn", 5, momentum=0.8).state_dict()
        assert before.keys() == after.keys()
        for key in before:
            assert before[key].tobytes() == after[key].tobytes(), key
        assert second.terminate() == 0


def test_corrupt_state_file_is_set_aside_not_fatal(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    with start_server(state_dir) as first:
        with Client(first.address) as client:
            _train(client, "good.bn")
            _train(client, "bad.bn")
        assert first.terminate() == 0
    files = sorted(state_dir.glob("module-*.npz"))
    assert len(files) == 2
    files[0].write_bytes(files[0].read_bytes()[:40])  # truncated mid-file
    with start_server(state_dir) as second, Client(second.address) as client:
        assert len(client.list_modules()) == 1
        assert (state_dir / "corrupt" / files[0].name).exists()
        assert second.terminate() == 0
        assert "unreadable" in second.stderr
