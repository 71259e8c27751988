"""Every call, measured and logged once: the access log and the call metrics.

`CallObserver` is the server's outermost interceptor, so it sees every call
that reaches a handler, those that authentication refuses included. It takes
over (de)serialization from gRPC, which is how it counts message bytes
without copying them, and ends each call with:

* one access-log line on the `bnserver.access` logger (INFO; health checks
  and reflection at DEBUG, so probes do not flood the log): the logical
  method, tenant, module, status, milliseconds and bytes in and out. Never
  tensor data, request ids or tokens;
* the call series of `bnserver.metrics.Metrics`, when metrics are on.

Methods are named by their logical operation: `StreamForward` is logged and
counted as `Forward` (with `stream=true` in the log), `StreamBackward` as
`Backward`. A `Session` stream carries many forwards and backwards: each of
its messages gets a line and a count of its own (`Forward` or `Backward`, with
`session=true`, see `message_record`), and the stream one more when it ends.
Tensor bytes that went through shared memory instead of messages are logged
as `shm`. The module a call concerns is known only once its request is
parsed, which `bnserver.rpc.registration` does: it reports the request with
`note_request`, and the observer picks it up from the call in progress in
this thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

from bnserver.metrics import Metrics
from bnserver.rpc.auth import Tokens, bearer
from bnserver.rpc.shell import DEADLINE_SLACK
from bnservice.v1 import bnservice_pb2 as pb

access_log = logging.getLogger("bnserver.access")

#: Methods whose logical operation differs from the name on the wire.
LOGICAL = {"StreamForward": "Forward", "StreamBackward": "Backward"}

#: Other methods that stream by their declared shape (health's Watch, reflection, and
#: the Session stream, whose messages get records of their own).
STREAMING_OTHERS = frozenset({"Watch", "ServerReflectionInfo", "Session"})

#: Services logged at DEBUG: orchestrators probe health every few seconds.
QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

#: Longest module name written to the log, in characters.
MAX_LOGGED_NAME = 300


@dataclass
class CallRecord:
    """What the access log and the metrics say about one call."""

    method: str
    stream: bool
    tenant: str | None
    start: float
    module: str | None = None
    rank: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    code: str = "OK"
    seconds: float = 0.0
    session: bool = False
    shm: int = 0  # tensor bytes in shared memory
    #: Where the records of the messages of a Session stream go (set by the observer).
    sink: Callable[[CallRecord], None] | None = field(default=None, repr=False)

    def fields(self) -> dict[str, Any]:
        """The access-log fields (also the JSON log's keys)."""
        return {
            "method": self.method,
            "stream": self.stream,
            "tenant": self.tenant,
            "module": self.module,
            "rank": self.rank,
            "code": self.code,
            "ms": round(self.seconds * 1000, 3),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "session": self.session,
            "shm": self.shm,
        }


_current: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "bnserver_call", default=None
)


def note_request(request: Message) -> None:
    """Tell the call in progress in this thread which module (and tenant) its request names."""
    record = _current.get()
    if record is None or record.module is not None:
        return
    if isinstance(request, pb.ForwardChunk | pb.BackwardChunk):
        request = request.header
    ref = getattr(request, "ref", None)
    if isinstance(ref, pb.ModuleRef):
        record.module, record.rank = ref.name[:MAX_LOGGED_NAME], ref.rank
        return
    ticket = getattr(request, "ticket", None)
    if isinstance(ticket, pb.Ticket):
        # A peer's call on behalf of a tenant's SyncBatchNorm rank.
        record.module, record.rank = ticket.module[:MAX_LOGGED_NAME], ticket.rank
        record.tenant = ticket.tenant


def note_shared(nbytes: int) -> None:
    """Tell the call (or session message) in progress in this thread that `nbytes` of
    tensor travelled through shared memory."""
    record = _current.get()
    if record is not None:
        record.shm += nbytes


@contextlib.contextmanager
def message_record(method: str, request: Message) -> Iterator[CallRecord]:
    """A record of its own for one message of the Session stream in progress in this
    thread: logged and counted as `method` when the block ends (the caller sets its
    code and bytes). Outside an observed call the record goes nowhere."""
    parent = _current.get()
    tenant = parent.tenant if parent is not None else None
    record = CallRecord(method, False, tenant, time.perf_counter(), session=True)
    token = _current.set(record)
    try:
        note_request(request)
        yield record
    finally:
        _current.reset(token)
        record.seconds = time.perf_counter() - record.start
        if parent is not None and parent.sink is not None:
            parent.sink(record)


def _final_code(context: grpc.ServicerContext, raised: bool) -> str:
    """The status a call ended with, as a code name."""
    code: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]
    if code is not None:
        return code.name
    if raised:
        return grpc.StatusCode.UNKNOWN.name  # gRPC's answer to an unhandled exception
    if not context.is_active():
        # The reply was ready but the caller had gone: cancelled, or out of time.
        expired = context.time_remaining() <= DEADLINE_SLACK
        return (grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED).name
    return grpc.StatusCode.OK.name


Deserialize = Callable[[bytes], Any] | None
Serialize = Callable[[Any], bytes] | None


class CallObserver(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Measures and logs every call (see the module docstring).

    metrics: where the call series go (None: log only).
    tokens: the tenants' tokens, to name a call's tenant (None: no auth, tenant "").
    """

    def __init__(self, metrics: Metrics | None = None, tokens: Tokens | None = None) -> None:
        self.metrics = metrics
        self.tokens = tokens

    def _tenant(self, metadata: Any) -> str | None:
        if self.tokens is None:
            return ""
        return self.tokens.tenant_for(bearer(metadata))

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None:
            return None
        path: str = details.method  # type: ignore[attr-defined]
        name = path.rsplit("/", 1)[-1]
        method = LOGICAL.get(name, name)
        tenant = self._tenant(details.invocation_metadata)  # type: ignore[attr-defined]
        level = logging.DEBUG if path.startswith(QUIET_PREFIXES) else logging.INFO
        # By the method's declared shape: the admission gate serves every method
        # request-streaming underneath.
        stream = name in LOGICAL or name in STREAMING_OTHERS

        def start() -> CallRecord:
            record = CallRecord(method, stream, tenant, time.perf_counter())
            record.sink = lambda r: self._message(r, level)
            return record

        return _observed(handler, start, lambda r, c, e: self._finish(r, c, e, level))

    def _finish(
        self, record: CallRecord, context: grpc.ServicerContext, raised: bool, level: int
    ) -> None:
        record.seconds = time.perf_counter() - record.start
        record.code = _final_code(context, raised)
        self._message(record, level)

    def _message(self, record: CallRecord, level: int) -> None:
        """Log and count one complete record: a call, or one message of a Session stream."""
        if self.metrics is not None:
            self.metrics.call(
                record.method,
                record.code,
                record.seconds,
                record.bytes_in,
                record.bytes_out,
                record.shm,
            )
        if access_log.isEnabledFor(level):
            access_log.log(level, _line(record), extra={"call": record.fields()})


def _line(record: CallRecord) -> str:
    """The text form of an access-log line; the module name is quoted and escaped."""
    module = "-" if record.module is None else repr(record.module)
    tenant = "-" if record.tenant is None else repr(record.tenant)
    rank = f" rank={record.rank}" if record.rank else ""
    via = " stream" if record.stream else " session" if record.session else ""
    shm = f" shm={record.shm}" if record.shm else ""
    return (
        f"{record.method}{via} tenant={tenant} module={module}{rank} {record.code} "
        f"{record.seconds * 1000:.1f}ms in={record.bytes_in} out={record.bytes_out}{shm}"
    )


Finish = Callable[[CallRecord, grpc.ServicerContext, bool], None]


def _observed(
    handler: grpc.RpcMethodHandler[Any, Any], start: Callable[[], CallRecord], finish: Finish
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with (de)serialization done here, measured, and `finish` called once."""
    deserialize: Deserialize = handler.request_deserializer
    serialize: Serialize = handler.response_serializer
    inner: Callable[[Any, grpc.ServicerContext], Any] | None
    if handler.request_streaming and handler.response_streaming:
        inner = handler.stream_stream
    elif handler.request_streaming:
        inner = handler.stream_unary
    elif handler.response_streaming:
        inner = handler.unary_stream
    else:
        inner = handler.unary_unary
    assert inner is not None

    def requests(record: CallRecord, raw: Any, context: grpc.ServicerContext) -> Any:
        if not handler.request_streaming:
            record.bytes_in += len(raw)
            return _parse(deserialize, raw, context)
        return _counted(record, raw, deserialize, context)

    def unary_reply(request: Any, context: grpc.ServicerContext) -> Any:
        record = start()
        token = _current.set(record)
        raised = True
        try:
            reply: Any = inner(requests(record, request, context), context)
            data: bytes = serialize(reply) if serialize else reply
            record.bytes_out += len(data)
            raised = False
            return data
        finally:
            _current.reset(token)
            finish(record, context, raised)

    def stream_reply(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        record = start()
        raised = True
        try:
            token = _current.set(record)
            try:
                replies = iter(inner(requests(record, request, context), context))
            finally:
                _current.reset(token)
            while True:
                # The call's record is current only while the servicer runs, in this thread.
                token = _current.set(record)
                try:
                    reply = next(replies)
                except StopIteration:
                    break
                finally:
                    _current.reset(token)
                sent: bytes = serialize(reply) if serialize else reply
                record.bytes_out += len(sent)
                yield sent
            raised = False
        except GeneratorExit:
            # gRPC stopped reading replies: the caller has gone.
            raised = False
            raise
        finally:
            finish(record, context, raised)

    behaviour = stream_reply if handler.response_streaming else unary_reply
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behaviour)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behaviour)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour)
    return grpc.unary_unary_rpc_method_handler(behaviour)


def _parse(deserialize: Deserialize, raw: bytes, context: grpc.ServicerContext) -> Any:
    """A request message from its bytes, as gRPC would parse it (our services parse their own)."""
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except Exception:
        context.abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
        raise


def _counted(
    record: CallRecord,
    raw: Iterable[bytes],
    deserialize: Deserialize,
    context: grpc.ServicerContext,
) -> Iterator[Any]:
    for message in raw:
        record.bytes_in += len(message)
        yield _parse(deserialize, message, context)
