"""SyncBatchNorm faults never hang.

A missing rank, a rank with another config or channel count, a restarted rank,
a killed server and a restarted coordinator each fail the round on every
waiting rank within the sync timeout (3 s here), change no state, and leave the
group able to run its next step. tests/unit/test_coordinator.py drives the
Coordinator in process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from bnclient import (
    AbortedError,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    SyncBatchNorm,
    UnavailableError,
)
from bnserver.cli.processes import ServerProcess
from tests.cluster.conftest import SYNC_TIMEOUT, Cluster, run_ranks, start_cluster

F64 = np.float64
RANK_TIMEOUT = 20.0
CALL_TIMEOUT = 20.0
#: A failure that does not wait out the round timeout arrives well before it.
PROMPT = 2.0
C = 4


# -- helpers ---------------------------------------------------------------------------------------


def whole_batch(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Plain BatchNorm output of `x` (N, C, ...) in float64, weight 1, bias 0."""
    axes = (0, *range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x64 = x.astype(F64)
    mean = x64.mean(axis=axes).reshape(shape)
    var = x64.var(axis=axes).reshape(shape)
    return (x64 - mean) / np.sqrt(var + eps)


def batch(seed: int, n: int = 6, c: int = C) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, c, 2, 3)) * 2 + 1).astype(np.float32)


def halves(x: np.ndarray) -> list[np.ndarray]:
    n = x.shape[0] // 2
    return [x[:n].copy(), x[n:].copy()]


def timed(fn: Callable[[], Any]) -> Callable[[], tuple[Any, float]]:
    """Wrap a rank's call: return (result or exception, seconds it took)."""

    def run() -> tuple[Any, float]:
        start = time.monotonic()
        try:
            result: Any = fn()
        except Exception as exc:
            result = exc
        return result, time.monotonic() - start

    return run


def start_timed(fn: Callable[[], Any]) -> tuple[threading.Thread, list[tuple[Any, float]]]:
    """Start one rank's call in a daemon thread; join it with a bound and read the box."""
    box: list[tuple[Any, float]] = []
    thread = threading.Thread(target=lambda: box.append(timed(fn)()), daemon=True)
    thread.start()
    return thread, box


def finish(thread: threading.Thread, box: list[tuple[Any, float]]) -> tuple[Any, float]:
    thread.join(RANK_TIMEOUT)
    assert not thread.is_alive(), f"rank call still pending after {RANK_TIMEOUT} s (hang)"
    return box[0]


def step(mods: Sequence[SyncBatchNorm], x: np.ndarray) -> None:
    """One training step of the whole group on halves of `x`; must match the whole batch."""
    results = run_ranks(
        [lambda m=m, xi=xi: m(xi) for m, xi in zip(mods, halves(x), strict=True)], RANK_TIMEOUT
    )
    failures = [(r, res) for r, res in enumerate(results) if isinstance(res, BaseException)]
    assert not failures, f"group step failed: {failures}"
    np.testing.assert_allclose(np.concatenate(results), whole_batch(x), rtol=1e-5, atol=1e-5)


def state_of(mod: SyncBatchNorm) -> dict[str, np.ndarray]:
    return mod.state_dict()


def assert_same_state(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


@pytest.fixture
def clients(cluster: Cluster) -> Iterator[list[Client]]:
    cs = [Client(a, timeout=CALL_TIMEOUT) for a in cluster.addresses]
    yield cs
    for c in cs:
        c.close()


@pytest.fixture
def name(group: str) -> str:
    return f"{group}.bn"


def pair(clients: Sequence[Client], name: str, group: str, **kw: Any) -> list[SyncBatchNorm]:
    """Ranks 0 and 1 of a world-2 group on servers 0 and 1, both named `name`."""
    return [
        clients[r].sync_batch_norm(name, C, group=group, rank=r, world_size=2, **kw)
        for r in range(2)
    ]


# -- (1) a rank missing ----------------------------------------------------------------------------


def test_missing_rank_times_out_and_group_recovers(
    clients: list[Client], name: str, group: str
) -> None:
    mods = pair(clients, name, group)
    before = state_of(mods[0])
    x = batch(0)
    ((res, elapsed),) = run_ranks([timed(lambda: mods[0](halves(x)[0]))], RANK_TIMEOUT)
    assert isinstance(res, DeadlineExceededError), repr(res)
    assert res.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "[1]" in res.details, res.details
    assert SYNC_TIMEOUT - 0.5 < elapsed < SYNC_TIMEOUT + 3, elapsed
    assert_same_state(before, state_of(mods[0]))
    step(mods, batch(1))


# -- (2) a rank with another config ----------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("num_features", C + 1), ("eps", 1e-3), ("momentum", 0.5), ("eps_mode", "max")],
)
def test_rank_with_other_config_is_rejected(
    clients: list[Client], name: str, group: str, field: str, value: Any
) -> None:
    good = clients[0].sync_batch_norm(name, C, group=group, rank=0, world_size=2)
    kw: dict[str, Any] = {"num_features": C, field: value}
    c_bad = kw.pop("num_features")
    bad = clients[1].sync_batch_norm(name, c_bad, group=group, rank=1, world_size=2, **kw)
    befores = [state_of(good), state_of(bad)]
    x = batch(2)
    waiting, box = start_timed(lambda: good(halves(x)[0]))
    time.sleep(0.5)  # rank 0 is waiting in the round
    bad_res, _ = timed(lambda: bad(batch(3, n=3, c=c_bad)))()
    good_res, good_elapsed = finish(waiting, box)
    assert isinstance(bad_res, InvalidArgumentError), repr(bad_res)
    assert "config" in bad_res.details, bad_res.details
    assert isinstance(good_res, AbortedError), repr(good_res)
    assert good_res.code == grpc.StatusCode.ABORTED
    assert good_elapsed < PROMPT, f"ABORTED after {good_elapsed:.2f} s"
    assert_same_state(befores[0], state_of(good))
    assert_same_state(befores[1], state_of(bad))
    # The rank re-created with the group's config rejoins.
    clients[1].delete_module(name, rank=1)
    step(pair(clients, name, group), batch(4))


def test_rank_with_other_world_size_is_rejected(
    clients: list[Client], name: str, group: str
) -> None:
    good = clients[0].sync_batch_norm(name, C, group=group, rank=0, world_size=2)
    bad = clients[1].sync_batch_norm(name, C, group=group, rank=1, world_size=3)
    x = batch(5)
    waiting, box = start_timed(lambda: good(halves(x)[0]))
    time.sleep(0.5)
    bad_res, _ = timed(lambda: bad(halves(x)[1]))()
    good_res, good_elapsed = finish(waiting, box)
    assert isinstance(bad_res, InvalidArgumentError), repr(bad_res)
    assert "world_size" in bad_res.details, bad_res.details
    assert isinstance(good_res, AbortedError), repr(good_res)
    assert good_elapsed < PROMPT


# -- (3) wrong channel count -----------------------------------------------------------------------


def test_wrong_channel_count_aborts_the_round(clients: list[Client], name: str, group: str) -> None:
    mods = pair(clients, name, group)
    befores = [state_of(m) for m in mods]
    x = batch(6)
    waiting, box = start_timed(lambda: mods[0](halves(x)[0]))
    time.sleep(0.5)
    bad_res, bad_elapsed = timed(lambda: mods[1](batch(7, n=3, c=C + 2)))()
    good_res, good_elapsed = finish(waiting, box)
    assert isinstance(bad_res, InvalidArgumentError), repr(bad_res)
    assert "channels" in bad_res.details, bad_res.details
    assert bad_elapsed < PROMPT
    assert isinstance(good_res, AbortedError), repr(good_res)
    assert "rank 1" in good_res.details, good_res.details
    assert good_elapsed < PROMPT, f"ABORTED after {good_elapsed:.2f} s"
    for m, b in zip(mods, befores, strict=True):
        assert_same_state(b, state_of(m))
    step(mods, batch(8))


def test_wrong_channel_count_arriving_first_aborts_the_peer_on_arrival(
    clients: list[Client], name: str, group: str
) -> None:
    """The bad rank comes first, so no round is open yet: the peer must still hear at once."""
    mods = pair(clients, name, group)
    befores = [state_of(m) for m in mods]
    bad_res, _ = timed(lambda: mods[1](batch(7, n=3, c=C + 2)))()
    assert isinstance(bad_res, InvalidArgumentError), repr(bad_res)
    good_res, good_elapsed = timed(lambda: mods[0](halves(batch(6))[0]))()
    assert isinstance(good_res, AbortedError), repr(good_res)
    assert "rank 1" in good_res.details and "channels" in good_res.details, good_res.details
    assert good_elapsed < PROMPT, f"ABORTED after {good_elapsed:.2f} s"
    for m, b in zip(mods, befores, strict=True):
        assert_same_state(b, state_of(m))
    step(mods, batch(8))


def test_wrong_channel_count_in_a_world_of_three(
    clients: list[Client], name: str, group: str
) -> None:
    """Every waiting peer (on two servers) is aborted, not only one."""
    mods = [
        clients[r].sync_batch_norm(name, C, group=group, rank=r, world_size=3) for r in range(3)
    ]
    x = batch(9)
    waiting = [start_timed(lambda m=m: m(x)) for m in mods[:2]]
    time.sleep(0.5)
    bad_res, _ = timed(lambda: mods[2](batch(10, c=C - 1)))()
    assert isinstance(bad_res, InvalidArgumentError), repr(bad_res)
    for thread, box in waiting:
        res, elapsed = finish(thread, box)
        assert isinstance(res, AbortedError), repr(res)
        assert elapsed < PROMPT


def whole_batch_dx(x: np.ndarray, dy: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """dx of plain BatchNorm (weight 1) on the whole batch, float64."""
    axes = (0, *range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    var = x.astype(F64).var(axis=axes).reshape(shape)
    xhat = whole_batch(x, eps)
    dy64 = dy.astype(F64)
    return (
        dy64
        - dy64.mean(axis=axes).reshape(shape)
        - xhat * (dy64 * xhat).mean(axis=axes).reshape(shape)
    ) / np.sqrt(var + eps)


def test_missing_rank_in_backward_times_out_and_keeps_the_handles(
    clients: list[Client], name: str, group: str
) -> None:
    """A failed backward round costs no handle: both ranks retry it and get exact gradients."""
    mods = pair(clients, name, group)
    x = batch(21)
    dy = batch(22)
    outs = run_ranks(
        [lambda m=m, xi=xi: m.vjp(xi) for m, xi in zip(mods, halves(x), strict=True)],
        RANK_TIMEOUT,
    )
    assert not any(isinstance(o, BaseException) for o in outs), outs
    ((res, elapsed),) = run_ranks([timed(lambda: outs[0][1](halves(dy)[0]))], RANK_TIMEOUT)
    assert isinstance(res, DeadlineExceededError), repr(res)
    assert "[1]" in res.details, res.details
    assert SYNC_TIMEOUT - 0.5 < elapsed < SYNC_TIMEOUT + 3, elapsed
    grads = run_ranks(
        [lambda o=o, d=d: o[1](d) for o, d in zip(outs, halves(dy), strict=True)], RANK_TIMEOUT
    )
    assert not any(isinstance(g, BaseException) for g in grads), grads
    dx = np.concatenate([g[0] for g in grads])
    np.testing.assert_allclose(dx, whole_batch_dx(x, dy), rtol=1e-5, atol=1e-5)


def test_wrong_grad_shape_aborts_the_backward_round(
    clients: list[Client], name: str, group: str
) -> None:
    mods = pair(clients, name, group)
    x = batch(23)
    dy = batch(24)
    outs = run_ranks(
        [lambda m=m, xi=xi: m.vjp(xi) for m, xi in zip(mods, halves(x), strict=True)],
        RANK_TIMEOUT,
    )
    assert not any(isinstance(o, BaseException) for o in outs), outs
    waiting, box = start_timed(lambda: outs[0][1](halves(dy)[0]))
    time.sleep(0.5)
    bad_res, _ = timed(lambda: outs[1][1](batch(25, n=3, c=C + 1)))()
    good_res, good_elapsed = finish(waiting, box)
    assert isinstance(bad_res, InvalidArgumentError), repr(bad_res)
    assert isinstance(good_res, AbortedError), repr(good_res)
    assert good_elapsed < PROMPT, f"ABORTED after {good_elapsed:.2f} s"
    # Nothing was spent: the same handles run the backward round.
    grads = run_ranks(
        [lambda o=o, d=d: o[1](d) for o, d in zip(outs, halves(dy), strict=True)], RANK_TIMEOUT
    )
    assert not any(isinstance(g, BaseException) for g in grads), grads
    dx = np.concatenate([g[0] for g in grads])
    np.testing.assert_allclose(dx, whole_batch_dx(x, dy), rtol=1e-5, atol=1e-5)


# -- (4) a restarted rank --------------------------------------------------------------------------


def test_restarted_rank_rejoins(clients: list[Client], name: str, group: str) -> None:
    mods = pair(clients, name, group)
    step(mods, batch(11))
    # Rank 0 starts the next step; meanwhile rank 1 is restarted and joins it.
    x = batch(12)
    waiting, box = start_timed(lambda: mods[0](halves(x)[0]))
    clients[1].delete_module(name, rank=1)
    assert not any(m.name == name and m.rank == 1 for m in clients[1].list_modules())
    restarted = clients[1].sync_batch_norm(name, C, group=group, rank=1, world_size=2)
    fresh = state_of(restarted)
    np.testing.assert_array_equal(fresh["running_mean"], np.zeros((1, C, 1, 1)))
    y1 = restarted(halves(x)[1])
    y0, _ = finish(waiting, box)
    assert not isinstance(y0, BaseException), repr(y0)
    np.testing.assert_allclose(np.concatenate([y0, y1]), whole_batch(x), rtol=1e-5, atol=1e-5)
    step([mods[0], restarted], batch(13))


def test_a_completed_round_is_applied_by_every_rank_and_a_retry_gets_it(
    cluster: Cluster, name: str, group: str
) -> None:
    """Rank 1's caller gives up (deadline 1 s) after its part was given; rank 0 arrives
    later and completes the round. Both servers apply it (the ranks stay identical), and
    rank 1's retry with the same request id gets the committed output, applying nothing."""
    from bnservice import wire
    from bnservice.v1 import bnservice_pb2 as pb
    from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

    patient = Client(cluster.addresses[0], timeout=CALL_TIMEOUT)
    inspect = Client(cluster.addresses[1], timeout=CALL_TIMEOUT)
    try:
        rank0 = patient.sync_batch_norm(name, C, group=group, rank=0, world_size=2)
        rank1 = inspect.sync_batch_norm(name, C, group=group, rank=1, world_size=2)
        x = batch(26)
        request = pb.ForwardRequest(ref=pb.ModuleRef(name=name, rank=1), request_id="step-26")
        wire.encode(halves(x)[1], request.input)
        with grpc.insecure_channel(cluster.addresses[1]) as channel:
            stub = pb_grpc.BatchNormServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Forward(request, timeout=1.0)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # Rank 0 arrives within the sync timeout, after rank 1's call has failed.
            (res0,) = run_ranks([lambda: rank0(halves(x)[0])], RANK_TIMEOUT)
            assert isinstance(res0, np.ndarray), repr(res0)
            deadline = time.monotonic() + PROMPT
            while time.monotonic() < deadline and np.array_equal(
                rank1.running_mean, np.zeros((1, C, 1, 1), np.float32)
            ):
                time.sleep(0.05)
            after = state_of(rank1)
            assert_same_state(state_of(rank0), after)
            retried = stub.Forward(request, timeout=CALL_TIMEOUT)
        y1 = wire.decode(retried.output)
        np.testing.assert_allclose(np.concatenate([res0, y1]), whole_batch(x), rtol=1e-5, atol=1e-5)
        assert_same_state(after, state_of(rank1))  # the retry applied nothing
    finally:
        patient.close()
        inspect.close()


# -- (5) a killed server ---------------------------------------------------------------------------


@pytest.fixture
def private_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A coordinator and two servers of the test's own, for tests that kill processes."""
    c = start_cluster(tmp_path, 2)
    try:
        yield c
    finally:
        c.stop()


def test_killed_server_does_not_hang_its_peer(private_cluster: Cluster, group: str) -> None:
    cl = private_cluster
    name = f"{group}.bn"
    clients = [Client(a, timeout=CALL_TIMEOUT) for a in cl.addresses]
    try:
        mods = pair(clients, name, group)
        step(mods, batch(14))
        before = state_of(mods[0])
        x = batch(15)
        waiting, box = start_timed(lambda: mods[0](halves(x)[0]))
        time.sleep(0.5)  # rank 0 waits in the round
        old = clients[1]
        cl.restart_server(1)  # SIGKILL, then start again on a new port
        res, elapsed = finish(waiting, box)
        assert isinstance(res, DeadlineExceededError | AbortedError), repr(res)
        assert "[1]" in res.details or "rank 1" in res.details, res.details
        assert elapsed < SYNC_TIMEOUT + 3, elapsed
        assert_same_state(before, state_of(mods[0]))
        # The old address is dead: the killed rank's client fails instead of hanging.
        with pytest.raises(UnavailableError):
            old.list_modules()
        old.close()
        clients[1] = Client(cl.addresses[1], timeout=CALL_TIMEOUT)
        # After SIGKILL the module may or may not be restored: get-or-create it.
        step(pair(clients, name, group), batch(16))
    finally:
        for c in clients:
            c.close()


# -- (6) a restarted coordinator -------------------------------------------------------------------


def wait_coordinator_reachable(client: Client, group: str, bound: float = 15.0) -> float:
    """Run a world-1 sync step on the server behind `client` until it succeeds; return seconds."""
    probe = client.sync_batch_norm(
        f"{group}.probe", 1, group=f"{group}.probe", rank=0, world_size=1
    )
    x = np.arange(4, dtype=np.float32).reshape(4, 1)
    start = time.monotonic()
    while True:
        try:
            probe(x)
            return time.monotonic() - start
        except (AbortedError, UnavailableError, DeadlineExceededError):
            if time.monotonic() - start > bound:
                raise
            time.sleep(0.2)


def test_restarted_coordinator_does_not_hang_servers(private_cluster: Cluster, group: str) -> None:
    cl = private_cluster
    name = f"{group}.bn"
    clients = [Client(a, timeout=CALL_TIMEOUT) for a in cl.addresses]
    try:
        mods = pair(clients, name, group)
        step(mods, batch(17))
        before = state_of(mods[0])
        x = batch(18)
        waiting, box = start_timed(lambda: mods[0](halves(x)[0]))
        time.sleep(0.5)  # rank 0 waits in a round held by the coordinator
        port = cl.coordinator.port
        cl.coordinator.kill()
        res, elapsed = finish(waiting, box)
        assert isinstance(res, AbortedError | UnavailableError | DeadlineExceededError), repr(res)
        assert elapsed < SYNC_TIMEOUT + 3, elapsed
        assert_same_state(before, state_of(mods[0]))
        # A new coordinator on the same port (the servers' --coordinator address).
        cl.coordinator = ServerProcess(
            ["coordinator", "--port", str(port), "--sync-timeout", str(SYNC_TIMEOUT)]
        )
        for c in clients:
            wait_coordinator_reachable(c, f"{group}.{c.target}")
        step(mods, batch(19))
        step(mods, batch(20))
    finally:
        for c in clients:
            c.close()


# -- (7) a malformed tensor ------------------------------------------------------------------------


def test_malformed_tensor_from_a_rank_aborts_its_peers(
    clients: list[Client], cluster: Cluster, name: str, group: str
) -> None:
    """Refused while decoding, before the module sees it: the peers still hear at once."""
    from bnservice.v1 import bnservice_pb2 as pb
    from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

    mods = pair(clients, name, group)
    waiting, box = start_timed(lambda: mods[0](halves(batch(30))[0]))
    time.sleep(0.3)
    lying = pb.Tensor(dtype="float32", shape=[3, C, 2, 3], data=b"\0" * 5)
    request = pb.ForwardRequest(ref=pb.ModuleRef(name=name, rank=1), input=lying)
    with (
        grpc.insecure_channel(cluster.addresses[1]) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        pb_grpc.BatchNormServiceStub(channel).Forward(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    res, elapsed = finish(waiting, box)
    assert isinstance(res, AbortedError) and "rank 1" in res.details, repr(res)
    assert elapsed < PROMPT
    step(mods, batch(31))
