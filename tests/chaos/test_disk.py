"""Write, then acknowledge, then publish: a full or read-only disk never loses an
acknowledged change and never acknowledges one that is not on disk.

The state directory is a small tmpfs mounted by the test (it runs as root), filled
with a ballast file to make writes fail with ENOSPC, and remounted read-only for
the delete case. Every check ends with SIGKILL and a restart on the same directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from bnclient import Client, UnavailableError
from bnserver.cli.processes import ServerProcess, start_server
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

C = 16


def batch(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((8, C)) * 2 + seed).astype(np.float32)


class Disk:
    """A 4 MiB tmpfs: `fill()` leaves no room, `free()` gives it back."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)], check=True)
        self.state = root / "state"
        self.ballast = root / "ballast"

    def fill(self) -> None:
        with contextlib.suppress(OSError), open(self.ballast, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def read_only(self, on: bool) -> None:
        """A read-only bind mount over the state directory (the server keeps its lock
        file open for writing, so the tmpfs itself cannot be remounted read-only)."""
        if on:
            subprocess.run(["mount", "--bind", str(self.state), str(self.state)], check=True)
            subprocess.run(["mount", "-o", "remount,ro,bind", str(self.state)], check=True)
        else:
            subprocess.run(["umount", str(self.state)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.state)], check=False, capture_output=True)
        subprocess.run(["umount", "-l", str(self.root)], check=False)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    if os.geteuid() != 0:
        pytest.fail("the disk chaos tests mount a tmpfs and need root (CI runs as root)")
    d = Disk(tmp_path / "mnt")
    yield d
    d.unmount()


def restart(server: ServerProcess, disk: Disk, *extra: str) -> ServerProcess:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(30)
    return start_server(disk.state, *extra)


def test_create_on_a_full_disk_is_never_acknowledged(disk: Disk) -> None:
    server = start_server(disk.state)
    try:
        with Client(server.address, timeout=5, retries=3, retry_backoff=0.05) as c:
            disk.fill()
            with pytest.raises(UnavailableError):
                c.batch_norm_1d("full.bn", C)  # its retries fail the same way
            assert [m.name for m in c.list_modules()] == []  # nothing was published
            disk.free()
            c.batch_norm_1d("full.bn", C)
        server = restart(server, disk)
        with Client(server.address, timeout=5) as c:
            assert [m.name for m in c.list_modules()] == ["full.bn"]
    finally:
        server.kill()


def test_a_failed_write_changes_nothing(disk: Disk) -> None:
    """load_state_dict, eval() and reset on a full disk: UNAVAILABLE and memory as it was."""
    server = start_server(disk.state)
    try:
        with Client(server.address, timeout=5, retries=0) as c:
            bn = c.batch_norm_1d("keep.bn", C)
            bn(batch(1))
            before = bn.state_dict()
            disk.fill()
            for change in (
                lambda: bn.load_state_dict({"running_mean": np.full(C, 7.0)}, strict=False),
                bn.eval,
                bn.reset_running_stats,
            ):
                with pytest.raises(UnavailableError):
                    change()
                assert bn.training
                for k, v in bn.state_dict().items():
                    np.testing.assert_array_equal(v, before[k], err_msg=k)
            disk.free()
            bn.eval()
        server = restart(server, disk)
        with Client(server.address, timeout=5) as c:
            assert not c.batch_norm_1d("keep.bn", C).training
    finally:
        server.kill()


def test_durability_always_acknowledges_only_what_is_written(disk: Disk) -> None:
    """A training forward on a full disk is UNAVAILABLE and applies nothing; its retry
    with the same request id, once there is room, is applied once and survives SIGKILL."""
    server = start_server(disk.state, "--durability", "always")
    try:
        with Client(server.address, timeout=5) as c:
            bn = c.batch_norm_1d("always.bn", C)
            before = bn.state_dict()
        request = pb.ForwardRequest(ref=pb.ModuleRef(name="always.bn"), request_id="step-1")
        wire.encode(batch(2), request.input)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.BatchNormServiceStub(channel)
            disk.fill()
            with pytest.raises(grpc.RpcError) as info:
                stub.Forward(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            with Client(server.address, timeout=5) as c:
                after = c.batch_norm_1d("always.bn", C).state_dict()
            for k, v in after.items():
                np.testing.assert_array_equal(v, before[k], err_msg=k)
            disk.free()
            stub.Forward(request, timeout=5)
            stub.Forward(request, timeout=5)  # the retry of the retry: applied once
        with Client(server.address, timeout=5) as c:
            trained = c.batch_norm_1d("always.bn", C).state_dict()
        server = restart(server, disk, "--durability", "always")
        with Client(server.address, timeout=5) as c:
            got = c.batch_norm_1d("always.bn", C).state_dict()
        for k, v in trained.items():
            assert v.tobytes() == got[k].tobytes(), k
        expected = 0.1 * batch(2).astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(got["running_mean"].reshape(-1), expected, rtol=1e-6)
    finally:
        server.kill()


def test_snapshots_keep_trying_until_the_disk_has_room(disk: Disk) -> None:
    """Stats trained while the disk is full reach it once there is room again, within a
    few intervals (the snapshot thread never drops a dirty module)."""
    extra = ("--snapshot-interval", "0.2")
    server = start_server(disk.state, *extra)
    try:
        with Client(server.address, timeout=5) as c:
            bn = c.batch_norm_1d("snap.bn", C)
            disk.fill()
            for i in range(5):
                bn(batch(i))
            expected = bn.state_dict()
            time.sleep(1.0)  # several failed snapshots
            disk.free()
            time.sleep(2.0)  # backoff is at most a few intervals here
        server_log = server.stderr
        server = restart(server, disk, *extra)
        with Client(server.address, timeout=5) as c:
            got = c.batch_norm_1d("snap.bn", C).state_dict()
        for k, v in expected.items():
            assert v.tobytes() == got[k].tobytes(), k
        assert "snapshot of 1 module(s) failed" in server_log, "no failure was logged"
    finally:
        server.kill()


def test_delete_on_a_read_only_state_dir_keeps_the_module(disk: Disk) -> None:
    server = start_server(disk.state)
    try:
        with Client(server.address, timeout=5, retries=0) as c:
            c.batch_norm_1d("ro.bn", C)
            disk.read_only(True)
            with pytest.raises(UnavailableError):
                c.delete_module("ro.bn")
            assert [m.name for m in c.list_modules()] == ["ro.bn"]
        disk.read_only(False)
        server = restart(server, disk)
        with Client(server.address, timeout=5) as c:
            assert [m.name for m in c.list_modules()] == ["ro.bn"]
            c.delete_module("ro.bn")
        server = restart(server, disk)
        with Client(server.address, timeout=5) as c:
            assert c.list_modules() == []
    finally:
        server.kill()


def test_concurrent_creates_are_both_durable_before_either_is_answered(tmp_path: Path) -> None:
    """Two clients create the same 2^20-channel module 5 ms apart; SIGKILL right after
    the second answer; the module is there after a restart (5 rounds)."""
    import threading

    for round_ in range(5):
        state = tmp_path / f"s{round_}"
        server = start_server(state)
        try:
            name = f"big-{uuid.uuid4().hex[:6]}"
            first = threading.Thread(target=_create, args=(server.address, name, 0.0))
            first.start()
            _create(server.address, name, 0.005)
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(30)
            first.join(30)
            server = start_server(state)
            with Client(server.address, timeout=30) as c:
                assert [m.name for m in c.list_modules()] == [name], round_
        finally:
            server.kill()


def _create(address: str, name: str, delay: float) -> None:
    time.sleep(delay)
    with contextlib.suppress(UnavailableError), Client(address, timeout=30) as c:
        c.batch_norm_1d(name, 1 << 20)
