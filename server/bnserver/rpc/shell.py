"""Servicer scaffolding: every exception ends the call with its mapped status.

Servicers wrap their methods with `rpc` (unary replies) or `rpc_stream`
(streamed replies); `call_context` turns the incoming call's deadline and
cancellation into the domain layer's `CallContext`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc

from bnserver.calls import CallContext
from bnserver.rpc.status import status_of
from bnservice import wire

log = logging.getLogger(__name__)

#: Remaining seconds beyond which a call counts as having no deadline (a year).
NO_DEADLINE = 365 * 24 * 3600.0

#: A call that ends within this many seconds of its deadline ended by its deadline (the
#: client's clock runs a little ahead of the server's copy of the deadline).
DEADLINE_SLACK = 0.05

#: Seconds a truncated request stream waits to learn whether it was cancelled.
CANCEL_GRACE = 0.1

F = TypeVar("F", bound=Callable[..., Any])


def abort_with(context: grpc.ServicerContext, exc: Exception, method: str) -> NoReturn:
    """End the call with the status mapped from `exc` (logging unexpected errors).

    A call whose caller has gone (cancelled, past its deadline, or cancelled by
    --idle-timeout) ends as CANCELLED or DEADLINE_EXCEEDED without a traceback:
    reading its request stream raises grpc.RpcError, which is no fault of the
    server, and the access log already has the call's one line.
    """
    if isinstance(exc, wire.TruncatedStream):
        # A cancelled stream can look like one that ended early for a moment: gRPC
        # may deliver the end of the requests before it marks the call cancelled.
        deadline = time.monotonic() + CANCEL_GRACE
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.005)
    if isinstance(exc, grpc.RpcError) or not context.is_active():
        # gRPC keeps the error with the call's state; without its traceback it no
        # longer holds the handler's frames (and the buffers they reference).
        exc.__traceback__ = None
        expired = context.time_remaining() <= DEADLINE_SLACK
        code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        log.debug("%s ended by its caller (%s): %s", method, code.name, exc)
        context.abort(code, "the caller cancelled the call or its deadline passed")
        raise AssertionError("context.abort returns only by raising")
    code, message = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method)
    context.abort(code, message)
    raise AssertionError("context.abort returns only by raising")


def rpc(method: F) -> F:
    """Wrap a servicer method so every exception ends the call with its mapped status."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            abort_with(context, exc, method.__name__)

    return wrapper  # type: ignore[return-value]


def rpc_stream(method: F) -> F:
    """`rpc` for servicer methods that return a stream (generators)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except Exception as exc:
            abort_with(context, exc, method.__name__)

    return wrapper  # type: ignore[return-value]


def call_context(context: grpc.ServicerContext) -> CallContext:
    """The incoming call's deadline, and an event set when it ends (cancelled or done)."""
    remaining: float | None = context.time_remaining()
    # Without a deadline gRPC reports a remaining time of centuries: say "none".
    if remaining is not None and remaining > NO_DEADLINE:
        remaining = None
    call = CallContext.with_timeout(remaining)
    context.add_callback(call.cancelled.set)
    return call
