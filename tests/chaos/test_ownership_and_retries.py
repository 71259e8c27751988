"""One owner per port and per state directory; retries applied exactly once within the
dedup window, however many other requests the module sees, across a restart too."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from bnclient import Client
from bnserver.cli.processes import ServerProcess, start_server
from bnserver.state.persistence import decode_record
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

C = 4


def run_bnserver(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bnserver.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_server_on_a_taken_port_fails_with_one_line(tmp_path: Path) -> None:
    with start_server(tmp_path / "a") as first:
        second = run_bnserver(
            "serve", "--port", str(first.port), "--state-dir", str(tmp_path / "b")
        )
        assert second.returncode != 0
        assert "Traceback" not in second.stderr
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "port taken" in lines[0], second.stderr
        # The first server still owns its port: every new connection reaches it.
        for _ in range(20):
            with Client(first.address, timeout=5) as c:
                c.batch_norm_1d("owner.bn", C)
                assert [m.name for m in c.list_modules()] == ["owner.bn"]


def test_a_second_server_on_a_held_state_dir_refuses_naming_the_holder(tmp_path: Path) -> None:
    with start_server(tmp_path / "shared") as first:
        second = run_bnserver("serve", "--port", "0", "--state-dir", str(tmp_path / "shared"))
        assert second.returncode != 0
        assert "Traceback" not in second.stderr
        assert f"pid {first.proc.pid}" in second.stderr, second.stderr
    # Once the holder is gone (even killed), the directory is free again.
    with start_server(tmp_path / "shared"):
        pass


def _forward(stub: pb_grpc.BatchNormServiceStub, rid: str, x: np.ndarray) -> np.ndarray:
    request = pb.ForwardRequest(ref=pb.ModuleRef(name="dedup.bn"), request_id=rid)
    wire.encode(x, request.input)
    return np.array(wire.decode(stub.Forward(request, timeout=10).output))


def _batches_tracked(server: ServerProcess, state_dir: Path) -> int:
    """num_batches_tracked of dedup.bn as written at a clean stop."""
    assert server.terminate() == 0
    (path,) = state_dir.glob("module-*.npz")
    return decode_record(path)[1].num_batches_tracked


def test_a_retry_is_applied_once_however_many_requests_came_between(tmp_path: Path) -> None:
    """Request "first" is retried after 4 threads made 300 other training forwards
    (far more than any fixed-size memory of ids): 301 updates, and the retry answers
    with the first attempt's output. 66 calls with 65 distinct ids: 65 updates."""
    state_dir = tmp_path / "s"
    server = start_server(state_dir)
    x = np.random.default_rng(0).standard_normal((8, C)).astype(np.float32)
    with Client(server.address, timeout=10) as c:
        c.batch_norm_1d("dedup.bn", C)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BatchNormServiceStub(channel)
        first = _forward(stub, "first", x)

        def others(t: int) -> None:
            for i in range(75):
                _forward(stub, f"other-{t}-{i}", x)

        threads = [threading.Thread(target=others, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        again = _forward(stub, "first", x)
        np.testing.assert_array_equal(again, first)
    assert _batches_tracked(server, state_dir) == 301

    state_dir = tmp_path / "t"
    server = start_server(state_dir)
    with Client(server.address, timeout=10) as c:
        c.batch_norm_1d("dedup.bn", C)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BatchNormServiceStub(channel)
        for i in range(65):
            _forward(stub, f"id-{i}", x)
        _forward(stub, "id-0", x)
    assert _batches_tracked(server, state_dir) == 65


def test_a_retry_after_a_restart_is_still_applied_once(tmp_path: Path) -> None:
    """The ids of the dedup window are kept with the module's state (clean stop here;
    after SIGKILL they are exactly as old as the statistics they belong to)."""
    state_dir = tmp_path / "s"
    server = start_server(state_dir)
    x = np.random.default_rng(1).standard_normal((8, C)).astype(np.float32)
    with Client(server.address, timeout=10) as c:
        c.batch_norm_1d("dedup.bn", C)
    with grpc.insecure_channel(server.address) as channel:
        first = _forward(pb_grpc.BatchNormServiceStub(channel), "before-restart", x)
    assert server.terminate() == 0
    server = start_server(state_dir)
    with grpc.insecure_channel(server.address) as channel:
        again = _forward(pb_grpc.BatchNormServiceStub(channel), "before-restart", x)
    np.testing.assert_array_equal(again, first)
    assert _batches_tracked(server, state_dir) == 1


def test_over_long_request_ids_are_refused(tmp_path: Path) -> None:
    with start_server(tmp_path / "s") as server:
        with Client(server.address, timeout=10) as c:
            c.batch_norm_1d("dedup.bn", C)
        x = np.zeros((2, C), np.float32)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.BatchNormServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                _forward(stub, "x" * 129, x)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            _forward(stub, "x" * 128, x)
