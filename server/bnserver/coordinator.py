"""The SyncBatchNorm coordinator: rounds that merge per-rank statistics.

A *round* gathers one contribution from each rank of a group for one module
and phase, merges them in rank order and hands every rank the identical
result. Forward rounds carry per-channel (count, mean, M2) and merge them with
Chan's parallel update; backward rounds carry (sum(dy), sum(dy * xhat)) and add
them. Only O(C) numbers travel here; tensors stay on the servers.

Rounds are matched by arrival: a contribution joins the open round of its
(group, module, phase), or opens one. A round that is not complete within
`timeout` seconds of its first contribution fails for every waiting rank with
DeadlineExceeded naming the missing ranks; a rank whose config or channel
count differs from the round's fails it at once for everyone. Finished and
failed rounds are forgotten immediately, so memory is only held by rounds in
progress.

Nothing here knows gRPC: `bnserver.coordinator_service` serves it remotely
and servers with an embedded coordinator call it directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from bnserver.calls import CallContext
from bnserver.config import MAX_WORLD_SIZE
from bnserver.errors import Aborted, DeadlineExceeded, InvalidArgument, ResourceExhausted
from bnserver.kernel import Moments

#: Seconds before its caller's deadline that a part no longer completes a round.
DEADLINE_GUARD = 0.1

#: Largest per-rank element count per channel: merged counts of a full group
#: stay far inside int64.
MAX_COUNT = 1 << 48


class Phase(Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


@dataclass(frozen=True)
class RoundKey:
    """Which rounds a contribution can join: one group's module in one phase."""

    group: str
    module: str
    phase: Phase

    def __str__(self) -> str:
        return f"{self.phase.value} round of module {self.module!r} in group {self.group!r}"


@dataclass(frozen=True)
class Contribution:
    """One rank's numbers: count (forward only) and float64 (C,) vectors.

    Forward: (count, (mean, m2)). Backward: (0, (sum_dy, sum_dy_xhat)).
    """

    count: int
    vectors: tuple[np.ndarray, ...]


@dataclass
class _Round:
    """A round in progress. `failure` set means it was aborted before all ranks arrived:
    the ranks still to come get that error at once, and the round is dropped when
    every rank has been told or its deadline passes."""

    world_size: int
    signature: Hashable
    deadline: float
    parts: dict[int, Contribution] = field(default_factory=dict)
    callers: dict[int, CallContext | None] = field(default_factory=dict)
    result: Contribution | None = None
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)
    failure: Exception | None = None
    told: set[int] = field(default_factory=set)

    def missing(self) -> str:
        """The ranks that have not contributed, for messages (long lists shortened)."""
        ranks = [r for r in range(self.world_size) if r not in self.parts]
        if len(ranks) <= 16:
            return str(ranks)
        return f"[{', '.join(map(str, ranks[:16]))}, ...] ({len(ranks)} ranks)"


def merge(phase: Phase, parts: dict[int, Contribution]) -> Contribution:
    """Fold contributions in rank order (so every rank and every run agrees bit for bit)."""
    ordered = [parts[r] for r in sorted(parts)]
    if phase is Phase.FORWARD:
        total = Moments(ordered[0].count, *ordered[0].vectors)
        for part in ordered[1:]:
            total = total.merge(Moments(part.count, *part.vectors))
        return Contribution(total.count, (total.mean, total.m2))
    sums = [v.copy() for v in ordered[0].vectors]
    for part in ordered[1:]:
        for acc, v in zip(sums, part.vectors, strict=True):
            acc += v
    return Contribution(0, tuple(sums))


class Coordinator:
    """Holds the rounds in progress. Thread-safe; each contributor blocks in its own thread.

    timeout:    seconds a round may wait for its ranks, from its first contribution.
    max_rounds: rounds in progress at once (RESOURCE_EXHAUSTED beyond).
    """

    #: How often a waiting contributor checks whether its caller gave up.
    POLL_SECONDS = 0.05

    def __init__(self, timeout: float = 30.0, max_rounds: int = 4096) -> None:
        self.timeout = timeout
        self.max_rounds = max_rounds
        self._lock = threading.Lock()
        self._rounds: dict[RoundKey, _Round] = {}

    def __len__(self) -> int:
        """Rounds in progress (including aborted ones still telling late ranks)."""
        with self._lock:
            self._sweep()
            return len(self._rounds)

    def contribute(
        self,
        key: RoundKey,
        rank: int,
        world_size: int,
        signature: Hashable,
        part: Contribution,
        call: CallContext | None = None,
    ) -> Contribution:
        """Add rank `rank`'s part to the open round of `key`; block until it completes.

        `signature` (config and channel count, without the rank) must be the
        same for every rank of a round. If the caller gives up (`call` is
        cancelled or past its deadline) before the round completes, its part
        is withdrawn and never merged, so a call that failed for its client
        leaves nothing behind. Returns the merged contribution.
        """
        if not 1 <= world_size <= MAX_WORLD_SIZE:
            raise InvalidArgument(f"world_size must be in 1..{MAX_WORLD_SIZE}, got {world_size}")
        if not 0 <= rank < world_size:
            raise InvalidArgument(f"rank must be in 0..{world_size - 1}, got {rank}")
        if not 0 <= part.count <= MAX_COUNT:
            reason = f"count must be in 0..{MAX_COUNT}, got {part.count}"
            self.abort(key, rank, world_size, reason)  # the peers need not wait for it
            raise InvalidArgument(reason)
        with self._lock:
            rnd = self._join(key, rank, world_size, signature, part, call)
        poll = None if call is None else self.POLL_SECONDS
        while not rnd.done.wait(_wait_time(rnd.deadline, poll)):
            if call is not None and call.expired():
                self._withdraw(key, rnd, rank)
            elif time.monotonic() >= rnd.deadline:
                self._expire(key, rnd)
        if rnd.error is not None:
            raise rnd.error
        if rnd.callers.get(rank) is not call:
            # This call gave up: its part was dropped or replaced by the rank's re-send,
            # and the result belongs to the call that took its place.
            raise Aborted(f"rank {rank} gave up on the {key}; its contribution was withdrawn")
        assert rnd.result is not None
        return rnd.result

    def _join(
        self,
        key: RoundKey,
        rank: int,
        world_size: int,
        signature: Hashable,
        part: Contribution,
        call: CallContext | None,
    ) -> _Round:
        self._sweep()
        rnd = self._rounds.get(key)
        if rnd is not None and rnd.failure is not None:
            # The round was aborted before this rank arrived: fail it the same way.
            rnd.told.add(rank)
            if len(rnd.told) >= rnd.world_size:
                del self._rounds[key]
            raise rnd.failure
        if rnd is None:
            if len(self._rounds) >= self.max_rounds:
                raise ResourceExhausted(
                    f"the coordinator holds {self.max_rounds} rounds in progress, its limit "
                    f"(--max-rounds)"
                )
            rnd = _Round(world_size, signature, time.monotonic() + self.timeout)
            self._rounds[key] = rnd
        if world_size != rnd.world_size or signature != rnd.signature:
            others = sorted(rnd.parts)
            message = (
                f"rank {rank} of the {key} has config {signature} (world_size {world_size}), "
                f"but rank(s) {others} have {rnd.signature} (world_size {rnd.world_size})"
            )
            self._finish(key, rnd, error=Aborted(f"round aborted: {message}"))
            raise InvalidArgument(message)
        stale = rnd.callers.get(rank)
        if rank in rnd.parts and stale is not None and stale.expired():
            # Its earlier call gave up and is about to withdraw: this is its re-send.
            del rnd.parts[rank], rnd.callers[rank]
        if rank in rnd.parts:
            # The rank is a step ahead of its peers (or two clients claim one rank):
            # pairing it with itself would be wrong, so the round fails for all.
            message = (
                f"rank {rank} contributed twice to the {key} before rank(s) {rnd.missing()} arrived"
            )
            self._finish(key, rnd, error=Aborted(f"round aborted: {message}"))
            raise Aborted(message)
        rnd.parts[rank] = part
        rnd.callers[rank] = call
        if len(rnd.parts) == world_size:
            # A part whose caller gave up, or is about to, must not be merged: its
            # server will not apply the result, so its peers must not either. The
            # margin covers the deadline's drift across hops (client, server, here).
            late = [
                r for r, c in rnd.callers.items() if c is not None and c.expired(DEADLINE_GUARD)
            ]
            for gone in late:
                del rnd.parts[gone], rnd.callers[gone]
        if len(rnd.parts) == world_size:
            self._finish(key, rnd, result=merge(key.phase, rnd.parts))
        return rnd

    def abort(self, key: RoundKey, rank: int, world_size: int, reason: str) -> None:
        """Fail the round of `key` for every rank: rank `rank` cannot take part.

        Ranks already waiting fail now; ranks arriving later for the same
        round fail on arrival, until all have been told or the timeout passes.
        """
        if not 1 <= world_size <= MAX_WORLD_SIZE or not 0 <= rank < world_size:
            raise InvalidArgument(f"rank {rank} of world_size {world_size} is out of range")
        error = Aborted(f"round aborted by rank {rank}: {reason[:1000]}")
        with self._lock:
            self._sweep()
            rnd = self._rounds.get(key)
            if rnd is not None and rnd.failure is None:
                told = set(rnd.parts) | {rank}
                self._finish(key, rnd, error=error)
            elif rnd is None:
                told = {rank}
            else:
                return  # already aborted
            if len(told) < world_size:
                tomb = _Round(world_size, None, time.monotonic() + self.timeout, failure=error)
                tomb.told = told
                self._rounds[key] = tomb

    def _withdraw(self, key: RoundKey, rnd: _Round, rank: int) -> None:
        with self._lock:
            if rnd.done.is_set():
                return  # completed meanwhile: every rank has its result, keep it consistent
            rnd.parts.pop(rank, None)
            rnd.callers.pop(rank, None)
            if not rnd.parts and self._rounds.get(key) is rnd:
                del self._rounds[key]
        # Only this waiter fails: the round stays open for the others.
        raise Aborted(
            f"rank {rank} gave up on the {key} (call cancelled or past its deadline); "
            f"its contribution was withdrawn"
        )

    def _expire(self, key: RoundKey, rnd: _Round) -> None:
        with self._lock:
            if not rnd.done.is_set():
                error = DeadlineExceeded(
                    f"{key} timed out after {self.timeout:g} s waiting for rank(s) "
                    f"{rnd.missing()} of {rnd.world_size}; no rank updated its statistics"
                )
                self._finish(key, rnd, error=error)

    def _sweep(self) -> None:
        """Drop aborted rounds whose deadline passed (caller holds the lock)."""
        now = time.monotonic()
        for key in [k for k, r in self._rounds.items() if r.failure and r.deadline <= now]:
            del self._rounds[key]

    def _finish(
        self,
        key: RoundKey,
        rnd: _Round,
        *,
        result: Contribution | None = None,
        error: Exception | None = None,
    ) -> None:
        """Complete `rnd` (caller holds the lock) and forget it."""
        rnd.result, rnd.error = result, error
        if self._rounds.get(key) is rnd:
            del self._rounds[key]
        rnd.done.set()


def _wait_time(deadline: float, poll: float | None) -> float:
    remaining = max(deadline - time.monotonic(), 0.0)
    return remaining if poll is None else min(remaining, poll)
