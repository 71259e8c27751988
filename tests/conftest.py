"""Shared fixtures: a real server process for the integration tests."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from bnclient import Client
from bnserver.cli.processes import ServerProcess, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One `bnserver serve` process shared by the session (tests use distinct module names)."""
    proc = start_server(tmp_path_factory.mktemp("state"))
    yield proc
    code = proc.terminate()
    assert code == 0, f"server exited with {code}:\n{proc.stderr}"


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.address) as c:
        yield c


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A module name unique to the test."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.nodeid)[-200:]


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of the test's own, for tests that restart or kill it."""
    proc = start_server(tmp_path / "state")
    yield proc
    proc.kill()
