"""Running statistics stay within --snapshot-interval of memory with 1,000 modules
training: one journal write per interval, not one fsync per module."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bnclient import Client
from bnserver.cli.processes import start_server

MODULES = 1000
C = 16


def test_a_thousand_training_modules_are_on_disk_within_the_interval(tmp_path: Path) -> None:
    state = tmp_path / "state"
    interval = 1.0
    server = start_server(state, "--snapshot-interval", str(interval))
    x = np.random.default_rng(0).standard_normal((4, C)).astype(np.float32)
    try:
        with Client(server.address, timeout=30) as client:
            mods = [client.batch_norm_1d(f"m{i}", C) for i in range(MODULES)]
            with ThreadPoolExecutor(4) as pool:
                for round_ in range(2):
                    list(pool.map(lambda m, r=round_: m(x + r), mods))
                expected = list(pool.map(lambda m: m.state_dict(), mods))
            trained_at = time.monotonic()
        time.sleep(interval * 2.0)  # one interval, plus the write of 1,000 records
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
        print(f"\nkilled {time.monotonic() - trained_at:.2f} s after the last update")
        server = start_server(state)
        with Client(server.address, timeout=30) as client, ThreadPoolExecutor(4) as pool:
            got = list(
                pool.map(lambda i: client.batch_norm_1d(f"m{i}", C).state_dict(), range(MODULES))
            )
        stale = [
            i
            for i in range(MODULES)
            if got[i]["running_mean"].tobytes() != expected[i]["running_mean"].tobytes()
        ]
        assert not stale, f"{len(stale)} of {MODULES} modules lost their last updates"
    finally:
        server.kill()


def test_sigterm_writes_only_the_modules_that_changed(tmp_path: Path) -> None:
    """50 modules, one trained since its file was written: SIGTERM writes one file."""
    state = tmp_path / "state"
    server = start_server(state, "--snapshot-interval", "0.2")
    try:
        with Client(server.address, timeout=30) as client:
            mods = [client.batch_norm_1d(f"m{i}", C) for i in range(50)]
            mods[7](np.ones((4, C), np.float32) * np.arange(4, dtype=np.float32)[:, None])
            expected = mods[7].state_dict()
        before = {p.name: p.stat().st_mtime_ns for p in state.glob("module-*.npz")}
        assert server.terminate() == 0
        after = {p.name: p.stat().st_mtime_ns for p in state.glob("module-*.npz")}
        assert "saved 1 module(s)" in server.stderr, server.stderr[-2000:]
        assert sum(before[n] != after[n] for n in before) == 1
        assert not (state / "journal.npz").exists()
        server = start_server(state)
        with Client(server.address, timeout=30) as client:
            got = client.batch_norm_1d("m7", C).state_dict()
        assert got["running_var"].tobytes() == expected["running_var"].tobytes()
    finally:
        server.kill()
