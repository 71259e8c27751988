"""Prometheus metrics of one server or coordinator process (`--metrics-port`).

Every series lives in the `Metrics` object's own `CollectorRegistry`, never
in prometheus_client's global one, so several servers built in one process
(as some tests do) keep their counts apart. Labels carry only bounded values:
logical method names, status codes, directions, outcomes and tenants (the
auth file's names); never module names, request ids or tokens.

Series:

* `bnservice_calls_total{method,code}` and `bnservice_call_seconds{method}`:
  calls answered, by logical operation (a `StreamForward` counts as
  `Forward`) and status code; their latency in seconds.
* `bnservice_bytes_total{direction}`: protobuf message bytes received
  (`in`) and sent (`out`), tensors included.
* `bnservice_shared_memory_bytes_total`: tensor bytes that calls read from
  (and wrote back to) same-host shared memory instead of messages.
* `bnservice_modules{tenant}`, `bnservice_backward_handles`: modules held,
  backward contexts held (servers only).
* `bnservice_sync_rounds_total{outcome}`, `bnservice_sync_round_seconds`:
  SyncBatchNorm parts that went through this process (a server's own ranks,
  and the parts a coordinator merged for other servers), by how their round
  ended (`ok`, `deadline_exceeded`, `aborted`, ...); seconds from giving the
  part to the round's end.
* `bnservice_snapshot_age_seconds`: seconds since the oldest change not yet
  written to `--state-dir` (0 when all are written; it keeps growing while
  writes fail). Servers only.
* `bnservice_state_write_failures_total`: writes to `--state-dir` that failed
  (a change answered UNAVAILABLE, or a snapshot that will be retried).
* `process_*`: the process's CPU, memory and open files.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from bnserver.engine import Engine
from bnserver.rpc.status import status_of
from bnserver.state.persistence import Persister
from bnserver.sync.step import Done, Reducer
from bnserver.sync.ticket import Contribution, Outcome, Ticket

#: Latency buckets in seconds: sub-millisecond small calls up to sync rounds
#: that wait out a 30 s --sync-timeout.
CALL_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip


class Metrics:
    """The series of one process, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter(
            "bnservice_calls",
            "Calls answered, by logical method (StreamForward counts as Forward) and status code.",
            ["method", "code"],
            registry=r,
        )
        self.call_seconds = Histogram(
            "bnservice_call_seconds",
            "Seconds from a call's start to its status, by logical method.",
            ["method"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.bytes = Counter(
            "bnservice_bytes",
            "Protobuf message bytes received (in) and sent (out), tensors included.",
            ["direction"],
            registry=r,
        )
        self.sync_rounds = Counter(
            "bnservice_sync_rounds",
            "SyncBatchNorm parts given to rounds through this process, by how the round ended.",
            ["outcome"],
            registry=r,
        )
        self.sync_round_seconds = Histogram(
            "bnservice_sync_round_seconds",
            "Seconds from giving a SyncBatchNorm part to the end of its round.",
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.shared_bytes = Counter(
            "bnservice_shared_memory_bytes",
            "Tensor bytes calls took from same-host shared memory instead of messages.",
            registry=r,
        )
        ProcessCollector(registry=r)
        self._http: WSGIServer | None = None

    # -- calls --------------------------------------------------------------

    def call(
        self,
        method: str,
        code: str,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
        shared_bytes: int = 0,
    ) -> None:
        """Record one answered call (`code`: a status code name such as "OK")."""
        if shared_bytes:
            self.shared_bytes.inc(shared_bytes)
        self.calls.labels(method, code).inc()
        self.call_seconds.labels(method).observe(seconds)
        if bytes_in:
            self.bytes.labels("in").inc(bytes_in)
        if bytes_out:
            self.bytes.labels("out").inc(bytes_out)

    # -- what a server holds --------------------------------------------------

    def watch_engine(self, engine: Engine, tenants: Iterable[str] = ("",)) -> None:
        """Report the engine's modules per tenant and its backward handles at each scrape.

        tenants: reported even when they hold no module (the auth file's tenants).
        """
        self.registry.register(_EngineCollector(engine, tuple(tenants)))

    def observe_reducer(self, reducer: Reducer) -> Reducer:
        """`reducer`, counting and timing the parts given through it."""
        return ObservedReducer(reducer, self)

    def watch_persister(self, persister: Persister) -> None:
        """Report the persister's snapshot age and failed writes at each scrape."""
        self.registry.register(_PersisterCollector(persister))

    # -- serving --------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on host:port (0: any free port); return the port.

        Raises OSError when the port cannot be bound.
        """
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _EngineCollector(Collector):
    def __init__(self, engine: Engine, tenants: tuple[str, ...]) -> None:
        self.engine = engine
        self.tenants = tenants

    def collect(self) -> Iterator[Metric]:
        counts = Tally({tenant: 0 for tenant in self.tenants})
        counts.update(key.tenant for key, _ in self.engine.registry.items())
        modules = GaugeMetricFamily(
            "bnservice_modules", "Modules held, by tenant.", labels=["tenant"]
        )
        for tenant, count in sorted(counts.items()):
            modules.add_metric([tenant], count)
        yield modules
        yield GaugeMetricFamily(
            "bnservice_backward_handles",
            "Backward contexts held for later Backward calls.",
            value=self.engine.backward_handles(),
        )


def _outcome(exc: BaseException) -> str:
    """A bounded label for how a round ended: the status code name, in lower case."""
    return status_of(exc)[0].name.lower()


class ObservedReducer:
    """A Reducer that counts and times the parts given through it."""

    def __init__(self, inner: Reducer, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def contribute(self, ticket: Ticket, part: Contribution) -> Outcome:
        start = time.perf_counter()
        outcome = "ok"
        try:
            return self.inner.contribute(ticket, part)
        except BaseException as exc:
            outcome = _outcome(exc)
            raise
        finally:
            self.metrics.sync_rounds.labels(outcome).inc()
            self.metrics.sync_round_seconds.observe(time.perf_counter() - start)

    def submit(self, ticket: Ticket, part: Contribution, done: Done) -> None:
        """The inner reducer's `submit`, counted and timed when its round ends."""
        start = time.perf_counter()

        def counted(outcome: Outcome | None, error: Exception | None) -> None:
            self._count("ok" if error is None else _outcome(error), start)
            done(outcome, error)

        try:
            self.inner.submit(ticket, part, counted)  # type: ignore[attr-defined]
        except BaseException as exc:
            self._count(_outcome(exc), start)
            raise

    def _count(self, outcome: str, start: float) -> None:
        self.metrics.sync_rounds.labels(outcome).inc()
        self.metrics.sync_round_seconds.observe(time.perf_counter() - start)

    def abort(self, ticket: Ticket, reason: str) -> None:
        self.inner.abort(ticket, reason)


class _PersisterCollector(Collector):
    def __init__(self, persister: Persister) -> None:
        self.persister = persister

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "bnservice_snapshot_age_seconds",
            "Seconds since the oldest change not yet written to the state directory "
            "(0 when every change is on disk).",
            value=self.persister.snapshot_age(),
        )
        yield CounterMetricFamily(
            "bnservice_state_write_failures",
            "Writes to the state directory that failed (each retried or answered UNAVAILABLE).",
            value=self.persister.write_failures,
        )
