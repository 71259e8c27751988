"""The one table between domain errors and gRPC status codes, in both directions.

Servicers wrap their methods with `rpc`, which ends a failed call with the
mapped status; the coordinator client maps a status back with `error_for`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc

from bnserver import errors
from bnserver.calls import CallContext
from bnservice import wire

log = logging.getLogger(__name__)

#: Domain error -> status code (DESIGN.md section 5).
STATUS_CODES: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}
_ERRORS = {code: cls for cls, code in STATUS_CODES.items()}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a call that raised `exc` answers with."""
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code, str(exc)
    if isinstance(exc, wire.WireError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def error_for(code: grpc.StatusCode, message: str) -> errors.ServiceError:
    """The domain error for a status received from another service (Unavailable if unmapped)."""
    return _ERRORS.get(code, errors.Unavailable)(message)


F = TypeVar("F", bound=Callable[..., Any])


def abort_with(context: grpc.ServicerContext, exc: Exception, method: str) -> NoReturn:
    """End the call with the status mapped from `exc` (logging unexpected errors)."""
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
    call = CallContext.with_timeout(context.time_remaining())
    context.add_callback(call.cancelled.set)
    return call
