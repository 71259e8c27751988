"""State survives restarts and crashes: SIGTERM drains and saves, SIGKILL keeps what was acked.

Each test kills a real `bnserver serve` process and starts a new one on the
same state directory.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bnclient import Client, NotFoundError
from bnserver.cli.processes import ServerProcess, start_server

C = 6


def _batch(seed: int, n: int = 8) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, C, 4, 4)) * 2 + seed).astype(np.float32)


def _snapshot(client: Client) -> dict[tuple[str, int], tuple[bool, dict[str, bytes]]]:
    """Every module's training flag and state, as bytes (bit-identical comparisons)."""
    out = {}
    for info in client.list_modules():
        bn = (client.batch_norm_1d if info.kind == "BatchNorm1d" else client.batch_norm_2d)(
            info.name,
            info.num_features,
            eps=info.eps,
            momentum=info.momentum,
            affine=info.affine,
            track_running_stats=info.track_running_stats,
            freeze=info.freeze,
        )
        state = {k: v.tobytes() for k, v in bn.state_dict().items()}
        out[(info.name, info.rank)] = (info.training, state)
    return out


def _restart(old: ServerProcess, state_dir: Path, sig: int, *extra: str) -> ServerProcess:
    old.proc.send_signal(sig)
    code = old.proc.wait(30)
    if sig == signal.SIGTERM:
        assert code == 0, old.stderr
    return start_server(state_dir, *extra)


def test_sigterm_finishes_in_flight_calls_saves_and_exits_zero(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    server = start_server(state_dir)
    try:
        with Client(server.address) as client:
            bn = client.batch_norm_2d("big", 16)
            # 128 MiB: a call takes long enough to be surely in flight when the signal lands.
            x = np.random.default_rng(0).standard_normal((128, 16, 128, 128), dtype=np.float32)
            results: list[object] = []

            def calls() -> None:
                for _ in range(3):
                    try:
                        results.append(bn(x))
                    except Exception as exc:  # refused once the server stopped accepting
                        results.append(exc)

            caller = threading.Thread(target=calls)
            caller.start()
            time.sleep(0.15)
            server.proc.send_signal(signal.SIGTERM)
            caller.join(60)
            assert server.proc.wait(30) == 0, server.stderr
        # The call in flight when the signal came finished with a result.
        assert isinstance(results[0], np.ndarray), results[0]
        restarted = start_server(state_dir)
        with restarted, Client(restarted.address) as client:
            rm = client.batch_norm_2d("big", 16).running_mean
            assert rm is not None and np.abs(rm).max() > 0  # at least one update was saved
            assert restarted.terminate() == 0
    finally:
        server.kill()


def test_sigterm_restart_is_bit_identical(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    server = start_server(state_dir)
    with Client(server.address) as client:
        a = client.batch_norm_2d("a", C, momentum=0.7)
        b = client.batch_norm_1d("b", C, affine=False, eps=1e-3)
        for i in range(5):
            a(_batch(i))
            b(_batch(i).reshape(8, C, 16))
        b.eval()
        before = _snapshot(client)
    restarted = _restart(server, state_dir, signal.SIGTERM)
    with restarted, Client(restarted.address) as client:
        assert _snapshot(client) == before
        assert restarted.terminate() == 0


def test_sigkill_keeps_every_acknowledged_change(tmp_path: Path) -> None:
    """Create, delete, load-state, resets and mode changes are on disk when acknowledged."""
    state_dir = tmp_path / "state"
    # A long snapshot interval: only the synchronous writes can save these changes.
    extra = ("--snapshot-interval", "3600")
    server = start_server(state_dir, *extra)
    with Client(server.address) as client:
        loaded = client.batch_norm_2d("loaded", C)
        state = {k: v + 0.25 for k, v in loaded.state_dict().items()}
        loaded.load_state_dict(state)
        client.batch_norm_1d("evaluating", C).eval()
        reset = client.batch_norm_2d("reset", C)
        reset.load_state_dict({k: v * 3 + 1 for k, v in reset.state_dict().items()})
        reset.reset_running_stats()
        params = client.batch_norm_2d("params", C)
        params.load_state_dict({k: v * 3 + 1 for k, v in params.state_dict().items()})
        params.reset_parameters()
        client.batch_norm_2d("deleted", C)
        client.delete_module("deleted")
        before = _snapshot(client)
    restarted = _restart(server, state_dir, signal.SIGKILL, *extra)
    with restarted, Client(restarted.address) as client:
        assert _snapshot(client) == before
        assert {name for name, _ in before} == {"loaded", "evaluating", "reset", "params"}
        with pytest.raises(NotFoundError):
            client.delete_module("deleted")


@pytest.mark.parametrize("durability", ["snapshot", "always"])
def test_sigkill_running_stats_age(tmp_path: Path, durability: str) -> None:
    """snapshot: training is on disk within --snapshot-interval; always: before the reply."""
    state_dir = tmp_path / "state"
    extra = ("--snapshot-interval", "0.2", "--durability", durability)
    server = start_server(state_dir, *extra)
    with Client(server.address) as client:
        bn = client.batch_norm_2d("trained", C)
        for i in range(4):
            bn(_batch(i))
        expected = bn.state_dict()
        if durability == "snapshot":
            time.sleep(0.2 * 3)  # past the interval, with margin
    restarted = _restart(server, state_dir, signal.SIGKILL, *extra)
    with restarted, Client(restarted.address) as client:
        got = client.batch_norm_2d("trained", C).state_dict()
        for key in expected:
            assert got[key].tobytes() == expected[key].tobytes(), key


def test_sigkill_without_waiting_loses_at_most_the_snapshot_interval(tmp_path: Path) -> None:
    """With a long interval, training since the last snapshot is lost, but the module is not."""
    state_dir = tmp_path / "state"
    extra = ("--snapshot-interval", "3600")
    server = start_server(state_dir, *extra)
    with Client(server.address) as client:
        bn = client.batch_norm_2d("young", C)
        created = bn.state_dict()
        bn(_batch(1))
    restarted = _restart(server, state_dir, signal.SIGKILL, *extra)
    with restarted, Client(restarted.address) as client:
        got = client.batch_norm_2d("young", C).state_dict()
        for key in created:
            assert got[key].tobytes() == created[key].tobytes(), key


def test_leftover_temporary_file_from_a_crash_is_ignored(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    server = start_server(state_dir)
    with Client(server.address) as client:
        client.batch_norm_2d("kept", C)(_batch(0))
    assert server.terminate() == 0
    (state_dir / ".module-torn.npz.tmp").write_bytes(b"PK\x03\x04 half a write")
    restarted = start_server(state_dir)
    with restarted, Client(restarted.address) as client:
        assert [m.name for m in client.list_modules()] == ["kept"]
        assert "unreadable" not in restarted.stderr
        assert restarted.terminate() == 0
