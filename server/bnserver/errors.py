"""Domain errors of the server side.

The layers below the RPC shells raise these; `bnserver.rpc.status` maps each
class to a gRPC status code in one table. They know nothing of gRPC.

    ServiceError
    ├── InvalidArgument (also ValueError)   INVALID_ARGUMENT
    ├── NotFound (also LookupError)         NOT_FOUND
    ├── AlreadyExists                       ALREADY_EXISTS
    ├── ResourceExhausted                   RESOURCE_EXHAUSTED
    ├── DeadlineExceeded                    DEADLINE_EXCEEDED
    ├── Aborted                             ABORTED
    ├── Unauthenticated                     UNAUTHENTICATED
    ├── PermissionDenied                    PERMISSION_DENIED
    ├── FailedPrecondition                  FAILED_PRECONDITION
    └── Unavailable                         UNAVAILABLE
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a request can fail with; the message goes to the client."""


class InvalidArgument(ServiceError, ValueError):
    """Bad shape, dtype, channel count, config, n=1 batch, non-finite batch or tensor."""


class NotFound(ServiceError, LookupError):
    """Unknown module or backward handle (including another tenant's module)."""


class AlreadyExists(ServiceError):
    """Create with a config that differs from the existing module of that name."""


class ResourceExhausted(ServiceError):
    """Over a size or count limit."""


class DeadlineExceeded(ServiceError):
    """A sync peer did not arrive before the deadline."""


class Aborted(ServiceError):
    """A sync round was abandoned."""


class Unauthenticated(ServiceError):
    """No or wrong credentials."""


class PermissionDenied(ServiceError):
    """Valid credentials without the right (a tenant's token on the coordinator service)."""


class FailedPrecondition(ServiceError):
    """The system is not in the state the call needs."""


class Unavailable(ServiceError):
    """A state write failed, or a dependency (the coordinator) cannot be reached."""
