"""Same-host shared memory: same results, nothing left behind, nothing reachable that was
not handed over, limits kept, and streaming when the server is elsewhere."""

from __future__ import annotations

import fcntl
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from bnclient import Client, DeadlineExceededError, UnavailableError
from bnclient._shm import Link, LinkError, Segment
from bnserver.cli.processes import ServerProcess, start_server
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

C = 8
SHAPE = (16, C, 32, 32)  # 128 Ki elements: over the shared-memory threshold in every dtype
ALICE, BOB = "alice-token-1", "bob-token-2"


def _x(dtype: type = np.float32, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(shape) * 2 + 3).astype(dtype)


def _memfds(pid: int) -> tuple[list[str], list[str]]:
    """The server's descriptors and mappings of clients' memfds."""
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "memfd:bnclient" in target:
            fds.append(target)
    maps = [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "memfd:" in line]
    return fds, maps


def _wait_released(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_memfds(pid)):
        assert time.monotonic() < deadline, f"segments left in the server: {_memfds(pid)}"
        time.sleep(0.05)


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[ServerProcess]:
    auth = tmp_path / "auth"
    auth.write_text(f"alice {ALICE}\nbob {BOB}\n")
    proc = start_server(tmp_path / "state", "--auth-file", str(auth))
    yield proc
    proc.kill()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_shared_memory_on_and_off_give_identical_results(
    server: ServerProcess, name: str, dtype: type
) -> None:
    x = _x(dtype)
    dy = _x(dtype) - 3
    results = []
    for shared in (True, False):
        with Client(server.address, shared_memory=shared) as client:
            assert client.uses_shared_memory is shared
            bn = client.batch_norm_2d(f"{name}.{shared}", C)
            y_train = bn(x)
            y, vjp = bn.vjp(x)
            grads = vjp(dy)
            bn.eval()
            results.append((y_train, y, *grads, bn(x), bn.running_mean, bn.running_var))
            client.delete_module(f"{name}.{shared}")
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)  # bit-identical


def test_a_killed_client_leaves_no_segment_behind(fresh_server: ServerProcess, name: str) -> None:
    before = set(os.listdir("/dev/shm"))
    script = textwrap.dedent(
        f"""
        import numpy as np
        from bnclient import Client
        client = Client({fresh_server.address!r}, shared_memory=True)
        bn = client.batch_norm_2d({name!r}, 8)
        x = np.ones((64, 8, 64, 64), np.float32)
        bn(x)
        print("running", flush=True)
        while True:
            bn(x)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "running"
        fds, maps = _memfds(fresh_server.proc.pid)
        assert fds and maps  # the control: the server did map the client's segments
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    _wait_released(fresh_server.proc.pid)
    assert set(os.listdir("/dev/shm")) <= before
    with Client(fresh_server.address) as client:  # the server is fine
        assert client.module(name)(np.ones((4, 8, 2, 2), np.float32)).shape == (4, 8, 2, 2)


def test_a_cancelled_call_leaves_no_segment_behind(tmp_path: Path) -> None:
    """A forward that times out waiting for a SyncBatchNorm peer: the client does not
    reuse its segment (the server's call still runs and may write into it) but releases
    it, and the server unmaps it once its round gives up, while the client is still open."""
    x = _x()
    proc = start_server(tmp_path / "state", "--sync-timeout", "1")
    try:
        with Client(proc.address, shared_memory=True, timeout=0.3) as client:
            bn = client.sync_batch_norm("lonely", C, group="g", rank=0, world_size=2)
            with pytest.raises(DeadlineExceededError):
                bn(x)
            _wait_released(proc.proc.pid)
    finally:
        proc.kill()
    own = [p for p in Path(f"/proc/{os.getpid()}/maps").read_text().splitlines() if "bnclient" in p]
    assert not own


def _describe(address: str, token: str | None = None) -> pb.ServerDescription:
    with grpc.insecure_channel(address) as channel:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        about: pb.ServerDescription = pb_grpc.BatchNormServiceStub(channel).Describe(
            pb.DescribeRequest(), metadata=metadata
        )
        return about


def _link(address: str, token: str | None = None) -> Link:
    about = _describe(address, token)
    return Link(about.shm_socket, about.instance, about.pid, token)


def _forward_in(
    address: str, ref: pb.ModuleRef, x: np.ndarray, region: pb.SharedRegion, token: str | None
) -> grpc.StatusCode:
    request = pb.ForwardRequest(ref=ref, request_id=uuid.uuid4().hex, input_region=region)
    wire.encode_header(x, request.input)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.BatchNormServiceStub(channel).Forward(request, metadata=metadata, timeout=10)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def test_forged_segments_sizes_and_offsets_are_refused(server: ServerProcess, name: str) -> None:
    x = _x()
    with Client(server.address) as client:
        bn = client.batch_norm_2d(name, C)
        ref = pb.ModuleRef(name=name)
        link = _link(server.address)
        with link.segment(x.nbytes) as segment:
            segment.array(x.dtype, x.shape)[...] = x
            good = pb.SharedRegion(segment=segment.id, offset=0, length=x.nbytes)
            forged = [
                pb.SharedRegion(segment=uuid.uuid4().hex, offset=0, length=x.nbytes),
                pb.SharedRegion(segment=segment.id, offset=segment.size, length=x.nbytes),
                pb.SharedRegion(segment=segment.id, offset=-4096, length=x.nbytes),
                pb.SharedRegion(segment=segment.id, offset=0, length=x.nbytes - 4),
                pb.SharedRegion(segment=segment.id, offset=4, length=segment.size),
            ]
            for region in forged:
                code = _forward_in(server.address, ref, x, region, None)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, region
            assert bn.num_batches_tracked == 0  # nothing changed
            assert np.array_equal(segment.array(x.dtype, x.shape), x)
            assert _forward_in(server.address, ref, x, good, None) == grpc.StatusCode.OK
            assert bn.num_batches_tracked == 1  # the control
        link.close()


def test_the_server_maps_only_sealed_memfds(server: ServerProcess, tmp_path: Path) -> None:
    link = _link(server.address)
    plain = os.memfd_create("bnclient-unsealed")  # could shrink under the server's mapping
    os.ftruncate(plain, 1 << 20)
    regular = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT)
    os.ftruncate(regular, 1 << 20)
    try:
        for fd in (plain, regular):
            reply = link._ask(pb.ShmRequest(register=True), fd)
            assert reply.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], reply
            assert not reply.segment
    finally:
        os.close(plain)
        os.close(regular)
        link.close()


def test_tenants_cannot_reach_each_others_segments(auth_server: ServerProcess) -> None:
    x = _x()
    with (
        Client(auth_server.address, token=ALICE) as alice,
        Client(auth_server.address, token=BOB) as bob,
    ):
        alice.batch_norm_2d("mine", C)
        bob.batch_norm_2d("mine", C)
        alices = _link(auth_server.address, ALICE)
        with alices.segment(x.nbytes) as segment:
            segment.array(x.dtype, x.shape)[...] = x
            region = pb.SharedRegion(segment=segment.id, offset=0, length=x.nbytes)
            ref = pb.ModuleRef(name="mine")
            code = _forward_in(auth_server.address, ref, x, region, BOB)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert np.array_equal(segment.array(x.dtype, x.shape), x)  # untouched
            assert bob.module("mine").num_batches_tracked == 0
            assert _forward_in(auth_server.address, ref, x, region, ALICE) == grpc.StatusCode.OK
        alices.close()
        # The socket wants a tenant's token too.
        about = _describe(auth_server.address, ALICE)
        with pytest.raises(LinkError, match="refused the token"):
            Link(about.shm_socket, about.instance, about.pid, "wrong")
        with pytest.raises(LinkError, match="not the socket"):
            Link(about.shm_socket, "another-instance", about.pid, ALICE)


def test_limits_apply_to_shared_memory(tmp_path: Path) -> None:
    x = _x()
    proc = start_server(tmp_path / "state", "--max-request-bytes", str(x.nbytes // 2))
    try:
        link = _link(proc.address)
        big = Segment(x.nbytes)
        reply = link._ask(pb.ShmRequest(register=True), big.fd)
        assert reply.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "--max-request-bytes" in reply.message
        big.close()
        link.close()
        with Client(proc.address, shared_memory=True) as client:
            bn = client.batch_norm_2d("limited", C)
            with pytest.raises(Exception, match="max-request-bytes"):
                bn(x)
            assert bn.num_batches_tracked == 0
    finally:
        proc.kill()


def test_auto_streams_when_the_server_is_on_another_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BNSERVER_HOST_ID", "another-host")
    proc = start_server(tmp_path / "state")
    monkeypatch.delenv("BNSERVER_HOST_ID")
    x = _x(shape=(16, C, 64, 64))  # 2 MiB: streamed
    try:
        with Client(proc.address) as client:
            assert not client.uses_shared_memory
            bn = client.batch_norm_2d("elsewhere", C)
            assert bn(x).shape == x.shape
        assert not any(_memfds(proc.proc.pid))
        assert "Forward stream" in proc.stderr
        with pytest.raises(UnavailableError, match="another host"):
            Client(proc.address, shared_memory=True)
    finally:
        proc.kill()


def test_auto_streams_when_the_socket_is_off_or_unreachable(tmp_path: Path) -> None:
    off = start_server(tmp_path / "off", "--shm-socket", "none")
    gone = start_server(tmp_path / "gone", "--shm-socket", str(tmp_path / "gone.sock"))
    try:
        os.unlink(tmp_path / "gone.sock")  # unreachable from here on
        for proc in (off, gone):
            with Client(proc.address) as client:
                assert not client.uses_shared_memory
                assert client.batch_norm_2d("x", C)(_x()).shape == SHAPE
            with pytest.raises(UnavailableError, match="cannot work"):
                Client(proc.address, shared_memory=True)
    finally:
        off.kill()
        gone.kill()


def test_a_segment_is_the_clients_own_memory(server: ServerProcess) -> None:
    """The control for the seal test: what the client registers is sealed against shrinking."""
    segment = Segment(1 << 20)
    try:
        assert fcntl.fcntl(segment.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(segment.fd, 4096)
        assert len(segment.map) == 1 << 20 and isinstance(segment.map, mmap.mmap)
    finally:
        segment.close()
