"""The sync step object in isolation, against a recording reducer (no coordinator)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from bnserver.calls import CallContext
from bnserver.errors import Aborted, DeadlineExceeded, InvalidArgument
from bnserver.sync.step import Step, SyncStep
from bnserver.sync.ticket import Contribution, Outcome, Phase, Ticket

TICKET = Ticket("t", "g", "bn", Phase.FORWARD, 1, 2, "sig")
PART = Contribution(4, (np.zeros(3), np.ones(3)))


class Recorder:
    """A Reducer that records what it is asked and answers with the part itself."""

    def __init__(self) -> None:
        self.contributed: list[Ticket] = []
        self.aborted: list[tuple[Ticket, str]] = []

    def contribute(self, ticket: Ticket, part: Contribution) -> Outcome:
        self.contributed.append(ticket)
        return Outcome(part.count, part.vectors)

    def abort(self, ticket: Ticket, reason: str) -> None:
        self.aborted.append((ticket, reason))


def test_a_failure_before_the_part_aborts_the_round_once() -> None:
    reducer = Recorder()
    with pytest.raises(InvalidArgument), SyncStep(TICKET, reducer) as step:
        step.abort("first")  # an explicit abort...
        raise InvalidArgument("bad tensor")  # ...is not repeated by the exit
    assert reducer.aborted == [(TICKET, "first")]
    reducer = Recorder()
    with pytest.raises(InvalidArgument), SyncStep(TICKET, reducer):
        raise InvalidArgument("bad tensor")
    assert reducer.aborted == [(TICKET, "bad tensor")]
    assert reducer.contributed == []


def test_a_failure_after_the_part_aborts_nothing() -> None:
    reducer = Recorder()
    with pytest.raises(InvalidArgument), SyncStep(TICKET, reducer) as step:
        step.reduce(PART)
        raise InvalidArgument("n=1 over all ranks")  # every rank sees the same outcome
    assert reducer.contributed == [TICKET] and reducer.aborted == []


def test_success_aborts_nothing_and_a_step_reduces_once() -> None:
    reducer = Recorder()
    with SyncStep(TICKET, reducer) as step:
        assert step.reduce(PART).count == 4
        with pytest.raises(RuntimeError):
            step.reduce(PART)
    assert reducer.aborted == []


def test_a_step_that_needs_no_round_aborts_nothing() -> None:
    reducer = Recorder()
    with pytest.raises(InvalidArgument), SyncStep(TICKET, reducer, needs_round=lambda: False):
        raise InvalidArgument("bad tensor")
    assert reducer.aborted == []
    # The module's own decision wins over the default.
    with pytest.raises(InvalidArgument), SyncStep(TICKET, reducer) as step:
        step.needs_round = False
        raise InvalidArgument("bad tensor")
    assert reducer.aborted == []


def test_a_caller_that_gave_up_gives_no_part_and_aborts_the_round() -> None:
    reducer = Recorder()
    call = CallContext()
    call.cancelled.set()
    with pytest.raises(Aborted), SyncStep(TICKET, reducer, call) as step:
        step.reduce(PART)
    assert reducer.contributed == []
    assert len(reducer.aborted) == 1


def test_the_step_lock_serializes_steps_and_is_released_on_failure() -> None:
    lock = threading.Lock()
    reducer = Recorder()
    with pytest.raises(InvalidArgument), SyncStep(TICKET, reducer, lock=lock):
        assert lock.locked()
        raise InvalidArgument("x")
    assert not lock.locked()
    # A step that cannot take the lock before its deadline fails without aborting:
    # the round in progress belongs to this rank's previous step.
    lock.acquire()
    start = time.monotonic()
    with (
        pytest.raises(DeadlineExceeded),
        SyncStep(TICKET, reducer, CallContext.with_timeout(0.2), lock),
    ):
        pass
    assert 0.15 < time.monotonic() - start < 2
    assert reducer.aborted == [(TICKET, "x")]
    lock.release()


def test_a_local_step_returns_its_own_part() -> None:
    with Step() as step:
        out = step.reduce(PART)
    assert out.count == PART.count and out.vectors is PART.vectors and out.reference is None


def test_a_failing_abort_does_not_hide_the_steps_own_error() -> None:
    class Broken(Recorder):
        def abort(self, ticket: Ticket, reason: str) -> None:
            raise ConnectionError("coordinator gone")

    with pytest.raises(InvalidArgument, match="bad tensor"), SyncStep(TICKET, Broken()):
        raise InvalidArgument("bad tensor")
