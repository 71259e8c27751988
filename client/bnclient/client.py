"""The `Client`: one gRPC channel to a bnserver, shared by module proxies and threads."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import grpc
import numpy as np

from bnclient import errors
from bnclient._session import SessionPool, StreamBroken
from bnclient._shm import Link, LinkError, boot_id
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

#: Tensors of at least this many bytes go through shared memory when the server shares
#: this host (below it, copying through a message costs less than the extra socket
#: round trip a new segment needs).
SHM_THRESHOLD = 64 << 10

#: Forwards and backwards with tensors up to this many bytes go through a persistent
#: Session stream (no gRPC call each).
SESSION_THRESHOLD = 64 << 10

#: Seconds before "auto" tries shared memory again after the server's socket failed.
SHM_RETRY_AFTER = 10.0

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
    shared_memory: "auto" (default): tensors of at least `shm_threshold` bytes
        travel through shared memory when the server runs on this host and its
        shared-memory socket proves to be that server's; True: the same, and
        the constructor raises UnavailableError when it cannot work; False: never.
    sessions: small forwards and backwards (tensors up to `session_threshold`
        bytes) travel over persistent Session streams, one per thread in flight,
        instead of a call each (False: unary calls).

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
        shared_memory: Literal["auto"] | bool = "auto",
        shm_threshold: int = SHM_THRESHOLD,
        sessions: bool = True,
        session_threshold: int = SESSION_THRESHOLD,
    ) -> None:
        if shared_memory not in ("auto", True, False):
            raise ValueError(f"shared_memory must be 'auto', True or False, not {shared_memory!r}")
        self._args: dict[str, Any] = {
            "target": target,
            "token": token,
            "root_certificates": root_certificates,
            "timeout": timeout,
            "stream_threshold": stream_threshold,
            "retries": retries,
            "retry_backoff": retry_backoff,
            "options": tuple(options),
            "shared_memory": shared_memory,
            "shm_threshold": shm_threshold,
            "sessions": sessions,
            "session_threshold": session_threshold,
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
        self._token = token
        self.shared_memory = shared_memory
        self.shm_threshold = shm_threshold
        self.session_threshold = session_threshold
        self._shm_lock = threading.Lock()
        self._shm_link: Link | None = None
        self._shm_off_until = 0.0  # "auto": no shared memory before this time.monotonic()
        self._sessions: SessionPool | None = None
        self._described = False
        if sessions:
            self._sessions = SessionPool(
                lambda requests: self._stub.Session(requests, metadata=self._metadata)
            )
        if shared_memory is True:
            self._link()  # fails now, clearly, if it cannot work

    # -- lifecycle ----------------------------------------------------------

    def close(self) -> None:
        if self._sessions is not None:
            self._sessions.close()
        with self._shm_lock:
            if self._shm_link is not None:
                self._shm_link.close()
                self._shm_link = None
        self._channel.close()

    @property
    def uses_shared_memory(self) -> bool:
        """Whether large tensors go through shared memory now (connects if need be)."""
        return self._link() is not None

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
        kind = pb.MODULE_KIND_BATCH_NORM_1D
        args = (num_features, eps, momentum, affine, track_running_stats, freeze)
        return BatchNorm1d(self, self._plain(name, kind, *args))

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
        kind = pb.MODULE_KIND_BATCH_NORM_2D
        args = (num_features, eps, momentum, affine, track_running_stats, freeze)
        return BatchNorm2d(self, self._plain(name, kind, *args))

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
        kind = pb.MODULE_KIND_BATCH_NORM_3D
        args = (num_features, eps, momentum, affine, track_running_stats, freeze)
        return BatchNorm3d(self, self._plain(name, kind, *args))

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

    def _plain(
        self,
        name: str,
        kind: pb.ModuleKind.ValueType,
        num_features: int,
        eps: float,
        momentum: float | None,
        affine: bool,
        track_running_stats: bool,
        freeze: bool,
    ) -> ModuleInfo:
        """Get or create a BatchNorm1d/2d/3d of `kind`: the module's info."""
        config = _config(kind, num_features, eps, momentum, affine, track_running_stats, freeze)
        return _info_from_pb(self._create(name, 0, config))

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
            except errors.ServiceError as err:  # a Session message's own status
                error = err
            if not retry or n >= self.retries or error.code not in RETRYABLE:
                raise error from None
            pause = delay * random.uniform(0.5, 1.5)
            if deadline is not None and time.monotonic() + pause >= deadline:
                raise error
            time.sleep(pause)
            delay = min(delay * 2, MAX_BACKOFF)
        raise AssertionError("unreachable")

    # -- transports of forward and backward ----------------------------------

    def _link(self) -> Link | None:
        """The shared-memory link to the server, (re)connected if need be; None when
        shared memory is off or cannot work ("auto"); UnavailableError when it cannot
        work and shared_memory is True."""
        if self.shared_memory is False:
            return None
        with self._shm_lock:
            link = self._shm_link
            if link is not None and link.alive():
                return link
            if link is not None:
                link.close()  # the server stopped or restarted: its segments are gone
                self._shm_link = None
            if self.shared_memory == "auto" and time.monotonic() < self._shm_off_until:
                return None
            try:
                self._shm_link = self._connect_shm()
            except (LinkError, errors.ServiceError) as exc:
                if self.shared_memory is True:
                    raise errors.UnavailableError(
                        f"shared memory with {self.target} cannot work: {exc}"
                    ) from None
                self._shm_off_until = time.monotonic() + SHM_RETRY_AFTER
                return None
            return self._shm_link

    def _connect_shm(self) -> Link:
        try:
            about: pb.ServerDescription = self._call("Describe", pb.DescribeRequest())
        except errors.ServiceError as exc:
            if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                raise LinkError("the server predates shared memory") from None
            raise
        if not about.shm_socket:
            raise LinkError("the server has shared memory off (--shm-socket none)")
        if not about.host_id or about.host_id != boot_id():
            raise LinkError("the server runs on another host")
        self._described = True
        if about.idle_timeout > 0 and self._sessions is not None:
            self._sessions.max_idle = about.idle_timeout / 2
        return Link(about.shm_socket, about.instance, about.pid, self._token)

    def _forward(
        self, request: pb.ForwardRequest, array: np.ndarray
    ) -> tuple[pb.ForwardResponse, np.ndarray]:
        """One forward of `array` (request without input): shared memory, a stream, a
        Session message or a unary call, by size. Retried with its request id."""
        nbytes = array.nbytes
        if nbytes >= self.shm_threshold and (link := self._link()) is not None:
            return self._shared("Forward", request, array, link, retry=True)
        if nbytes > self.stream_threshold:
            sent = wire.encode_header(array, request.input)
            return self._stream(  # type: ignore[no-any-return]
                "StreamForward",
                lambda: wire.send(pb.ForwardChunk, request, sent),
                lambda h: h.output,
                True,
            )
        wire.encode(array, request.input)
        if nbytes <= self.session_threshold and self._sessions is not None:
            reply = self._in_session("forward", request, retry=True)
        else:
            reply = self._call("Forward", request, True)
        return reply, wire.decode(reply.output)

    def _backward(
        self, request: pb.BackwardRequest, grad: np.ndarray
    ) -> tuple[pb.BackwardResponse, np.ndarray]:
        """One backward (never retried: its handle is single use), by size as `_forward`."""
        nbytes = grad.nbytes
        if nbytes >= self.shm_threshold and (link := self._link()) is not None:
            return self._shared("Backward", request, grad, link, retry=False)
        if nbytes > self.stream_threshold:
            sent = wire.encode_header(grad, request.grad_output)
            return self._stream(  # type: ignore[no-any-return]
                "StreamBackward",
                lambda: wire.send(pb.BackwardChunk, request, sent),
                lambda h: h.grad_input,
            )
        wire.encode(grad, request.grad_output)
        if nbytes <= self.session_threshold and self._sessions is not None:
            reply = self._in_session("backward", request, retry=False)
        else:
            reply = self._call("Backward", request)
        return reply, wire.decode(reply.grad_input)

    def _shared(
        self, method: str, request: Any, array: np.ndarray, link: Link, retry: bool
    ) -> tuple[Any, np.ndarray]:
        """A Forward or Backward whose tensor travels in a shared segment (the server
        writes its result over it); each attempt writes the tensor again."""
        field = "input" if method == "Forward" else "grad_output"
        contiguous = wire.encode_header(array, getattr(request, field))
        region: pb.SharedRegion = getattr(request, f"{field}_region")
        stub_method = getattr(self._stub, method)
        first = True

        def attempt(timeout: float | None) -> tuple[Any, np.ndarray]:
            nonlocal first, link
            if not first:
                fresh = self._link()  # the server may have restarted meanwhile
                if fresh is None:
                    raise errors.UnavailableError("the shared-memory socket is gone")
                link = fresh
            first = False
            try:
                with link.segment(contiguous.nbytes) as segment:
                    view = segment.array(contiguous.dtype, contiguous.shape)
                    np.copyto(view, contiguous)
                    region.segment, region.offset = segment.id, 0
                    region.length = contiguous.nbytes
                    reply = stub_method(request, timeout=timeout, metadata=self._metadata)
                    result = np.array(view)  # the segment is reused once given back
            except (OSError, LinkError) as exc:
                # The link broke (the server restarted): retried on a new one.
                raise errors.UnavailableError(f"the shared-memory socket failed: {exc}") from None
            return reply, result

        return self._with_retries(attempt, retry)

    def _learn_idle_timeout(self, pool: SessionPool) -> None:
        """Ask the server once after how long it cancels an idle stream, so that the pool
        reopens streams before (an older server's answer is UNIMPLEMENTED: keep 15 s)."""
        self._described = True
        try:
            about: pb.ServerDescription = self._call("Describe", pb.DescribeRequest())
        except errors.ServiceError:
            return
        if about.idle_timeout > 0:
            pool.max_idle = about.idle_timeout / 2

    def _in_session(self, which: str, request: Any, retry: bool) -> Any:
        """One forward or backward as a message of a pooled Session stream; falls back
        to the unary call when the server refuses streams (older server, or this
        tenant's calls in progress at --max-calls-per-tenant)."""
        pool = self._sessions
        assert pool is not None
        method = "Forward" if which == "forward" else "Backward"
        if not self._described:
            self._learn_idle_timeout(pool)

        def attempt(timeout: float | None) -> Any:
            message = pb.SessionRequest(timeout=timeout or 0.0)
            getattr(message, which).CopyFrom(request)
            deadline = None if timeout is None else time.monotonic() + timeout
            if deadline is not None:
                pool.watch()
            session = pool.take()
            healthy = False
            try:
                reply: pb.SessionReply = session.ask(message, deadline)
                healthy = True
            except StreamBroken as broken:
                code = broken.error.code()  # type: ignore[attr-defined]
                if broken.ours:
                    raise errors.DeadlineExceededError(
                        "the call's deadline passed without a reply"
                    ) from None
                if broken.fresh and code in (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.UNIMPLEMENTED,
                ):
                    if code == grpc.StatusCode.UNIMPLEMENTED:
                        self._sessions = None
                    stub_method = getattr(self._stub, method)
                    return stub_method(request, timeout=timeout, metadata=self._metadata)
                if code == grpc.StatusCode.CANCELLED and not broken.fresh and which == "forward":
                    # The server ended a stream idle too long just as we reused it: the
                    # message may not have run; its request id makes a retry safe.
                    raise errors.UnavailableError("the session stream was closed") from None
                raise broken.error from None
            finally:
                pool.give(session, healthy)
            if reply.code:
                status = _STATUS.get(reply.code, grpc.StatusCode.UNKNOWN)
                raise errors.from_status(status, reply.message)
            return getattr(reply, which)

        return self._with_retries(attempt, retry)


_STATUS = {code.value[0]: code for code in grpc.StatusCode}


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
