"""SyncBatchNorm you can trust, against real processes: every topology, late ranks told
at once, ranks that never diverge (paused, killed and restarted servers), reads that
never wait on the network, and a quick recovery after a coordinator outage.

"Identical" below means bit for bit: the running statistics of every rank of a
group are compared with np.testing.assert_array_equal.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bnclient import AbortedError, Client, InvalidArgumentError, ServiceError, SyncBatchNorm
from bnserver.cli.processes import ServerProcess, start_coordinator, start_server
from tests.cluster.conftest import run_ranks

C = 4
TIMEOUT = "3"  # --sync-timeout of these clusters, seconds
PROMPT = 2.0


def batch(seed: int, n: int = 8) -> np.ndarray:
    g = np.random.default_rng(seed)
    loc = np.linspace(-3, 5, C).reshape(1, C, 1, 1)
    return (g.standard_normal((n, C, 2, 3)) * 2 + loc).astype(np.float32)


def whole_batch(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3), keepdims=True)
    var = x64.var(axis=(0, 2, 3), keepdims=True)
    return (x64 - mean) / np.sqrt(var + eps)


def ranks_of(
    addresses: Sequence[str], name: str, group: str, timeout: float = 20.0, **kw: Any
) -> tuple[list[Client], list[SyncBatchNorm]]:
    world = len(addresses)
    clients = [Client(a, timeout=timeout) for a in addresses]
    mods = [
        c.sync_batch_norm(name, C, group=group, rank=r, world_size=world, **kw)
        for r, c in enumerate(clients)
    ]
    return clients, mods


def group_step(mods: Sequence[SyncBatchNorm], x: np.ndarray) -> None:
    """One step of the whole group on equal slices of `x`; must match the whole batch."""
    parts = np.array_split(x, len(mods))
    outs = run_ranks([lambda m=m, p=p: m(p) for m, p in zip(mods, parts, strict=True)], 30.0)
    errors = [o for o in outs if isinstance(o, BaseException)]
    assert not errors, errors
    np.testing.assert_allclose(np.concatenate(outs), whole_batch(x), rtol=1e-5, atol=1e-5)


def assert_identical(mods: Sequence[SyncBatchNorm]) -> None:
    states = [m.state_dict() for m in mods]
    for r, state in enumerate(states[1:], start=1):
        for key in ("running_mean", "running_var"):
            np.testing.assert_array_equal(state[key], states[0][key], err_msg=f"rank {r} {key}")


def close(clients: Sequence[Client]) -> None:
    for c in clients:
        c.close()


@pytest.fixture
def procs() -> Iterator[list[ServerProcess]]:
    """Processes a test starts; killed at its end."""
    started: list[ServerProcess] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.proc.pid, signal.SIGCONT)
        p.kill()


# -- every topology -------------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["one-server", "standalone-coordinator", "mixed"])
def test_every_topology_trains_identical_ranks(
    tmp_path: Path, procs: list[ServerProcess], topology: str
) -> None:
    """one-server: both ranks on one server (embedded coordinator); standalone: a
    coordinator and one server per rank; mixed: rank 0 on a server with the embedded
    coordinator, rank 1 on a server that uses it as --coordinator."""
    if topology == "one-server":
        procs.append(start_server(tmp_path / "a", "--sync-timeout", TIMEOUT))
        addresses = [procs[0].address] * 2
    elif topology == "standalone-coordinator":
        addresses = _cluster(tmp_path, procs)
    else:
        procs.append(start_server(tmp_path / "a", "--sync-timeout", TIMEOUT))
        procs.append(
            start_server(
                tmp_path / "b", "--coordinator", procs[0].address, "--sync-timeout", TIMEOUT
            )
        )
        addresses = [procs[0].address, procs[1].address]
    clients, mods = ranks_of(addresses, "net.bn", "job")
    try:
        for seed in range(5):
            group_step(mods, batch(seed))
        assert_identical(mods)
    finally:
        close(clients)


# -- a late rank is told at once ------------------------------------------------------------


def test_a_late_rank_hears_of_a_config_mismatch_at_once(
    tmp_path: Path, procs: list[ServerProcess]
) -> None:
    """world_size 3, rank 1 created with another eps: ranks 0 and 1 fail at once, and
    rank 2, arriving after the round failed, fails at once too (sync timeout 10 s)."""
    procs.append(start_server(tmp_path / "a", "--sync-timeout", "10"))
    clients = [Client(procs[0].address, timeout=20) for _ in range(3)]
    try:
        mods = [
            c.sync_batch_norm(
                "bn", C, eps=1e-3 if r == 1 else 1e-5, group="g", rank=r, world_size=3
            )
            for r, c in enumerate(clients)
        ]
        x = np.array_split(batch(1, n=9), 3)
        start = time.monotonic()

        def rank1() -> Any:
            time.sleep(0.2)
            return mods[1](x[1])

        first = run_ranks([lambda: mods[0](x[0]), rank1])
        assert isinstance(first[0], AbortedError), first[0]
        assert isinstance(first[1], InvalidArgumentError), first[1]
        (late,) = run_ranks([lambda: mods[2](x[2])])
        assert isinstance(late, AbortedError) and "eps=0.001" in str(late), late
        assert time.monotonic() - start < PROMPT
    finally:
        close(clients)


# -- ranks never diverge ----------------------------------------------------------------------


def _cluster(tmp_path: Path, procs: list[ServerProcess], *extra: str) -> list[str]:
    procs.append(start_coordinator("--sync-timeout", TIMEOUT))
    for i in range(2):
        procs.append(
            start_server(
                tmp_path / f"s{i}",
                "--coordinator",
                procs[0].address,
                "--sync-timeout",
                TIMEOUT,
                *extra,
            )
        )
    return [procs[1].address, procs[2].address]


def test_a_paused_rank_server_leaves_the_ranks_identical(
    tmp_path: Path, procs: list[ServerProcess]
) -> None:
    """Client deadline 0.3 s; rank 1's server is stopped (SIGSTOP) for 0.5 s at random
    moments while both ranks train. Whatever failed, both ranks applied the same rounds."""
    addresses = _cluster(tmp_path, procs)
    clients, mods = ranks_of(addresses, "bn", "g", timeout=0.3)
    done = threading.Event()
    outcomes: list[list[str]] = [[], []]

    def train(rank: int) -> None:
        i = 0
        while not done.is_set():
            try:
                mods[rank](np.array_split(batch(i), 2)[rank])
                outcomes[rank].append("ok")
            except ServiceError as exc:
                outcomes[rank].append(exc.code.name)
            i += 1

    def pause() -> None:
        rng = random.Random(7)
        pid = procs[2].proc.pid
        for _ in range(6):
            time.sleep(rng.uniform(0.05, 0.4))
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.5)
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.3)
        done.set()

    pauser = threading.Thread(target=pause, daemon=True)
    pauser.start()
    try:
        run_ranks([lambda: train(0), lambda: train(1)], timeout=120)
    finally:
        done.set()
        pauser.join(10)
    assert any(o != "ok" for o in outcomes[0] + outcomes[1]), "no call failed: no fault injected"
    # Rounds still waiting end within the sync timeout (applied by both or by neither).
    time.sleep(float(TIMEOUT) + 1.0)
    inspect = [Client(a, timeout=20) for a in addresses]
    try:
        assert_identical(
            [
                c.sync_batch_norm("bn", C, group="g", rank=r, world_size=2)
                for r, c in enumerate(inspect)
            ]
        )
    finally:
        close(inspect)
        close(clients)


def test_a_killed_and_restarted_rank_is_resynchronized(
    tmp_path: Path, procs: list[ServerProcess]
) -> None:
    """Rank 1's server is SIGKILLed after 6 steps and restarts from a state written
    before any training (snapshots every 600 s): at the next step it adopts the group's
    state, and the ranks are identical again."""
    addresses = _cluster(tmp_path, procs, "--snapshot-interval", "600")
    clients, mods = ranks_of(addresses, "bn", "g")
    try:
        for i in range(6):
            group_step(mods, batch(i))
        assert_identical(mods)
        procs[2].kill()
        procs[2] = start_server(
            tmp_path / "s1", "--coordinator", procs[0].address, "--sync-timeout", TIMEOUT
        )
        clients[1].close()
        clients[1] = Client(procs[2].address, timeout=20)
        mods[1] = clients[1].sync_batch_norm("bn", C, group="g", rank=1, world_size=2)
        stale = mods[1].state_dict()["running_mean"]
        np.testing.assert_array_equal(stale, np.zeros((1, C, 1, 1), np.float32))
        group_step(mods, batch(6))
        assert_identical(mods)
        for i in range(7, 10):
            group_step(mods, batch(i))
        assert_identical(mods)
    finally:
        close(clients)


# -- reads never wait on the network ----------------------------------------------------------


def test_reads_of_a_rank_waiting_for_its_peers_answer_at_once(
    tmp_path: Path, procs: list[ServerProcess]
) -> None:
    procs.append(start_server(tmp_path / "a", "--sync-timeout", "5"))
    with Client(procs[0].address, timeout=20) as client:
        bn = client.sync_batch_norm("bn", C, group="g", rank=0, world_size=2)
        waiting = threading.Thread(target=lambda: _swallow(lambda: bn(batch(0))), daemon=True)
        waiting.start()
        time.sleep(0.3)  # rank 0 now waits for rank 1, which never comes
        for read in (bn.state_dict, lambda: bn.training, bn.reset_running_stats):
            start = time.monotonic()
            read()
            assert time.monotonic() - start < 0.5
        waiting.join(10)


def _swallow(fn: Any) -> None:
    with contextlib.suppress(ServiceError):
        fn()


# -- recovery after a coordinator outage ------------------------------------------------------


def test_first_step_after_a_long_coordinator_outage_is_prompt(
    tmp_path: Path, procs: list[ServerProcess]
) -> None:
    """The coordinator is down for 8 s (steps fail fast meanwhile), then restarts on its
    port: a step succeeds within 2 s of its return."""
    addresses = _cluster(tmp_path, procs)
    port = procs[0].port
    clients, mods = ranks_of(addresses, "bn", "g", timeout=5.0)
    try:
        group_step(mods, batch(0))
        procs[0].kill()
        down_until = time.monotonic() + 8.0
        while time.monotonic() < down_until:
            outs = run_ranks([lambda m=m: m(batch(1)[:4]) for m in mods], 10)
            assert all(isinstance(o, ServiceError) for o in outs), outs
            time.sleep(1.0)
        procs[0] = ServerProcess(["coordinator", "--port", str(port), "--sync-timeout", TIMEOUT])
        back = time.monotonic()
        while True:
            outs = run_ranks(
                [lambda m=m, r=r: m(np.array_split(batch(2), 2)[r]) for r, m in enumerate(mods)], 10
            )
            if not any(isinstance(o, BaseException) for o in outs):
                break
            assert time.monotonic() - back < 10, outs
            time.sleep(0.05)
        assert time.monotonic() - back < 2.0
        assert_identical(mods)
    finally:
        close(clients)


# -- one tenant cannot exhaust the coordinator for another ------------------------------------


def test_a_tenant_flooding_failed_rounds_does_not_starve_another(
    tmp_path: Path, procs: list[ServerProcess]
) -> None:
    """bob's sync steps that fail before their part (a wrong channel count) leave
    tombstones; --max-rounds-per-tenant 4 bounds them, and alice's steps still run."""
    tokens = tmp_path / "tokens"
    tokens.write_text("alice alice-token\nbob bob-token\n")
    procs.append(
        start_server(
            tmp_path / "a",
            *("--auth-file", str(tokens), "--sync-timeout", "30"),
            *("--max-rounds", "16", "--max-rounds-per-tenant", "4"),
        )
    )
    with Client(procs[0].address, token="bob-token", timeout=5) as bob:
        for i in range(40):
            bn = bob.sync_batch_norm(f"m{i}", C, group="g", rank=0, world_size=2)
            with pytest.raises(InvalidArgumentError):
                bn(np.zeros((2, C + 1), np.float32))
    alice = [Client(procs[0].address, token="alice-token", timeout=5) for _ in range(2)]
    try:
        mods = [
            c.sync_batch_norm("m0", C, group="g", rank=r, world_size=2) for r, c in enumerate(alice)
        ]
        group_step(mods, batch(3))
    finally:
        close(alice)
