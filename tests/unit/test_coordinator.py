"""The Coordinator in process: rounds complete, fail, time out, and are forgotten.

Every rank runs in its own thread, as each server's call does. Failures that
do not wait out the round timeout must arrive within PROMPT seconds.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from bnserver.errors import Aborted, DeadlineExceeded, InvalidArgument, ResourceExhausted
from bnserver.sync.coordinator import Coordinator, merge
from bnserver.sync.ticket import Contribution, Outcome, Phase, RunningState, Ticket

PROMPT = 2.0
SIG = "SyncBatchNorm(3, ...)"


def ticket(
    rank: int,
    world: int = 2,
    signature: str = SIG,
    *,
    tenant: str = "",
    group: str = "g",
    module: str = "bn",
    phase: Phase = Phase.FORWARD,
) -> Ticket:
    return Ticket(tenant, group, module, phase, rank, world, signature)


def part(n: int, c: int = 3, state: RunningState | None = None) -> Contribution:
    g = np.random.default_rng(n)
    return Contribution(n, (g.standard_normal(c), g.uniform(1, 2, c)), state)


def run_all(fns: Sequence[Callable[[], Any]], stagger: float = 0.0) -> list[Any]:
    """Run each callable in its own thread (started `stagger` s apart); results or errors."""

    def delayed(i: int, fn: Callable[[], Any]) -> Any:
        time.sleep(stagger * i)
        try:
            return fn()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(len(fns)) as pool:
        return list(pool.map(lambda a: delayed(*a), enumerate(fns)))


def contribute_all(
    coordinator: Coordinator, calls: Sequence[tuple[Ticket, Contribution]], stagger: float = 0.0
) -> list[Any]:
    return run_all(
        [lambda t=t, p=p: coordinator.contribute(t, p) for t, p in calls], stagger=stagger
    )


def wait_for_rounds(coordinator: Coordinator, n: int) -> None:
    deadline = time.monotonic() + PROMPT
    while len(coordinator) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(coordinator) == n


def test_completed_rounds_give_every_rank_the_same_outcome_and_are_forgotten() -> None:
    coordinator = Coordinator(timeout=5.0)
    for _ in range(3):
        results = contribute_all(coordinator, [(ticket(r, 3), part(r + 2)) for r in range(3)])
        assert all(isinstance(r, Outcome) for r in results), results
        assert results[0].count == 2 + 3 + 4
        for r in results[1:]:
            np.testing.assert_array_equal(r.vectors[0], results[0].vectors[0])
            np.testing.assert_array_equal(r.vectors[1], results[0].vectors[1])
        assert len(coordinator) == 0


def test_merge_in_rank_order_equals_the_whole_batch() -> None:
    """Chan's update of uneven splits == moments of the concatenated batch (float64)."""
    rng = np.random.default_rng(0)
    chunks = [rng.normal(1e3, 2.0, (n, 3)) for n in (5, 1, 17)]
    parts = {}
    for r, x in enumerate(chunks):
        mean = x.mean(axis=0)
        parts[r] = Contribution(len(x), (mean, ((x - mean) ** 2).sum(axis=0)))
    whole = np.concatenate(chunks)
    out = merge(Phase.FORWARD, parts)
    assert out.count == len(whole)
    np.testing.assert_allclose(out.vectors[0], whole.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(
        out.vectors[1], ((whole - whole.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-10
    )


def test_timed_out_round_leaves_nothing_and_a_late_rank_opens_the_next() -> None:
    coordinator = Coordinator(timeout=0.3)
    start = time.monotonic()
    (res,) = contribute_all(coordinator, [(ticket(0), part(2))])
    assert isinstance(res, DeadlineExceeded) and "[1]" in str(res), repr(res)
    assert time.monotonic() - start < 3.0
    assert len(coordinator) == 0
    # The late rank is not told of the timed-out round: it waits for the next step.
    (late,) = contribute_all(coordinator, [(ticket(1), part(2))])
    assert isinstance(late, DeadlineExceeded) and "[0]" in str(late), repr(late)
    assert len(coordinator) == 0


def test_abort_fails_waiting_ranks_at_once() -> None:
    coordinator = Coordinator(timeout=5.0)
    start = time.monotonic()
    results = run_all(
        [
            lambda: coordinator.contribute(ticket(0, 3), part(2)),
            lambda: coordinator.abort(ticket(1, 3), "bad input"),
        ],
        stagger=0.2,
    )
    assert isinstance(results[0], Aborted), repr(results[0])
    assert "rank 1" in str(results[0]) and "bad input" in str(results[0])
    assert time.monotonic() - start < PROMPT
    # Rank 2, arriving after the round failed, is told at once too.
    (late,) = contribute_all(coordinator, [(ticket(2, 3), part(2))])
    assert isinstance(late, Aborted) and "bad input" in str(late), repr(late)
    assert time.monotonic() - start < PROMPT
    assert len(coordinator) == 0


def test_config_mismatch_reaches_a_rank_arriving_after_the_round_failed() -> None:
    """world_size 3, rank 1 with another eps: ranks 0 and 1 fail at once, and rank 2,
    arriving later, fails on arrival instead of waiting out the timeout."""
    coordinator = Coordinator(timeout=10.0)
    start = time.monotonic()
    first, second = contribute_all(
        coordinator,
        [(ticket(0, 3), part(2)), (ticket(1, 3, "other eps"), part(2))],
        stagger=0.1,
    )
    assert isinstance(first, Aborted), repr(first)
    assert isinstance(second, InvalidArgument), repr(second)
    (late,) = contribute_all(coordinator, [(ticket(2, 3), part(2))])
    assert isinstance(late, Aborted) and "other eps" in str(late), repr(late)
    assert time.monotonic() - start < PROMPT
    assert len(coordinator) == 0
    # The next step is a fresh round for everyone.
    results = contribute_all(coordinator, [(ticket(r, 3), part(2)) for r in range(3)])
    assert all(isinstance(r, Outcome) for r in results), results


def test_a_told_rank_that_comes_back_starts_the_next_round() -> None:
    """Rank 1 aborted (so it knows), then sends its next step before rank 0 arrived for
    the failed one: rank 0 is told of the failure, then both meet in the next round."""
    coordinator = Coordinator(timeout=5.0)
    coordinator.abort(ticket(1), "bad input")
    results = run_all(
        [
            lambda: coordinator.contribute(ticket(1), part(3)),  # rank 1's next step
            lambda: coordinator.contribute(ticket(0), part(2)),  # rank 0's failed step
            lambda: coordinator.contribute(ticket(0), part(4)),  # rank 0's next step
        ],
        stagger=0.2,
    )
    assert isinstance(results[1], Aborted), repr(results[1])
    assert isinstance(results[0], Outcome) and results[0].count == 3 + 4, repr(results[0])
    assert isinstance(results[2], Outcome) and results[2].count == 3 + 4


def test_aborted_round_nobody_joins_is_forgotten_at_its_deadline() -> None:
    coordinator = Coordinator(timeout=0.2)
    coordinator.abort(ticket(0), "bad input")
    assert len(coordinator) == 1
    time.sleep(0.3)
    assert len(coordinator) == 0


@pytest.mark.parametrize("fault", ["signature", "world_size", "width", "duplicate"])
def test_rejected_rounds_fail_everyone_at_once(fault: str) -> None:
    coordinator = Coordinator(timeout=5.0)
    second = {
        "signature": (ticket(1, 2, "other"), part(2)),
        "world_size": (ticket(1, 3), part(2)),
        "width": (ticket(1), part(2, c=4)),
        "duplicate": (ticket(0), part(2)),
    }[fault]
    start = time.monotonic()
    first_res, second_res = contribute_all(coordinator, [(ticket(0), part(2)), second], stagger=0.2)
    assert time.monotonic() - start < PROMPT
    assert isinstance(first_res, Aborted), repr(first_res)
    expected = Aborted if fault == "duplicate" else InvalidArgument
    assert isinstance(second_res, expected), repr(second_res)


def test_invalid_part_fails_the_round_for_its_peers_at_once() -> None:
    coordinator = Coordinator(timeout=5.0)
    start = time.monotonic()
    good, bad = contribute_all(
        coordinator,
        [(ticket(0), part(2)), (ticket(1), Contribution(-1, part(2).vectors))],
        stagger=0.2,
    )
    assert isinstance(bad, InvalidArgument) and "count" in str(bad), repr(bad)
    assert isinstance(good, Aborted) and "rank 1" in str(good), repr(good)
    assert time.monotonic() - start < PROMPT


def test_tenants_never_share_a_round() -> None:
    """alice and bob use the same group and module names: two rounds, not one."""
    coordinator = Coordinator(timeout=0.5)
    alice, bob = contribute_all(
        coordinator, [(ticket(0, tenant="alice"), part(2)), (ticket(1, tenant="bob"), part(3))]
    )
    assert isinstance(alice, DeadlineExceeded) and isinstance(bob, DeadlineExceeded)
    # bob's abort of "his" g/bn does not touch alice's round.
    results = run_all(
        [
            lambda: coordinator.contribute(ticket(0, tenant="alice"), part(2)),
            lambda: coordinator.abort(ticket(1, tenant="bob"), "bob was here"),
            lambda: coordinator.contribute(ticket(1, tenant="alice"), part(3)),
        ],
        stagger=0.1,
    )
    assert isinstance(results[0], Outcome) and results[0].count == 5, repr(results[0])


def test_rounds_and_tombstones_are_bounded_per_tenant_and_in_total() -> None:
    coordinator = Coordinator(timeout=30.0, max_rounds=8, max_rounds_per_tenant=4)
    for i in range(100):  # bob's aborts: at most 4 tombstones are kept
        coordinator.abort(ticket(0, tenant="bob", module=f"m{i}"), "flood")
    assert len(coordinator) == 4
    with pytest.raises(ResourceExhausted, match="max-rounds-per-tenant"):
        coordinator.contribute(ticket(0, tenant="bob", module="x"), part(2))
    # alice still has her share.
    out = contribute_all(coordinator, [(ticket(r, tenant="alice"), part(2)) for r in range(2)])
    assert all(isinstance(o, Outcome) for o in out), out
    waiting = [
        threading.Thread(
            target=lambda i=i: _swallow(
                lambda: coordinator.contribute(ticket(0, tenant=f"t{i}"), part(2))
            ),
            daemon=True,
        )
        for i in range(4)
    ]
    for t in waiting:
        t.start()
    wait_for_rounds(coordinator, 8)
    with pytest.raises(ResourceExhausted, match="--max-rounds"):
        coordinator.contribute(ticket(0, tenant="carol"), part(2))


def _swallow(fn: Callable[[], Any]) -> None:
    with contextlib.suppress(Exception):
        fn()


def test_stale_state_is_named_and_the_reference_is_the_newest() -> None:
    c = 3
    new = RunningState(7, np.full(c, 1.5, np.float32), np.full(c, 2.0, np.float32))
    old = RunningState(5, np.zeros(c, np.float32), np.ones(c, np.float32))
    coordinator = Coordinator(timeout=5.0)
    results = contribute_all(
        coordinator,
        [(ticket(r, 3), part(2, state=s)) for r, s in enumerate([old, new, new])],
    )
    for out in results:
        assert isinstance(out, Outcome), repr(out)
        assert out.reference is not None and out.reference.same_as(new)
        assert out.reference_rank == 1 and out.stale == (0,)
    same = contribute_all(coordinator, [(ticket(r), part(2, state=new)) for r in range(2)])
    assert all(o.reference is None and o.stale == () for o in same)


def test_submit_calls_back_once_when_the_round_ends() -> None:
    """The non-blocking path a Rounds stream uses: no thread waits, the round's end is
    delivered to each part's callback exactly once (completed, failed, or timed out)."""
    coordinator = Coordinator(timeout=0.3)
    heard: list[tuple[int, object]] = []
    lock = threading.Lock()

    def tell(tag: int) -> Callable[[Outcome | None, Exception | None], None]:
        def done(outcome: Outcome | None, error: Exception | None) -> None:
            with lock:
                heard.append((tag, outcome if error is None else type(error)))

        return done

    coordinator.submit(ticket(0), part(2), tell(0))
    assert heard == []  # returned at once, the round is still open
    coordinator.submit(ticket(1), part(3), tell(1))
    assert sorted(t for t, _ in heard) == [0, 1]
    assert all(isinstance(o, Outcome) and o.count == 5 for _, o in heard)
    heard.clear()
    coordinator.submit(ticket(0, module="lonely"), part(2), tell(2))
    time.sleep(0.8)  # the reaper ends it at its deadline
    assert heard == [(2, DeadlineExceeded)]
    heard.clear()
    coordinator.submit(ticket(0, module="aborted"), part(2), tell(3))
    coordinator.abort(ticket(1, module="aborted"), "bad input")
    assert heard == [(3, Aborted)]
    with pytest.raises(InvalidArgument):  # failures known at once are raised, not called back
        coordinator.submit(ticket(0, world=0), part(2), tell(4))
    assert len(coordinator) == 0
