"""Bearer-token authentication and tenants (`--auth-file`).

The auth file has one `TENANT TOKEN` pair a line (blank lines and `#` comments
are ignored). A client sends `authorization: Bearer TOKEN`; every call but the
health service's needs a valid token, and the token's tenant is the namespace
the call's modules live in. Tokens are compared in constant time and never
logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from bnserver.errors import Unauthenticated

#: Methods that need no token: load balancers and orchestrators probe health.
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


class Tokens:
    """The (tenant, token) pairs of an auth file."""

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        if not pairs:
            raise ValueError("an auth file needs at least one 'TENANT TOKEN' line")
        self._pairs = [(tenant, token.encode()) for tenant, token in pairs]

    @classmethod
    def load(cls, path: Path) -> Tokens:
        pairs = []
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            fields = text.split()
            if len(fields) != 2:
                # The line may hold a token: name the line, never echo it.
                raise ValueError(f"{path}:{number}: expected 'TENANT TOKEN'")
            pairs.append((fields[0], fields[1]))
        return cls(pairs)

    def tenant_for(self, token: str | None) -> str | None:
        """The tenant of `token`, or None. Compares against every token, in constant time."""
        if not token:
            return None
        offered = token.encode()
        found = None
        for tenant, known in self._pairs:
            if hmac.compare_digest(offered, known) and found is None:
                found = tenant
        return found


def bearer(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The token of an `authorization: Bearer TOKEN` metadata entry, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


class Authenticator:
    """Resolves a call's tenant; without tokens (no --auth-file) every call is tenant ""."""

    def __init__(self, tokens: Tokens | None = None) -> None:
        self.tokens = tokens

    def tenant(self, context: grpc.ServicerContext) -> str:
        if self.tokens is None:
            return ""
        tenant = self.tokens.tenant_for(bearer(context.invocation_metadata()))
        if tenant is None:
            raise Unauthenticated("missing or invalid bearer token")
        return tenant


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Answers UNAUTHENTICATED to every call without a valid token, except health checks."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = details.method  # type: ignore[attr-defined]
        if method.startswith(EXEMPT_PREFIXES):
            return continuation(details)
        metadata = details.invocation_metadata  # type: ignore[attr-defined]
        if self.tokens.tenant_for(bearer(metadata)) is not None:
            return continuation(details)
        handler = continuation(details)
        return None if handler is None else _deny_like(handler)


def _deny(request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")


def _deny_like(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same streaming shape as `handler` that refuses the call."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny)
    return grpc.unary_unary_rpc_method_handler(_deny)
