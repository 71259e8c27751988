"""examples/train_cnn.py runs as documented: with a server of its own, and against one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_cnn.py"


def _run(*args: str) -> list[str]:
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def _losses(lines: list[str]) -> list[tuple[float, float]]:
    rows = [line.split() for line in lines[1:-1]]
    return [(float(row[1]), float(row[2])) for row in rows]


def test_example_trains_both_models_alike_with_its_own_server() -> None:
    lines = _run("--steps", "3", "--batch-size", "8")
    assert lines[0].split() == [
        "step",
        "local",
        "loss",
        "remote",
        "loss",
        "local",
        "ms",
        "remote",
        "ms",
    ]
    losses = _losses(lines)
    assert len(losses) == 3
    for local, remote in losses:
        assert abs(local - remote) <= 1e-4 * abs(local)
    assert lines[-1].startswith("median step: local ")


def test_example_runs_against_a_given_server(server) -> None:
    lines = _run("--address", server.address, "--steps", "2", "--prefix", "test_example")
    assert len(_losses(lines)) == 2
