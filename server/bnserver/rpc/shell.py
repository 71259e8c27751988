"""Servicer scaffolding: every exception ends the call with its mapped status.

Servicers wrap their methods with `rpc` (unary replies) or `rpc_stream`
(streamed replies); `call_context` turns the incoming call's deadline and
cancellation into the domain layer's `CallContext`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc

from bnserver.calls import CallContext
from bnserver.rpc.status import status_of

log = logging.getLogger(__name__)

#: Remaining seconds beyond which a call counts as having no deadline (a year).
NO_DEADLINE = 365 * 24 * 3600.0

F = TypeVar("F", bound=Callable[..., Any])


def abort_with(context: grpc.ServicerContext, exc: Exception, method: str) -> NoReturn:
    """End the call with the status mapped from `exc` (logging unexpected errors).

    A call its client cancelled, or that passed its deadline, or that the idle
    watchdog cancelled, is handled by `ended` instead."""
    code, message = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method)
    context.abort(code, message)
    raise AssertionError("context.abort returns only by raising")


def ended(context: grpc.ServicerContext, exc: BaseException, method: str) -> bool:
    """Whether `exc` only says the call is over (its client cancelled it, its deadline
    passed or --idle-timeout cancelled it); then it is logged as one line."""
    if isinstance(exc, grpc.RpcError) and not context.is_active():
        log.info("%s ended early: cancelled, past its deadline, or idle", method)
        # gRPC keeps the error with the call's state; without its traceback it no
        # longer holds the handler's frames (and the buffers they reference).
        exc.__traceback__ = None
        return True
    return False


def end_quietly(context: grpc.ServicerContext) -> NoReturn:
    """End a unary call nobody waits for any more (gRPC sends nothing and logs nothing
    for an aborted call)."""
    context.abort(grpc.StatusCode.CANCELLED, "the call ended early")
    raise AssertionError("context.abort returns only by raising")


def rpc(method: F) -> F:
    """Wrap a servicer method so every exception ends the call with its mapped status."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            if ended(context, exc, method.__name__):
                end_quietly(context)
            abort_with(context, exc, method.__name__)

    return wrapper  # type: ignore[return-value]


def rpc_stream(method: F) -> F:
    """`rpc` for servicer methods that return a stream (generators)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except Exception as exc:
            if ended(context, exc, method.__name__):
                return
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
