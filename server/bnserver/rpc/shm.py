"""Same-host shared memory: segments clients hand over as file descriptors.

A client on the server's host connects to the server's Unix socket, proves
nothing (the server proves itself with its `instance` string, see the proto
file), authenticates with its bearer token and registers memfds, each passed
as a descriptor with SCM_RIGHTS. The server maps only descriptors it was
given: a caller can never name another process's memory, and a segment's id
(128 random bits) is looked up under the caller's tenant, so one tenant cannot
reach another's. A descriptor must carry F_SEAL_SHRINK: a client that could
shrink its memfd under the server's mapping would make the server's next read
of it a SIGBUS.

Nothing outlives a connection: when it closes (the client exits, crashes or
is killed) every segment it registered is unmapped and its descriptor
closed, and an unlinked memfd dies with its last descriptor. Calls that are
using a segment at that moment keep it mapped until they finish.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import secrets
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnserver.errors import InvalidArgument, ResourceExhausted, Unauthenticated
from bnserver.limits import Limits
from bnserver.rpc.auth import Tokens
from bnserver.rpc.status import status_of
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb

log = logging.getLogger(__name__)

#: Environment variable that overrides the host identity a server reports (tests
#: simulate a server on another host with it).
HOST_ID_ENV = "BNSERVER_HOST_ID"

#: Segments one connection may hold at a time.
MAX_SEGMENTS_PER_CONNECTION = 64

#: Longest framed message accepted on the socket, in bytes (requests are tiny).
MAX_FRAME = 4096

_LENGTH = struct.Struct("<I")


def host_id() -> str:
    """This host's identity: its boot id (or HOST_ID_ENV when set)."""
    override = os.environ.get(HOST_ID_ENV)
    if override:
        return override
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(eq=False)
class Segment:
    """A registered memfd, mapped read-write. `users`: calls using it now."""

    id: str
    tenant: str
    fd: int
    map: mmap.mmap
    size: int
    users: int = 0
    released: bool = False

    def close(self) -> None:
        """Unmap and close (caller: no user left)."""
        with contextlib.suppress(BufferError):
            # A view may outlive its call for a moment (a traceback); the mapping
            # then goes when the last view does.
            self.map.close()
        os.close(self.fd)


@dataclass
class _Connection:
    greeted: bool = False
    tenant: str | None = None
    segments: set[str] = field(default_factory=set)


class SharedMemory:
    """The segments of every connection, and the Unix socket that registers them.

    path: where the socket listens (its directory should let in only those who may
        use it; the default is a fresh directory of mode 0700).
    tokens: the tenants' tokens (None: no auth, every client is tenant "").
    limits: a segment may not be larger than --max-request-bytes.
    """

    def __init__(
        self, path: Path | None = None, tokens: Tokens | None = None, limits: Limits | None = None
    ) -> None:
        self._own_dir: str | None = None
        if path is None:
            self._own_dir = tempfile.mkdtemp(prefix="bnserver-shm-")
            path = Path(self._own_dir) / "shm.sock"
        self.path = Path(path)
        self.tokens = tokens
        self.limits = limits if limits is not None else Limits()
        self.instance = secrets.token_hex(16)
        self._lock = threading.Lock()
        self._segments: dict[str, Segment] = {}
        self._conns: set[socket.socket] = set()
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()  # a stale socket of a server that did not stop
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(64)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="bnserver-shm", daemon=True)
        self._thread.start()

    # -- what calls use ----------------------------------------------------------------

    @contextlib.contextmanager
    def region(
        self, tenant: str, region: pb.SharedRegion, tensor: pb.Tensor, what: str
    ) -> Iterator[np.ndarray]:
        """A writable array of `tensor`'s dtype and shape over `region` of a segment of
        `tenant`, valid inside the block. InvalidArgument for an unknown segment,
        another tenant's, a range outside it or a length that is not the tensor's;
        ResourceExhausted over the size limits."""
        try:
            dtype, nbytes = wire.check_header(tensor.dtype, tuple(tensor.shape))
        except wire.WireError as exc:
            raise InvalidArgument(f"{what}: {exc}") from None
        self.limits.check_tensor(tuple(tensor.shape), nbytes)
        if tensor.data:
            raise InvalidArgument(f"{what} carries data and a shared-memory region; send one")
        offset, length = region.offset, region.length
        with self._lock:
            segment = self._segments.get(region.segment)
            if segment is None or segment.tenant != tenant or segment.released:
                raise InvalidArgument(f"{what}: no shared-memory segment {region.segment!r}")
            if not (offset >= 0 and length >= 0 and offset + length <= segment.size):
                raise InvalidArgument(
                    f"{what}: region [{offset}, {offset}+{length}) is outside its segment "
                    f"of {segment.size} bytes"
                )
            if length != nbytes:
                raise InvalidArgument(
                    f"{what}: region of {length} bytes for a tensor of {nbytes} bytes"
                )
            segment.users += 1
        try:
            view = np.frombuffer(segment.map, dtype, count=nbytes // dtype.itemsize, offset=offset)
            yield view.reshape(tuple(tensor.shape))
        finally:
            del view
            with self._lock:
                segment.users -= 1
                done = segment.released and segment.users == 0
            if done:
                segment.close()

    def segments(self) -> int:
        """Segments registered now, over all connections."""
        with self._lock:
            return len(self._segments)

    # -- the socket --------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening, drop every connection and segment, remove the socket."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.path.unlink()
        if self._own_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._own_dir)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(
                target=self._serve, args=(conn,), name="bnserver-shm-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        state = _Connection()
        try:
            while self._handle(conn, state):
                pass
        except (OSError, ValueError) as exc:
            log.debug("shared-memory connection ended: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            for segment_id in list(state.segments):
                self._release(state, segment_id)
            conn.close()

    def _handle(self, conn: socket.socket, state: _Connection) -> bool:
        """Answer one request; False when the connection is to end."""
        raw, fds = _receive(conn)
        if raw is None:
            for fd in fds:
                os.close(fd)
            return False
        reply = pb.ShmReply()
        try:
            request = pb.ShmRequest.FromString(raw)
            if state.tenant is None:
                self._greet(request, state, reply, fds)
            elif request.register:
                given, fds = fds, []
                self._register(state, given, reply)
            elif request.release:
                if request.release not in state.segments:
                    raise InvalidArgument(f"no shared-memory segment {request.release!r}")
                self._release(state, request.release)
            else:
                raise InvalidArgument("empty request")
        except Exception as exc:
            code, reply.message = status_of(exc)
            reply.code = code.value[0]
        finally:
            for fd in fds:
                os.close(fd)
        _send(conn, reply.SerializeToString())
        return not (state.tenant is None and reply.code != 0)

    def _greet(
        self, request: pb.ShmRequest, state: _Connection, reply: pb.ShmReply, fds: list[int]
    ) -> None:
        """The hello (an empty request: answer the instance), then the token."""
        if fds or request.register or request.release:
            raise InvalidArgument("authenticate before registering a segment")
        if not state.greeted:
            state.greeted = True
            reply.instance = self.instance
            return
        if self.tokens is None:
            state.tenant = ""
            return
        tenant = self.tokens.tenant_for(request.token)
        if tenant is None:
            raise Unauthenticated("missing or invalid bearer token")
        state.tenant = tenant

    def _register(self, state: _Connection, fds: list[int], reply: pb.ShmReply) -> None:
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise InvalidArgument(f"a registration carries one file descriptor, got {len(fds)}")
        fd = fds[0]
        try:
            if len(state.segments) >= MAX_SEGMENTS_PER_CONNECTION:
                raise ResourceExhausted(
                    f"a connection may hold {MAX_SEGMENTS_PER_CONNECTION} segments"
                )
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                raise InvalidArgument("the descriptor is not a sealable memfd") from None
            if not seals & fcntl.F_SEAL_SHRINK:
                raise InvalidArgument("the memfd must be sealed with F_SEAL_SHRINK")
            size = os.fstat(fd).st_size
            if size <= 0:
                raise InvalidArgument("the memfd is empty")
            if size > self.limits.max_request_bytes:
                raise ResourceExhausted(
                    f"segment of {size} bytes is over the limit of "
                    f"{self.limits.max_request_bytes} bytes (--max-request-bytes)"
                )
            try:
                mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                raise InvalidArgument(f"the memfd cannot be mapped read-write ({exc})") from None
        except BaseException:
            os.close(fd)
            raise
        assert state.tenant is not None
        segment = Segment(secrets.token_hex(16), state.tenant, fd, mapping, size)
        with self._lock:
            self._segments[segment.id] = segment
        state.segments.add(segment.id)
        reply.segment, reply.size = segment.id, size

    def _release(self, state: _Connection, segment_id: str) -> None:
        state.segments.discard(segment_id)
        with self._lock:
            segment = self._segments.pop(segment_id, None)
            if segment is None:
                return
            segment.released = True
            done = segment.users == 0
        if done:
            segment.close()


def _receive(conn: socket.socket) -> tuple[bytes | None, list[int]]:
    """One framed message and the descriptors that came with it; None at the end."""
    fds: list[int] = []
    head = b""
    while len(head) < _LENGTH.size:
        data, ancillary, _, _ = conn.recvmsg(_LENGTH.size - len(head), socket.CMSG_SPACE(4 * 4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
        if not data:
            return None, fds
        head += data
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"frame of {length} bytes")
    body = b""
    while len(body) < length:
        data = conn.recv(length - len(body))
        if not data:
            return None, fds
        body += data
    return body, fds


def _send(conn: socket.socket, body: bytes) -> None:
    conn.sendall(_LENGTH.pack(len(body)) + body)
