"""Cluster fixtures: a coordinator and servers as real processes, ranks run in threads."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bnserver.cli.processes import ServerProcess, start_coordinator, start_server

#: Round timeout for the cluster tests: short, so fault tests finish quickly.
SYNC_TIMEOUT = 3.0

_group_ids = itertools.count()


@dataclass
class Cluster:
    coordinator: ServerProcess
    servers: list[ServerProcess]
    state_dirs: list[Path]

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    def restart_server(self, i: int) -> ServerProcess:
        """Kill server `i` (SIGKILL) and start it again on a new port with the same state dir."""
        self.servers[i].kill()
        self.servers[i] = start_server(
            self.state_dirs[i],
            "--coordinator",
            self.coordinator.address,
            "--sync-timeout",
            str(SYNC_TIMEOUT),
        )
        return self.servers[i]

    def stop(self) -> None:
        for proc in [*self.servers, self.coordinator]:
            proc.kill()


def start_cluster(root: Path, servers: int) -> Cluster:
    coordinator = start_coordinator("--sync-timeout", str(SYNC_TIMEOUT))
    dirs = [root / f"server-{i}" for i in range(servers)]
    procs = [
        start_server(d, "--coordinator", coordinator.address, "--sync-timeout", str(SYNC_TIMEOUT))
        for d in dirs
    ]
    return Cluster(coordinator, procs, dirs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A coordinator and three servers shared by a test module (use distinct groups)."""
    c = start_cluster(tmp_path_factory.mktemp("cluster"), 3)
    yield c
    c.stop()


@pytest.fixture
def group() -> str:
    """A sync group name unique to the test."""
    return f"group-{next(_group_ids)}"


def run_ranks(fns: Sequence[Callable[[], Any]], timeout: float = 60.0) -> list[Any]:
    """Run one callable per rank in parallel threads; return results or raised exceptions."""
    with ThreadPoolExecutor(len(fns)) as pool:
        futures = [pool.submit(fn) for fn in fns]
        results: list[Any] = []
        for f in futures:
            try:
                results.append(f.result(timeout))
            except Exception as exc:
                results.append(exc)
        return results
