"""The `Client`: one gRPC channel to a bnserver, shared by module proxies and threads."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import grpc
import numpy as np

from bnclient import errors
from bnclient.modules import (
    PROXY_CLASSES,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    ModuleInfo,
    SyncBatchNorm,
    _info_from_pb,
)
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

#: Calls that can be repeated after a lost reply with the same outcome. Forward
#: carries a request id the server deduplicates (a SyncBatchNorm rank's retry
#: gets its round's committed result); Backward spends its handle, so it is not
#: retried.
IDEMPOTENT = frozenset(
    {
        "CreateModule",
        "GetModule",
        "ListModules",
        "GetState",
        "SetTraining",
        "LoadState",
        "ResetRunningStats",
        "ResetParameters",
        "Forward",
        "StreamForward",
    }
)
#: The server could not be reached (or the connection dropped): the call may be sent
#: again. DEADLINE_EXCEEDED is final: either the call's own deadline passed (the
#: timeout bounds the whole call) or a SyncBatchNorm round timed out on the server.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
MAX_BACKOFF = 2.0

#: Tensors above this many bytes are streamed in chunks (see bench/transport.py).
STREAM_THRESHOLD = 1 << 20

T = TypeVar("T")


class Client:
    """A connection to a bnserver. Thread-safe; use as a context manager or call close().

    target: "host:port" of the server.
    token: bearer token sent with every call (servers started with --auth-file).
    root_certificates: PEM bytes of the CA that signed the server's TLS
        certificate; gives a TLS channel.
    timeout: seconds each call may take, retries included (None: no deadline).
    retries: how often an idempotent call is retried after UNAVAILABLE, with
        jittered exponential backoff from
        `retry_backoff` seconds. Training forwards are retried too: they carry a
        request id, and the server applies each id's update once.
    stream_threshold: tensors larger than this many bytes travel as chunked
        streams instead of one message (any size works; large unary messages
        are slower and gRPC refuses them from 2 GiB).

    A Client pickles as its constructor arguments (token and certificates
    included) and unpickles into a new connection to the same server;
    `copy.deepcopy` returns the same Client, so copies of modules share it.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        stream_threshold: int = STREAM_THRESHOLD,
        retries: int = 5,
        retry_backoff: float = 0.1,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._args: dict[str, Any] = {
            "target": target,
            "token": token,
            "root_certificates": root_certificates,
            "timeout": timeout,
            "stream_threshold": stream_threshold,
            "retries": retries,
            "retry_backoff": retry_backoff,
            "options": tuple(options),
        }
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.stream_threshold = stream_threshold
        opts = [
            ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
            *options,
        ]
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._stub = pb_grpc.BatchNormServiceStub(self._channel)

    # -- lifecycle ----------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (self._args,))

    def __copy__(self) -> Client:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Client:
        return self  # one connection, shared: it is thread-safe

    # -- modules ------------------------------------------------------------

    def batch_norm_1d(
        self,
        name: str,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.9,
        affine: bool = True,
        track_running_stats: bool = True,
        freeze: bool = False,
    ) -> BatchNorm1d:
        """Get or create the BatchNorm1d `name` ((N, C) or (N, C, L) input).

        momentum follows MegEngine (0.9 is PyTorch's 0.1); None makes the running
        statistics the cumulative average of every training batch (PyTorch's None).
        """
        config = _config(
            pb.MODULE_KIND_BATCH_NORM_1D,
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            freeze,
        )
        return BatchNorm1d(self, _info_from_pb(self._create(name, 0, config)))

    def batch_norm_2d(
        self,
        name: str,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.9,
        affine: bool = True,
        track_running_stats: bool = True,
        freeze: bool = False,
    ) -> BatchNorm2d:
        """Get or create the BatchNorm2d `name` ((N, C, H, W) input)."""
        config = _config(
            pb.MODULE_KIND_BATCH_NORM_2D,
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            freeze,
        )
        return BatchNorm2d(self, _info_from_pb(self._create(name, 0, config)))

    def batch_norm_3d(
        self,
        name: str,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.9,
        affine: bool = True,
        track_running_stats: bool = True,
        freeze: bool = False,
    ) -> BatchNorm3d:
        """Get or create the BatchNorm3d `name` ((N, C, D, H, W) input)."""
        config = _config(
            pb.MODULE_KIND_BATCH_NORM_3D,
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            freeze,
        )
        return BatchNorm3d(self, _info_from_pb(self._create(name, 0, config)))

    def sync_batch_norm(
        self,
        name: str,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.9,
        affine: bool = True,
        track_running_stats: bool = True,
        freeze: bool = False,
        *,
        group: str,
        rank: int,
        world_size: int,
        eps_mode: str = "additive",
    ) -> SyncBatchNorm:
        """Get or create rank `rank` of SyncBatchNorm `name` in `group` (2-D to 5-D input,
        (N, C, *spatial)).

        Every rank of the group calls this with the same name and config; the
        ranks may sit on one server or several. eps_mode "max" normalizes with
        max(var, eps) instead of var + eps.
        """
        config = _config(
            pb.MODULE_KIND_SYNC_BATCH_NORM,
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            freeze,
        )
        modes = {"additive": pb.EPS_MODE_ADDITIVE, "max": pb.EPS_MODE_MAX}
        if eps_mode not in modes:
            raise errors.InvalidArgumentError(
                f"eps_mode must be 'additive' or 'max', got {eps_mode!r}"
            )
        config.sync.CopyFrom(
            pb.SyncConfig(
                group=group, rank=int(rank), world_size=int(world_size), eps_mode=modes[eps_mode]
            )
        )
        return SyncBatchNorm(self, _info_from_pb(self._create(name, int(rank), config)))

    def module(self, name: str, rank: int = 0) -> BatchNorm:
        """Attach to the existing module `name` (of any kind; NotFoundError if absent).

        The proxy's class follows the module's kind (BatchNorm1d, BatchNorm2d,
        BatchNorm3d, SyncBatchNorm); pass `rank` for a SyncBatchNorm rank that
        shares its name with its peers on this server.
        """
        request = pb.GetModuleRequest(ref=pb.ModuleRef(name=name, rank=int(rank)))
        return self._proxy(_info_from_pb(self._call("GetModule", request)))

    def _proxy(self, info: ModuleInfo) -> BatchNorm:
        cls = PROXY_CLASSES.get(info.kind)
        if cls is None:
            raise errors.ServiceError(f"module {info.name!r} is of an unknown kind")
        return cls(self, info)

    @overload
    def list_modules(self, proxies: Literal[False] = False) -> list[ModuleInfo]: ...

    @overload
    def list_modules(self, proxies: Literal[True]) -> list[BatchNorm]: ...

    def list_modules(self, proxies: bool = False) -> list[ModuleInfo] | list[BatchNorm]:
        """The server's modules (this tenant's), sorted by name and rank: descriptions,
        or with `proxies` module proxies (the class of each module's kind)."""
        reply = self._call("ListModules", pb.ListModulesRequest())
        infos = [_info_from_pb(m) for m in reply.modules]
        if proxies:
            return [self._proxy(info) for info in infos]
        return infos

    def delete_module(self, name: str, rank: int = 0) -> None:
        """Delete module `name` (for a SyncBatchNorm rank sharing a name, pass its rank)."""
        request = pb.DeleteModuleRequest(ref=pb.ModuleRef(name=name, rank=rank))
        maybe_applied = False  # an earlier attempt may have deleted it and lost the reply

        def attempt(timeout: float | None) -> None:
            nonlocal maybe_applied
            try:
                self._stub.DeleteModule(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                code = err.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.NOT_FOUND and maybe_applied:
                    return
                maybe_applied = maybe_applied or code == grpc.StatusCode.DEADLINE_EXCEEDED
                raise

        self._with_retries(attempt, retry=True)

    # -- plumbing -----------------------------------------------------------

    def _create(self, name: str, rank: int, config: pb.ModuleConfig) -> pb.ModuleInfo:
        request = pb.CreateModuleRequest(ref=pb.ModuleRef(name=name, rank=rank), config=config)
        reply: pb.ModuleInfo = self._call("CreateModule", request)
        return reply

    def _call(self, method: str, request: Any, retry: bool | None = None) -> Any:
        """Invoke a unary RPC; failures raise the typed ServiceError for their status.

        Idempotent calls (and those with `retry`) are retried on UNAVAILABLE and
        DEADLINE_EXCEEDED.
        """
        stub_method = getattr(self._stub, method)
        return self._with_retries(
            lambda timeout: stub_method(request, timeout=timeout, metadata=self._metadata),
            method in IDEMPOTENT if retry is None else retry,
        )

    def _stream(
        self,
        method: str,
        requests: Callable[[], Iterator[Any]],
        tensor_of: Callable[[Any], pb.Tensor],
        retry: bool | None = None,
    ) -> tuple[Any, np.ndarray]:
        """Invoke a chunk-streaming RPC with `requests()`; return the reply header and tensor."""
        stub_method = getattr(self._stub, method)

        def attempt(timeout: float | None) -> tuple[Any, np.ndarray]:
            replies = stub_method(requests(), timeout=timeout, metadata=self._metadata)
            return wire.receive(replies, tensor_of)

        return self._with_retries(attempt, method in IDEMPOTENT if retry is None else retry)

    def _with_retries(self, attempt: Callable[[float | None], T], retry: bool) -> T:
        """Run `attempt(timeout)`, retrying transient failures with jittered exponential
        backoff; every attempt and pause fits in the call's `self.timeout`."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        delay = self.retry_backoff
        for n in itertools.count():
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                return attempt(remaining)
            except grpc.RpcError as err:
                error = errors.from_rpc_error(err)
                if not retry or n >= self.retries or error.code not in RETRYABLE:
                    raise error from None
            pause = delay * random.uniform(0.5, 1.5)
            if deadline is not None and time.monotonic() + pause >= deadline:
                raise error
            time.sleep(pause)
            delay = min(delay * 2, MAX_BACKOFF)
        raise AssertionError("unreachable")


def _restore(args: dict[str, Any]) -> Client:
    """Unpickle a Client: a new connection with the same arguments."""
    return Client(**args)


def _config(
    kind: pb.ModuleKind.ValueType,
    num_features: int,
    eps: float,
    momentum: float | None,
    affine: bool,
    track_running_stats: bool,
    freeze: bool,
) -> pb.ModuleConfig:
    if isinstance(num_features, bool) or not isinstance(num_features, int | np.integer):
        raise errors.InvalidArgumentError(
            f"num_features must be an int, got {type(num_features).__name__}"
        )
    return pb.ModuleConfig(
        kind=kind,
        num_features=int(num_features),
        eps=float(eps),
        momentum=0.0 if momentum is None else float(momentum),
        cumulative_average=momentum is None,
        affine=bool(affine),
        track_running_stats=bool(track_running_stats),
        freeze=bool(freeze),
    )


__all__ = ["BatchNorm", "Client", "ModuleInfo"]
