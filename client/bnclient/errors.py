"""Typed exceptions for failed calls, mapped back from gRPC status codes in one table.

Every exception is a `ServiceError` carrying `.code` (a `grpc.StatusCode`) and
`.details` (the server's message). Invalid-argument errors are also
`ValueError`s, not-found errors `LookupError`s, deadline errors `TimeoutError`s.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A call that ended with a non-OK gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgumentError(ServiceError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ServiceError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhaustedError(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(ServiceError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class AbortedError(ServiceError):
    code = grpc.StatusCode.ABORTED


class UnauthenticatedError(ServiceError, PermissionError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(ServiceError, PermissionError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(ServiceError, ConnectionError):
    code = grpc.StatusCode.UNAVAILABLE


class CancelledError(ServiceError):
    code = grpc.StatusCode.CANCELLED


class InternalError(ServiceError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        ResourceExhaustedError,
        DeadlineExceededError,
        AbortedError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        CancelledError,
        InternalError,
    )
}


def from_status(code: grpc.StatusCode, details: str) -> ServiceError:
    """The typed exception for a status (ServiceError for unmapped codes)."""
    return _BY_CODE.get(code, ServiceError)(details, code)


def from_rpc_error(err: grpc.RpcError) -> ServiceError:
    """The typed exception for a failed call (ServiceError for unmapped codes)."""
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
    cls = _BY_CODE.get(code, ServiceError)
    return cls(details, code)
