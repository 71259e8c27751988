"""The one table between domain errors and gRPC status codes, in both directions.

`bnserver.rpc.shell` ends a failed call with the status mapped from its
exception; the coordinator client maps a status back with `error_for`.
"""

from __future__ import annotations

import grpc

from bnserver import errors
from bnservice import wire

#: Domain error -> status code (the README's error table).
STATUS_CODES: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
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
