"""A rank's step as an object: the one place that decides what a failure does to peers.

Every forward and backward of a module runs inside a `Step`. A plain module's
step reduces alone. A SyncBatchNorm rank's `SyncStep`:

* on entry takes the module's step lock for its phase (waiting at most until
  the caller's deadline), so rounds of one rank never overlap and an abort
  always concerns the round this step would join;
* `reduce()` hands the rank's part to the reducer at most once and returns
  the round's Outcome. A caller that already gave up (cancelled, or past its
  deadline) is refused before its part is given;
* on an exception before its part was given, aborts the round for the peers,
  exactly once, if the step would have needed a round; they fail at once
  instead of waiting out the timeout. After the part was given nothing is
  aborted: the round completes or fails on its own, the same way for all.

The layers that can fail (decoding in the RPC shell, limits in the engine,
validation in the module) simply raise inside the `with` block.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from bnserver.calls import CallContext
from bnserver.errors import Aborted, DeadlineExceeded
from bnserver.sync.ticket import Contribution, Outcome, Ticket

#: Told how a round ended: (outcome, None) or (None, error).
Done = Callable[[Outcome | None, Exception | None], None]


class Reducer(Protocol):
    """Merges one part per rank: `Coordinator` in process, `RemoteCoordinator` over gRPC."""

    def contribute(self, ticket: Ticket, part: Contribution) -> Outcome: ...

    def abort(self, ticket: Ticket, reason: str) -> None: ...


class Step:
    """A module's step that needs no peers: `reduce` returns the part as the outcome.

    needs_round: set by the module once it knows whether the step merges
        statistics (None until then).
    """

    def __init__(self, call: CallContext | None = None) -> None:
        self.call = call
        self.needs_round: bool | None = None

    def __enter__(self) -> Step:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def reduce(self, part: Contribution) -> Outcome:
        return Outcome(part.count, part.vectors)


class SyncStep(Step):
    """One rank's step in a SyncBatchNorm round (see the module docstring).

    ticket: the round's key and this rank's claim.
    reducer: where the round is merged.
    call: the caller's deadline and cancellation (None: none).
    lock: the module's step lock for this phase (None: no serialization, as in
        the coordinator's own servicer).
    needs_round: the default answer to whether a failed step must abort its
        round, asked only if the module did not decide (e.g. "is the module
        using batch statistics?").
    """

    def __init__(
        self,
        ticket: Ticket,
        reducer: Reducer,
        call: CallContext | None = None,
        lock: threading.Lock | None = None,
        needs_round: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__(call)
        self.ticket = ticket
        self.reducer = reducer
        self._lock = lock
        self._default_needs_round = needs_round
        self._locked = False
        self._given = False
        self._aborted = False

    def __enter__(self) -> SyncStep:
        if self._lock is not None:
            remaining = None if self.call is None else self.call.remaining()
            if remaining is None or remaining >= threading.TIMEOUT_MAX:
                self._locked = self._lock.acquire()
            else:
                self._locked = remaining > 0 and self._lock.acquire(timeout=remaining)
            if not self._locked:
                # Not this rank's step yet (its previous one is still in a round):
                # nothing to abort.
                raise DeadlineExceeded(
                    f"{self.ticket}: the call's deadline passed while this rank's previous "
                    f"step was still in its round"
                )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is not None and not self._given:
                needed = self.needs_round
                if needed is None:
                    needed = self._default_needs_round()
                if needed:
                    # Best effort: the step's own error is what its caller must see.
                    with contextlib.suppress(Exception):
                        self.abort(str(exc) or type(exc).__name__)
        finally:
            if self._locked:
                self._locked = False
                assert self._lock is not None
                self._lock.release()

    @property
    def given(self) -> bool:
        """Whether this step's part went to the reducer."""
        return self._given

    def reduce(self, part: Contribution) -> Outcome:
        """Give this rank's part (once) and wait for the round's Outcome."""
        self._give()
        return self.reducer.contribute(self.ticket, part)

    def submit(self, part: Contribution, done: Done) -> None:
        """Give this rank's part (once) without waiting; `done` hears how the round ended.
        Needs a reducer that can (`Coordinator.submit`)."""
        submit = getattr(self.reducer, "submit", None)
        if submit is None:
            raise TypeError(f"{type(self.reducer).__name__} cannot take a part without waiting")
        self._give()
        submit(self.ticket, part, done)

    def _give(self) -> None:
        """Mark the part given, unless this step already gave it, aborted, or its caller
        already gave up (then the round is aborted by the exit instead)."""
        if self._given or self._aborted:
            raise RuntimeError(f"{self.ticket}: a step reduces at most once")
        if self.call is not None and self.call.expired():
            raise Aborted(
                f"{self.ticket}: the call was cancelled or past its deadline before its "
                f"part was given; the round is aborted for every rank"
            )
        self._given = True

    def abort(self, reason: str) -> None:
        """Fail the round this step would join, for every rank (once; never after reducing)."""
        if self._given or self._aborted:
            return
        self._aborted = True
        self.reducer.abort(self.ticket, reason)
