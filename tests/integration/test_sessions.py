"""Small calls over persistent Session streams behave exactly as the unary calls: the same
results, errors, deadlines, auth and retries (each test runs on both paths)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bnclient import (
    BatchNorm1d,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
)
from bnserver.cli.processes import ServerProcess, start_server

C = 16
PATHS = [True, False]
IDS = ["session", "unary"]


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((8, C)).astype(np.float32)


@pytest.fixture(params=PATHS, ids=IDS)
def sessions(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def small_client(server: ServerProcess, sessions: bool) -> Iterator[Client]:
    with Client(server.address, sessions=sessions) as client:
        yield client


def test_session_and_unary_give_identical_results(server: ServerProcess, name: str) -> None:
    results = []
    for sessions in PATHS:
        with Client(server.address, sessions=sessions) as client:
            bn = client.batch_norm_1d(f"{name}.{sessions}", C)
            y, vjp = bn.vjp(_x())
            results.append((bn(_x(1)), y, *vjp(_x(2)), bn.running_mean, bn.running_var))
    for a, b in zip(*results, strict=True):
        assert np.array_equal(a, b)


def test_errors_are_the_unary_ones(small_client: Client, name: str, sessions: bool) -> None:
    bn = small_client.batch_norm_1d(name, C)
    with pytest.raises(InvalidArgumentError, match="expects 16 channels"):
        bn(np.ones((8, C + 1), np.float32))
    with pytest.raises(InvalidArgumentError, match="more than 1 value per channel"):
        bn(np.ones((1, C), np.float32))
    y, vjp = bn.vjp(_x())
    vjp(np.ones_like(y))
    with pytest.raises(NotFoundError):
        vjp(np.ones_like(y))  # a spent handle
    assert bn.num_batches_tracked == 1  # failed calls changed nothing
    small_client.delete_module(name)
    with pytest.raises(NotFoundError):
        bn(_x())
    # The stream survives its messages' failures: the next call works.
    assert small_client.batch_norm_1d(name, C)(_x()).shape == (8, C)


def test_deadlines_are_the_unary_ones(tmp_path: Path, sessions: bool, name: str) -> None:
    server = start_server(tmp_path / "state", "--sync-timeout", "2")
    with server, Client(server.address, sessions=sessions, timeout=0.3) as client:
        bn = client.sync_batch_norm(name, C, group=name, rank=0, world_size=2)
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            bn(_x())  # its peer never comes
        assert time.monotonic() - start < 5
        other = client.batch_norm_1d(f"{name}.plain", C)
        assert other(_x()).shape == (8, C)  # the client still works


def test_auth_is_the_unary_one(tmp_path: Path, sessions: bool) -> None:
    auth = tmp_path / "auth"
    auth.write_text("alice tok-alice\n")
    proc = start_server(tmp_path / "state", "--auth-file", str(auth))
    try:
        with Client(proc.address, token="tok-alice", sessions=sessions) as alice:
            info = alice.batch_norm_1d("guarded", C).info()
            assert alice.module("guarded")(_x()).shape == (8, C)
        with (
            Client(proc.address, token="wrong", sessions=sessions) as mallory,
            pytest.raises(UnauthenticatedError),
        ):
            BatchNorm1d(mallory, info)(_x())
    finally:
        proc.kill()


def test_a_stream_cancelled_for_idleness_is_reopened(tmp_path: Path, sessions: bool) -> None:
    proc = start_server(tmp_path / "state", "--idle-timeout", "0.5")
    try:
        with Client(proc.address, sessions=sessions) as client:
            bn = client.batch_norm_1d("idle", C)
            bn(_x())
            time.sleep(1.5)  # the server cancels a stream idle this long
            y, vjp = bn.vjp(_x())
            time.sleep(1.5)
            assert vjp(np.ones_like(y))[0].shape == (8, C)  # a backward is never retried
            assert bn.num_batches_tracked == 2
    finally:
        proc.kill()
    if sessions:
        assert proc.stderr.count("Forward session") == 2
        assert proc.stderr.count("Backward session") == 1


def test_a_stream_is_one_call_in_progress(tmp_path: Path) -> None:
    """Under --max-calls-per-tenant an open stream is one call, however many messages it
    carries, and a closed client's streams no longer count."""
    proc = start_server(tmp_path / "state", "--max-calls-per-tenant", "2")
    try:
        with Client(proc.address) as client:
            bn = client.batch_norm_1d("counted", C)
            for _ in range(20):
                bn(_x())  # the stream: one call in progress
                assert bn.training  # a unary call beside it: the second
            assert bn.num_batches_tracked == 20
        for _ in range(3):  # each client's stream went with it
            with Client(proc.address) as client:
                assert client.module("counted")(_x()).shape == (8, C)
    finally:
        proc.kill()
