"""Admission: who may hold a worker thread, and for how long.

Every call passes one interceptor (`Gate`) before any of its bytes are read:

* a call without the right token is refused at once by a handler that reads
  nothing, so it never waits for a request message on a worker;
* every other call is counted against its bucket (its tenant, the anonymous
  bucket of health and reflection without auth, or the peers' bucket of the
  coordinator service); a bucket's calls in progress are bounded
  (RESOURCE_EXHAUSTED beyond, at once), so no tenant can take the threads
  that serve everyone else;
* a call waiting to receive its next message, or to send one its client does
  not read, for `idle_timeout` seconds is cancelled, which frees its worker and
  its buffers. Time spent computing or waiting for sync peers is not idle (a
  round is bounded by --sync-timeout), and peers' calls are exempt (a server's
  stream to its coordinator is idle between rounds by design).

Handlers are re-registered request-streaming (a unary call is read as a
stream of one message), so the bookkeeping runs before the request arrives.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from bnserver.errors import InvalidArgument, ResourceExhausted
from bnserver.malloc import release_free_memory
from bnserver.rpc.shell import abort_with

log = logging.getLogger(__name__)

#: The bucket of calls that need no token (health, and everything on a server without auth
#: files is the "" tenant's).
ANONYMOUS = "(anonymous)"
#: The bucket of the coordinator service's callers (servers): not bounded.
PEERS = "(peers)"


@dataclass(frozen=True)
class Policy:
    """max_calls: calls in progress per bucket (None: unbounded).
    idle_timeout: seconds of I/O without progress before a call is cancelled (None: never).
    """

    max_calls: int | None = 64
    max_anonymous_calls: int | None = 32
    idle_timeout: float | None = 30.0


@dataclass(eq=False)
class _Call:
    context: grpc.ServicerContext
    method: str
    bucket: str
    waiting_since: float | None = None  # set while the call waits on I/O
    cancelled: bool = False


@dataclass
class Admission:
    """Counts calls per bucket and cancels calls idle on I/O (one watchdog thread)."""

    policy: Policy = field(default_factory=Policy)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._calls: set[_Call] = set()
        self._watchdog: threading.Thread | None = None

    def in_progress(self, bucket: str) -> int:
        with self._lock:
            return self._counts.get(bucket, 0)

    @contextlib.contextmanager
    def admit(self, context: grpc.ServicerContext, method: str, bucket: str) -> Iterator[_Call]:
        """Count the call in `bucket` for as long as the block runs; over the bucket's
        limit the call ends at once with RESOURCE_EXHAUSTED."""
        limit = self._limit(bucket)
        with self._lock:
            count = self._counts.get(bucket, 0)
            refused = limit is not None and count >= limit
            if not refused:
                self._counts[bucket] = count + 1
                call = _Call(context, method, bucket)
                self._calls.add(call)
                self._start_watchdog()
        if refused:
            who = "the callers without a token" if bucket == ANONYMOUS else "this tenant"
            flag = "--max-anonymous-calls" if bucket == ANONYMOUS else "--max-calls-per-tenant"
            abort_with(
                context,
                ResourceExhausted(f"{count} calls of {who} are in progress, the limit ({flag})"),
                method,
            )
        try:
            yield call
        finally:
            with self._lock:
                self._calls.discard(call)
                left = self._counts[bucket] - 1
                if left:
                    self._counts[bucket] = left
                else:
                    del self._counts[bucket]  # nothing kept per bucket once idle

    def _limit(self, bucket: str) -> int | None:
        if bucket == PEERS:
            return None
        if bucket == ANONYMOUS:
            return self.policy.max_anonymous_calls
        return self.policy.max_calls

    # -- I/O phases ----------------------------------------------------------------------

    def messages(self, call: _Call, requests: Iterator[Any]) -> Iterator[Any]:
        """`requests`, with the time spent waiting for each message watched."""
        while True:
            call.waiting_since = time.monotonic()
            try:
                message = next(requests)
            except StopIteration:
                return
            finally:
                call.waiting_since = None
            yield message

    def replies(self, call: _Call, replies: Iterator[Any]) -> Iterator[Any]:
        """`replies`, with the time gRPC spends sending each one watched (a client that
        does not read blocks the send)."""
        for reply in replies:
            call.waiting_since = time.monotonic()
            try:
                yield reply
            finally:
                call.waiting_since = None

    # -- the watchdog --------------------------------------------------------------------

    def _start_watchdog(self) -> None:
        """Start the watchdog on first use (caller holds the lock)."""
        if self._watchdog is None and self.policy.idle_timeout is not None:
            self._watchdog = threading.Thread(
                target=self._watch, name="bnserver-idle-watchdog", daemon=True
            )
            self._watchdog.start()

    def _watch(self) -> None:
        timeout = self.policy.idle_timeout
        assert timeout is not None
        period = min(max(timeout / 4, 0.05), 1.0)
        while True:
            time.sleep(period)
            now = time.monotonic()
            with self._lock:
                idle = [
                    c
                    for c in self._calls
                    if not c.cancelled
                    and c.bucket != PEERS  # servers' long-lived Rounds streams idle by design
                    and c.waiting_since is not None
                    and now - c.waiting_since >= timeout
                ]
                for c in idle:
                    c.cancelled = True
            for c in idle:
                log.info(
                    "cancelled %s of %s: no message in either direction for %g s (--idle-timeout)",
                    c.method,
                    c.bucket,
                    timeout,
                )
                c.context.cancel()  # type: ignore[no-untyped-call]
            if idle:
                # The cancelled calls unwind in their own threads; then their buffers,
                # freed to the heap, go back to the system.
                threading.Timer(1.0, release_free_memory).start()


def _first(requests: Iterator[Any], context: grpc.ServicerContext, method: str) -> Any:
    """The one request message of a unary call."""
    try:
        request = next(requests, None)
    except grpc.RpcError as exc:
        abort_with(context, exc, method)  # the call ended (cancelled, deadline, idle)
    if request is None:
        abort_with(context, InvalidArgument("the call ended without its request message"), method)
    return request


def guarded(
    handler: grpc.RpcMethodHandler[Any, Any],
    admission: Admission,
    method: str,
    bucket: str,
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` re-registered request-streaming, run under `admission` in `bucket`."""
    name = method.rsplit("/", 1)[-1]
    deserialize, serialize = handler.request_deserializer, handler.response_serializer

    if not handler.response_streaming:
        behaviour = handler.stream_unary if handler.request_streaming else handler.unary_unary
        assert behaviour is not None

        def unary_reply(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            with admission.admit(context, name, bucket) as call:
                watched = admission.messages(call, requests)
                if handler.request_streaming:
                    return behaviour(watched, context)
                return behaviour(_first(watched, context, name), context)

        return grpc.stream_unary_rpc_method_handler(
            unary_reply, request_deserializer=deserialize, response_serializer=serialize
        )

    streaming = handler.stream_stream if handler.request_streaming else handler.unary_stream
    assert streaming is not None

    def stream_reply(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        with admission.admit(context, name, bucket) as call:
            watched = admission.messages(call, requests)
            if handler.request_streaming:
                replies = streaming(watched, context)
            else:
                replies = streaming(_first(watched, context, name), context)
            yield from admission.replies(call, replies)

    return grpc.stream_stream_rpc_method_handler(
        stream_reply, request_deserializer=deserialize, response_serializer=serialize
    )
