"""Bearer-token authentication: tenants (`--auth-file`) and peers (`--peer-token-file`).

The auth file has one `TENANT TOKEN` pair a line (blank lines and `#` comments
are ignored). A client sends `authorization: Bearer TOKEN`; every call but the
health service's needs a valid token, and the token's tenant is the namespace
the call's modules live in.

The coordinator service is for peers only: servers that call it on behalf of
their SyncBatchNorm ranks present a peer token (one per line in the peer token
file; several allow rotation). A tenant's token there is PERMISSION_DENIED, so
no tenant can touch a round, its own or another's. Without a peer token file a
server with an auth file refuses every remote coordinator call (its embedded
coordinator is used in process); a process with neither file is open.

Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from bnserver.errors import Unauthenticated
from bnserver.rpc.admission import ANONYMOUS, PEERS, Admission, guarded

#: Methods that need no token: load balancers and orchestrators probe health.
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)

#: Answered without reading its request (see `_health_without_reading`).
HEALTH_CHECK = "/grpc.health.v1.Health/Check"

#: Methods for peers (servers), not tenants.
PEER_PREFIXES = ("/bnservice.v1.CoordinatorService/",)


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

    @property
    def tenants(self) -> list[str]:
        """The tenants' names, sorted, each once."""
        return sorted({tenant for tenant, _ in self._pairs})

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


def load_peer_tokens(path: Path) -> list[str]:
    """The tokens of a peer token file: one a line, blank lines and `#` comments ignored."""
    tokens = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if len(text.split()) != 1:
            raise ValueError(f"{path}:{number}: expected one token a line")
        tokens.append(text)
    if not tokens:
        raise ValueError(f"{path}: a peer token file needs at least one token")
    return tokens


def _matches(token: str | None, known: Sequence[str]) -> bool:
    if not token:
        return False
    offered = token.encode()
    found = False
    for candidate in known:
        found |= hmac.compare_digest(offered, candidate.encode())
    return found


class Gate(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """The one interceptor every call passes before any of its bytes are read.

    Refuses calls without the right token (see the module docstring) with a
    handler that reads nothing, and runs every other call under `admission`
    (calls in progress per tenant, idle I/O cancelled: `bnserver.rpc.admission`).

    tokens: tenants' tokens (None: tenant services are open, every caller is tenant "").
    peer_tokens: tokens of peers allowed on the coordinator service.
    """

    def __init__(
        self,
        tokens: Tokens | None,
        peer_tokens: Sequence[str] | None = None,
        admission: Admission | None = None,
        health: Callable[[], Any] | None = None,
    ) -> None:
        self.tokens = tokens
        self.peer_tokens = list(peer_tokens) if peer_tokens else None
        self.admission = admission if admission is not None else Admission()
        self.health = health

    def _refusal(self, method: str, token: str | None) -> tuple[grpc.StatusCode, str] | None:
        """Why a call to `method` with `token` is refused, or None to let it through."""
        if method.startswith(EXEMPT_PREFIXES):
            return None
        is_tenant = self.tokens is not None and self.tokens.tenant_for(token) is not None
        if method.startswith(PEER_PREFIXES):
            if self.peer_tokens is None and self.tokens is None:
                return None
            if self.peer_tokens is not None and _matches(token, self.peer_tokens):
                return None
            if is_tenant:
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "the coordinator service is for servers (peer tokens); tenant tokens "
                    "may not call it",
                )
            return grpc.StatusCode.UNAUTHENTICATED, "missing or invalid peer token"
        if self.tokens is None or is_tenant:
            return None
        return grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"

    def _bucket(self, method: str, token: str | None) -> str:
        """Whose calls in progress this call counts against (it passed `_refusal`)."""
        if method.startswith(PEER_PREFIXES):
            return PEERS
        if method.startswith(EXEMPT_PREFIXES) or self.tokens is None:
            return ANONYMOUS if method.startswith(EXEMPT_PREFIXES) else ""
        tenant = self.tokens.tenant_for(token)
        assert tenant is not None
        return tenant

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = details.method  # type: ignore[attr-defined]
        token = bearer(details.invocation_metadata)  # type: ignore[attr-defined]
        handler = continuation(details)
        if handler is None:
            return None
        refusal = self._refusal(method, token)
        if refusal is not None:
            return _deny_like(handler, *refusal)
        if method == HEALTH_CHECK and self.health is not None:
            return _health_without_reading(handler, self.health)
        return guarded(handler, self.admission, method, self._bucket(method, token))


def _health_without_reading(
    handler: grpc.RpcMethodHandler[Any, Any], health: Callable[[], Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """Health checks answered at once with the server's overall status, without waiting
    for the request (which only names a service, and every service here shares the
    process's status): a flood of checks that never send their request holds no worker,
    and probes always get an answer."""

    def check(requests: Any, context: grpc.ServicerContext) -> Any:
        return health()

    return grpc.stream_unary_rpc_method_handler(
        check, response_serializer=handler.response_serializer
    )


def _deny_like(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that refuses the call without reading it."""

    # Request-streaming whatever the method's shape, so that no request message is
    # awaited: the call ends before the client has sent anything.
    def deny(requests: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    return grpc.stream_unary_rpc_method_handler(deny)
