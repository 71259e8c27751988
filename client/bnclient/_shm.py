"""Same-host shared memory, the client's end (the protocol is in the proto file).

A `Link` is one Unix-socket connection to the server that proved to be the
one the gRPC channel reaches (its `instance` string, and its pid through
SO_PEERCRED). Tensors travel in `Segment`s: sealed memfds registered over
the link, mapped on both sides, kept in a small pool and reused, because
fresh shared pages cost a page fault each on both sides (measured: writing
25.7 MB into a fresh memfd takes 25-30 ms, into a reused one 2 ms).

Nothing is left behind: a memfd has no name, and when this process exits or
dies the kernel closes the link, and the server unmaps every segment it
registered.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import select
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bnservice.v1 import bnservice_pb2 as pb

_LENGTH = struct.Struct("<I")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

#: Segments are sized in multiples of this many bytes, so that tensors of
#: slightly different sizes share them.
GRANULE = 1 << 20

#: Idle segments kept for reuse: at most this many, of at most CACHE_BYTES in all.
CACHE_SEGMENTS = 8
CACHE_BYTES = 3 << 30


class LinkError(Exception):
    """Shared memory cannot be used with this server (the message says why)."""


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Segment:
    """A sealed memfd of `size` bytes, mapped here and registered with the server."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("bnclient", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            # The server refuses a memfd that could shrink under its mapping.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self.map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.id = ""

    def array(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The segment's first bytes as an array of `dtype` and `shape` (a view)."""
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.map, dtype, count=count).reshape(shape)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a view still alive: unmapped with it
            self.map.close()
        os.close(self.fd)


class Link:
    """One verified, authenticated connection to a server's shared-memory socket.

    path, instance, pid: from the server's Describe reply.
    token: the bearer token (None without auth).
    Raises LinkError when the socket is not the same server's or refuses us.
    """

    def __init__(self, path: str, instance: str, pid: int, token: str | None) -> None:
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(10.0)
        try:
            self._sock.connect(path)
            peer_pid, _, _ = _PEERCRED.unpack(
                self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            hello = self._ask(pb.ShmRequest())
            # Only the server that told us the instance string knows it; a pid of 0 is
            # a peer in another pid namespace (a container), which the string covers.
            if hello.instance != instance or (peer_pid not in (pid, 0) and pid):
                raise LinkError(f"{path} is not the socket of the server the channel reaches")
            auth = self._ask(pb.ShmRequest(token=token or ""))
            if auth.code:
                raise LinkError(f"the shared-memory socket refused the token: {auth.message}")
        except OSError as exc:
            self._sock.close()
            raise LinkError(f"cannot use the shared-memory socket {path}: {exc}") from None
        except LinkError:
            self._sock.close()
            raise
        self._free: list[Segment] = []
        self._closed = False

    def alive(self) -> bool:
        """False once the server has closed the link (it stopped or restarted)."""
        with self._lock:  # no reply in flight: the server never speaks unasked
            if self._closed:
                return False
            readable, _, _ = select.select([self._sock], [], [], 0)
            return not readable  # readable: the end of the stream

    @contextlib.contextmanager
    def segment(self, nbytes: int) -> Iterator[Segment]:
        """A registered segment of at least `nbytes`, this thread's alone in the block.

        A block that fails (a timeout, a cancellation) releases the segment instead of
        reusing it: the server's call may still be running and write into it (a
        SyncBatchNorm round applies whether or not its caller still waits). The server
        keeps a released segment mapped until its last call with it ends."""
        segment = self._take(nbytes)
        try:
            yield segment
        except BaseException:
            with self._lock:
                self._release(segment)
            raise
        self._give(segment)

    def _take(self, nbytes: int) -> Segment:
        with self._lock:
            fits = [s for s in self._free if s.size >= nbytes]
            if fits:
                best = min(fits, key=lambda s: s.size)
                self._free.remove(best)
                return best
        size = -(-max(nbytes, 1) // GRANULE) * GRANULE
        segment = Segment(size)
        try:
            reply = self._ask(pb.ShmRequest(register=True), segment.fd)
            if reply.code and size != nbytes:
                # Perhaps over --max-request-bytes only by the rounding: try the exact size.
                segment.close()
                segment = Segment(nbytes)
                reply = self._ask(pb.ShmRequest(register=True), segment.fd)
            if reply.code:
                raise LinkError(
                    f"the server refused a segment of {segment.size} bytes: {reply.message}"
                )
        except BaseException:
            segment.close()
            raise
        segment.id = reply.segment
        return segment

    def _give(self, segment: Segment) -> None:
        with self._lock:
            if not self._closed:
                self._free.append(segment)
                self._free.sort(key=lambda s: s.size)
                # Keep the largest few (the next large call wants them), within the cap.
                while len(self._free) > CACHE_SEGMENTS or sum(s.size for s in self._free) > max(
                    CACHE_BYTES, self._free[-1].size
                ):
                    evicted = self._free.pop(0)
                    self._release(evicted)
                return
        segment.close()

    def _release(self, segment: Segment) -> None:
        """Unregister and close (caller holds the lock or owns the segment)."""
        with contextlib.suppress(OSError):
            self._send(pb.ShmRequest(release=segment.id))
            self._receive()
        segment.close()

    def _ask(self, request: pb.ShmRequest, fd: int | None = None) -> pb.ShmReply:
        with self._lock:
            self._send(request, fd)
            return self._receive()

    def _send(self, request: pb.ShmRequest, fd: int | None = None) -> None:
        body = request.SerializeToString()
        data = _LENGTH.pack(len(body)) + body
        ancillary = []
        if fd is not None:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
        sent = self._sock.sendmsg([data], ancillary)
        if sent < len(data):
            self._sock.sendall(data[sent:])

    def _receive(self) -> pb.ShmReply:
        head = self._exactly(_LENGTH.size)
        (length,) = _LENGTH.unpack(head)
        return pb.ShmReply.FromString(self._exactly(length))

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self._sock.recv(n - len(data))
            if not more:
                raise OSError("the server closed the shared-memory socket")
            data += more
        return data

    def close(self) -> None:
        """Drop every segment and the connection (the server then unmaps them all)."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        for segment in free:
            segment.close()
        self._sock.close()
