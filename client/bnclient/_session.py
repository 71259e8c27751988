"""Persistent Session streams: small forwards and backwards without a call each.

A `Session` is one open `Session` stream; a thread takes one from the
client's `SessionPool` for one call and gives it back, so that concurrent
threads each have their own and a stream carries one message at a time.

The server cancels a stream idle for its --idle-timeout, so the pool drops
streams idle for half that long (and any that ended) instead of reusing
them. A message's deadline travels with it (the server answers
DEADLINE_EXCEEDED as for a unary call), and a watchdog cancels a stream whose
reply is more than a moment late, so a silent server cannot hold a caller past
its timeout.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from bnservice.v1 import bnservice_pb2 as pb

#: Idle streams kept per client.
MAX_IDLE = 16

#: Seconds past a message's deadline before the watchdog cancels its stream, as gRPC
#: would end a unary call at its deadline.
LATE = 0.005


class StreamBroken(Exception):
    """The stream ended: `error` is gRPC's; `ours` when our watchdog cancelled it."""

    def __init__(self, error: grpc.RpcError, ours: bool, fresh: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.ours = ours
        self.fresh = fresh  # the stream's first message


class Session:
    """One open Session stream."""

    def __init__(
        self, open_stream: Callable[[Any], Any], on_deadline: Callable[[], None] = lambda: None
    ) -> None:
        self._on_deadline = on_deadline
        self._requests: queue.SimpleQueue[pb.SessionRequest | None] = queue.SimpleQueue()
        self._call = open_stream(iter(self._requests.get, None))
        self.last_used = time.monotonic()
        self.deadline: float | None = None
        self.cancelled_by_us = False
        self.messages = 0

    def active(self) -> bool:
        return bool(self._call.is_active())

    def ask(self, request: pb.SessionRequest, deadline: float | None) -> pb.SessionReply:
        """Send one message and wait for its reply; StreamBroken if the stream ends."""
        self.deadline = deadline
        if deadline is not None:
            self._on_deadline()
        fresh = self.messages == 0
        self.messages += 1
        self._requests.put(request)
        try:
            reply: pb.SessionReply = next(self._call)
        except grpc.RpcError as err:
            raise StreamBroken(err, self.cancelled_by_us, fresh) from None
        except StopIteration:
            raise StreamBroken(_Ended(), self.cancelled_by_us, fresh) from None
        finally:
            self.deadline = None
            self.last_used = time.monotonic()
        return reply

    def cancel(self) -> None:
        self.cancelled_by_us = True
        self._call.cancel()

    def close(self) -> None:
        self._requests.put(None)  # ends the request stream: the server ends the call
        self._call.cancel()


class _Ended(grpc.RpcError):
    """A stream that ended without a status (should not happen)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the session stream ended"


class SessionPool:
    """A client's idle Session streams, and the watchdog of those in use.

    open_stream: starts a Session stream over a request iterator.
    max_idle: seconds after which an idle stream is not reused (half the server's
        --idle-timeout, once known).
    """

    def __init__(self, open_stream: Callable[[Any], Any], max_idle: float = 15.0) -> None:
        self._open = open_stream
        self.max_idle = max_idle
        self._lock = threading.Lock()
        self._deadlines = threading.Condition(self._lock)
        self._idle: list[Session] = []
        self._busy: set[Session] = set()
        self._watchdog: threading.Thread | None = None
        self._closed = False

    def take(self) -> Session:
        now = time.monotonic()
        stale = []
        session = None
        with self._lock:
            while self._idle:
                candidate = self._idle.pop()
                if now - candidate.last_used < self.max_idle and candidate.active():
                    session = candidate
                    break
                stale.append(candidate)
        for s in stale:
            s.close()
        if session is None:
            session = Session(self._open, self._notify)
        with self._lock:
            self._busy.add(session)
        return session

    def give(self, session: Session, healthy: bool) -> None:
        with self._lock:
            self._busy.discard(session)
            keep = healthy and not self._closed and len(self._idle) < MAX_IDLE
            if keep:
                self._idle.append(session)
        if not keep:
            session.close()

    def watch(self) -> None:
        """Start the watchdog (calls with a deadline need it)."""
        with self._lock:
            if self._watchdog is None and not self._closed:
                self._watchdog = threading.Thread(
                    target=self._watch, name="bnclient-session-watchdog", daemon=True
                )
                self._watchdog.start()

    def _notify(self) -> None:
        """A message with a deadline was sent: the watchdog may have to wake sooner."""
        with self._deadlines:
            self._deadlines.notify()

    def _watch(self) -> None:
        """Cancel the stream of a message whose reply is late past its deadline (sleeping
        until the earliest deadline in flight, not polling)."""
        with self._deadlines:
            while not self._closed:
                now = time.monotonic()
                due = [(s, s.deadline) for s in self._busy if s.deadline is not None]
                waits = []
                for s, deadline in due:
                    if now > deadline + LATE:
                        s.deadline = None
                        s.cancel()
                    else:
                        waits.append(deadline + LATE - now)
                self._deadlines.wait(min(waits, default=1.0) + 0.001)

    def close(self) -> None:
        with self._deadlines:
            self._closed = True
            sessions = self._idle + list(self._busy)
            self._idle = []
            self._deadlines.notify()
        for s in sessions:
            s.close()
