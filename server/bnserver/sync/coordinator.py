"""The SyncBatchNorm coordinator: rounds that merge per-rank statistics.

A *round* gathers one part from each rank of a group for one module and
phase, merges them in rank order and hands every rank the identical
`Outcome`. Forward rounds carry per-channel (count, mean, M2) and merge them
with Chan's parallel update; backward rounds carry (sum(dy), sum(dy * xhat))
and add them.

Rounds are matched by arrival: a part joins the open round of its
`RoundKey` (tenant, group, module, phase), or opens one. How a round ends:

* complete: every rank gets the Outcome. A part, once given, is never
  withdrawn, so a completed round is one that every rank's server applies.
* timed out (`timeout` seconds after its first part): the waiting ranks get
  DeadlineExceeded naming the missing ranks; nobody applies anything. A rank
  arriving later simply opens the next round.
* failed (a rank's config differs, a rank sends twice, or a rank aborts
  because it cannot take part): the waiting ranks fail at once, and a
  *tombstone* fails each rank still to come exactly once, on arrival, until
  every rank has been told or `timeout` passes. A rank already told that
  arrives again is starting its next step and opens a new round.

Open rounds and tombstones count against `max_rounds` in total and
`max_rounds_per_tenant` per tenant (RESOURCE_EXHAUSTED beyond), so no tenant
can take the coordinator from the others.

Nothing here knows gRPC: `bnserver.rpc.coordinator_service` serves it and
servers with an embedded coordinator call it directly.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from bnserver.core.kernel import Moments
from bnserver.errors import Aborted, DeadlineExceeded, InvalidArgument, ResourceExhausted
from bnserver.sync.ticket import Contribution, Outcome, Phase, RoundKey, RunningState, Ticket

log = logging.getLogger(__name__)

#: Longest abort reason kept, in characters.
MAX_REASON = 1000

#: Told how a round ended: (outcome, None) or (None, error); called exactly once.
Done = Callable[[Outcome | None, Exception | None], None]


@dataclass
class _Round:
    """A round in progress."""

    world_size: int
    signature: str
    width: int
    deadline: float
    parts: dict[int, Contribution] = field(default_factory=dict)
    outcome: Outcome | None = None
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)
    waiting: list[Done] = field(default_factory=list)

    def missing(self) -> str:
        """The ranks that have not contributed, for messages (long lists shortened)."""
        return _ranks(r for r in range(self.world_size) if r not in self.parts)


@dataclass
class _Tombstone:
    """A failed round: each rank not yet told gets `error` once, on arrival."""

    error: Exception
    told: set[int]
    world_size: int
    deadline: float


def _ranks(ranks: object) -> str:
    listed = list(ranks)  # type: ignore[call-overload]
    if len(listed) <= 16:
        return str(listed)
    return f"[{', '.join(map(str, listed[:16]))}, ...] ({len(listed)} ranks)"


def merge(phase: Phase, parts: dict[int, Contribution]) -> Outcome:
    """Fold parts in rank order (so every rank and every run agrees bit for bit).

    Forward parts that carry running states are compared: if any differs from
    the reference (highest version, lowest rank among equals), the outcome
    carries the reference for every rank to adopt.
    """
    ordered = sorted(parts.items())
    if phase is Phase.BACKWARD:
        sums = [v.copy() for v in ordered[0][1].vectors]
        for _, part in ordered[1:]:
            for acc, v in zip(sums, part.vectors, strict=True):
                acc += v
        return Outcome(0, tuple(sums))
    total = Moments(ordered[0][1].count, *ordered[0][1].vectors)
    for _, part in ordered[1:]:
        total = total.merge(Moments(part.count, *part.vectors))
    states = [(r, p.state) for r, p in ordered if p.state is not None]
    if not states:
        return Outcome(total.count, (total.mean, total.m2))
    ref_rank, reference = max(states, key=lambda rs: (rs[1].version, -rs[0]))
    stale = tuple(r for r, s in states if not s.same_as(reference))
    if not stale:
        return Outcome(total.count, (total.mean, total.m2))
    return Outcome(total.count, (total.mean, total.m2), reference, ref_rank, stale)


class Coordinator:
    """Holds the rounds in progress. Thread-safe.

    `contribute` blocks its thread until the round ends; `submit` returns at once
    and calls back when it ends (what a stream of many parts, one per round, needs).
    One reaper thread ends the rounds whose timeout passes.

    timeout:    seconds a round may wait for its ranks, from its first part; also
                how long a tombstone waits for the ranks still to be told.
    max_rounds: open rounds plus tombstones, in total.
    max_rounds_per_tenant: the same, per tenant.
    """

    def __init__(
        self,
        timeout: float = 30.0,
        max_rounds: int = 4096,
        max_rounds_per_tenant: int | None = None,
    ) -> None:
        self.timeout = timeout
        self.max_rounds = max_rounds
        self.max_rounds_per_tenant = (
            max_rounds if max_rounds_per_tenant is None else max_rounds_per_tenant
        )
        self._lock = threading.Lock()
        self._deadlines = threading.Condition(self._lock)  # wakes the reaper
        self._heap: list[tuple[float, int, RoundKey, _Round]] = []
        self._seq = itertools.count()
        self._reaper: threading.Thread | None = None
        self._notify: list[tuple[list[Done], Outcome | None, Exception | None]] = []
        self._rounds: dict[RoundKey, _Round] = {}
        self._tombstones: dict[RoundKey, _Tombstone] = {}
        self._per_tenant: Counter[str] = Counter()
        self._next_sweep = 0.0

    def __len__(self) -> int:
        """Open rounds plus live tombstones."""
        with self._lock:
            self._sweep(force=True)
            return len(self._rounds) + len(self._tombstones)

    def contribute(self, ticket: Ticket, part: Contribution) -> Outcome:
        """Add `ticket`'s part to the open round of its key; block until the round ends.

        Returns the Outcome, or raises the round's error: InvalidArgument (this
        rank's ticket or part is malformed or differs from its peers'), Aborted,
        DeadlineExceeded, ResourceExhausted.
        """
        ended = threading.Event()
        result: list[tuple[Outcome | None, Exception | None]] = []

        def done(outcome: Outcome | None, error: Exception | None) -> None:
            result.append((outcome, error))
            ended.set()

        self.submit(ticket, part, done)
        ended.wait()
        outcome, error = result[0]
        if error is not None:
            raise error
        assert outcome is not None
        return outcome

    def submit(self, ticket: Ticket, part: Contribution, done: Done) -> None:
        """Add `ticket`'s part to the open round of its key without waiting: `done` is
        called once the round ends (in the thread that ends it). Failures known at once
        (the errors of `contribute`) are raised here instead, and `done` is not called."""
        ticket.check()
        try:
            part.check()
        except InvalidArgument as exc:
            self.abort(ticket, str(exc))  # the peers need not wait for it
            raise
        try:
            with self._lock:
                rnd = self._join(ticket, part)
                if not rnd.done.is_set():
                    rnd.waiting.append(done)
                    return
        finally:
            self._tell()
        done(rnd.outcome, rnd.error)

    def _join(self, ticket: Ticket, part: Contribution) -> _Round:
        """Add the part (caller holds the lock); return its round, or raise at once."""
        key, rank = ticket.key, ticket.rank
        self._sweep()
        tomb = self._tombstones.get(key)
        if tomb is not None and tomb.deadline <= time.monotonic():
            self._drop_tombstone(key)
            tomb = None
        if tomb is not None and rank not in tomb.told:
            # This rank's step belongs to a round that failed before it arrived.
            tomb.told.add(rank)
            if len(tomb.told) >= tomb.world_size:
                self._drop_tombstone(key)
            raise tomb.error
        rnd = self._rounds.get(key)
        if rnd is None:
            self._reserve(key)
            rnd = _Round(
                ticket.world_size, ticket.signature, part.width, time.monotonic() + self.timeout
            )
            self._rounds[key] = rnd
            self._watch(key, rnd)
        if (ticket.world_size, ticket.signature, part.width) != (
            rnd.world_size,
            rnd.signature,
            rnd.width,
        ):
            message = (
                f"{ticket} has config {ticket.signature} (world_size {ticket.world_size}, "
                f"{part.width} channels), but rank(s) {sorted(rnd.parts)} have {rnd.signature} "
                f"(world_size {rnd.world_size}, {rnd.width} channels)"
            )
            self._fail(key, rnd, Aborted(f"round aborted: {message}"), rank)
            raise InvalidArgument(message)
        if rank in rnd.parts:
            # The rank is a step ahead of its peers, or two servers claim one rank:
            # pairing it with itself would be wrong, so the round fails for all.
            message = f"{ticket} arrived twice before rank(s) {rnd.missing()} arrived"
            error = Aborted(f"round aborted: {message}")
            self._fail(key, rnd, error, rank)
            raise error
        rnd.parts[rank] = part
        if len(rnd.parts) == rnd.world_size:
            self._end(key, rnd, outcome=merge(key.phase, rnd.parts))
        return rnd

    def abort(self, ticket: Ticket, reason: str) -> None:
        """Fail the round `ticket`'s rank would join: that rank cannot take part.

        Ranks waiting in it fail now; ranks arriving later fail on arrival,
        once each, until all have been told or the timeout passes.
        """
        ticket.check()
        key, rank = ticket.key, ticket.rank
        error = Aborted(f"round aborted by {ticket}: {reason[:MAX_REASON]}")
        try:
            self._abort(key, rank, error, ticket.world_size)
        finally:
            self._tell()

    def _abort(self, key: RoundKey, rank: int, error: Exception, world_size: int) -> None:
        with self._lock:
            self._sweep()
            rnd = self._rounds.get(key)
            if rnd is not None:
                self._fail(key, rnd, error, rank)
                return
            tomb = self._tombstones.get(key)
            if tomb is not None and rank not in tomb.told:
                tomb.told.add(rank)  # the round it failed is the one this rank abandons
                if len(tomb.told) >= tomb.world_size:
                    self._drop_tombstone(key)
                return
            if tomb is not None:
                self._drop_tombstone(key)  # a new step of a rank already told
            if world_size > 1:
                self._bury(key, error, {rank}, world_size)

    def _fail(self, key: RoundKey, rnd: _Round, error: Exception, rank: int) -> None:
        """End `rnd` with `error` and leave a tombstone for the ranks not yet told."""
        told = set(rnd.parts) | {rank}
        self._end(key, rnd, error=error)
        if len(told) < rnd.world_size:
            self._bury(key, error, told, rnd.world_size)

    def _bury(self, key: RoundKey, error: Exception, told: set[int], world_size: int) -> None:
        """Leave a tombstone (caller holds the lock). Over a limit, none is left: the
        ranks still to come then time out instead of failing at once."""
        try:
            self._reserve(key)
        except ResourceExhausted:
            return
        self._tombstones[key] = _Tombstone(error, told, world_size, time.monotonic() + self.timeout)

    def _reserve(self, key: RoundKey) -> None:
        """Count one more round or tombstone of `key`'s tenant, or raise ResourceExhausted."""
        if len(self._rounds) + len(self._tombstones) >= self.max_rounds:
            self._sweep(force=True)
            if len(self._rounds) + len(self._tombstones) >= self.max_rounds:
                raise ResourceExhausted(
                    f"the coordinator holds {self.max_rounds} rounds, its limit (--max-rounds)"
                )
        if self._per_tenant[key.tenant] >= self.max_rounds_per_tenant:
            self._sweep(force=True)
            if self._per_tenant[key.tenant] >= self.max_rounds_per_tenant:
                raise ResourceExhausted(
                    f"this tenant holds {self.max_rounds_per_tenant} sync rounds, its limit "
                    f"(--max-rounds-per-tenant)"
                )
        self._per_tenant[key.tenant] += 1

    def _release(self, key: RoundKey) -> None:
        self._per_tenant[key.tenant] -= 1
        if self._per_tenant[key.tenant] <= 0:
            del self._per_tenant[key.tenant]

    def _drop_tombstone(self, key: RoundKey) -> None:
        del self._tombstones[key]
        self._release(key)

    def _watch(self, key: RoundKey, rnd: _Round) -> None:
        """Have the reaper end `rnd` at its deadline (caller holds the lock)."""
        heapq.heappush(self._heap, (rnd.deadline, next(self._seq), key, rnd))
        if self._reaper is None:
            self._reaper = threading.Thread(
                target=self._reap, name="coordinator-reaper", daemon=True
            )
            self._reaper.start()
        self._deadlines.notify()

    def _reap(self) -> None:
        """End rounds whose timeout passed, for as long as the process lives."""
        while True:
            with self._lock:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._deadlines.wait(wait)
                _, _, key, rnd = heapq.heappop(self._heap)
                if not rnd.done.is_set():
                    error = DeadlineExceeded(
                        f"{key} timed out after {self.timeout:g} s waiting for rank(s) "
                        f"{rnd.missing()} of {rnd.world_size}; no rank updated its statistics"
                    )
                    self._end(key, rnd, error=error)
            self._tell()

    def _tell(self) -> None:
        """Call the `done` callbacks of rounds that ended (without holding the lock)."""
        with self._lock:
            pending, self._notify = self._notify, []
        for waiting, outcome, error in pending:
            for done in waiting:
                try:
                    done(outcome, error)
                except Exception:  # one caller's failure must not silence the others
                    log.exception("a round's callback failed")

    def _sweep(self, force: bool = False) -> None:
        """Drop tombstones whose time is up (caller holds the lock); at most once a second
        unless forced."""
        now = time.monotonic()
        if not force and now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        for key in [k for k, t in self._tombstones.items() if t.deadline <= now]:
            self._drop_tombstone(key)

    def _end(
        self,
        key: RoundKey,
        rnd: _Round,
        *,
        outcome: Outcome | None = None,
        error: Exception | None = None,
    ) -> None:
        """Complete `rnd` (caller holds the lock), forget it, and queue its callbacks for
        `_tell` (the caller calls it once it released the lock)."""
        rnd.outcome, rnd.error = outcome, error
        if self._rounds.get(key) is rnd:
            del self._rounds[key]
            self._release(key)
        rnd.done.set()
        if rnd.waiting:
            self._notify.append((rnd.waiting, outcome, error))
            rnd.waiting = []


__all__ = ["Coordinator", "RunningState", "merge"]
