"""`bnserver up` as a real process, and docker-compose.yml checked against its topology."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from bnclient import Client
from bnserver.cli.cluster import cluster_commands
from bnserver.cli.main import build_parser
from bnserver.cli.processes import wait_serving
from tests.cluster.conftest import run_ranks

ROOT = Path(__file__).resolve().parents[2]


def _free_port_range(count: int) -> int:
    """A base port such that base .. base+count-1 are free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def test_up_starts_coordinator_and_servers_then_stops_on_sigterm(tmp_path: Path) -> None:
    base = _free_port_range(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnserver.cli.main", "up", "--servers", "2", "--port", str(base),
         "--state-dir", str(tmp_path), "--sync-timeout", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(4)]
        assert lines[:3] == [
            f"coordinator 127.0.0.1:{base}",
            f"server-1 127.0.0.1:{base + 1}",
            f"server-2 127.0.0.1:{base + 2}",
        ]
        assert "ready" in lines[3]
        for port in range(base, base + 3):
            wait_serving(f"127.0.0.1:{port}", 10)
        x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)

        def rank(r: int) -> np.ndarray:
            with Client(f"127.0.0.1:{base + 1 + r}") as client:
                bn = client.sync_batch_norm("up.bn", 3, group="up", rank=r, world_size=2)
                return bn(x[2 * r : 2 * r + 2])

        y = np.concatenate(run_ranks([lambda: rank(0), lambda: rank(1)]))
        mean, var = x.mean(axis=(0, 2), keepdims=True), x.var(axis=(0, 2), keepdims=True)
        np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        # Every child is gone: nothing answers on the ports any more.
        time.sleep(0.2)
        for port in range(base, base + 3):
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0
        assert (tmp_path / "server-1").is_dir() and (tmp_path / "server-2").is_dir()
    finally:
        if proc.poll() is None:
            proc.kill()


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_commands_are_valid_bnserver_invocations() -> None:
    parser = build_parser()
    for name, service in _compose()["services"].items():
        args = parser.parse_args(service["command"])
        assert args.command in {"serve", "coordinator"}, name
        check = service["healthcheck"]["test"]
        assert check[:2] == ["CMD", "bnserver"]
        health = parser.parse_args(check[2:])
        assert health.command == "health"
        assert health.address == f"127.0.0.1:{args.port}", name


def test_compose_topology_matches_bnserver_up() -> None:
    compose = _compose()
    services = compose["services"]
    parser = build_parser()
    expected = [
        parser.parse_args(c) for c in cluster_commands(2, "0.0.0.0", 50050, Path("/state"), 30)
    ]
    got = {name: parser.parse_args(s["command"]) for name, s in services.items()}
    assert list(got) == ["coordinator", "server-1", "server-2"]
    coordinator = got["coordinator"]
    assert (coordinator.command, coordinator.port, coordinator.sync_timeout) == (
        expected[0].command, expected[0].port, expected[0].sync_timeout,
    )  # fmt: skip
    for i, name in enumerate(["server-1", "server-2"], start=1):
        mine, theirs = got[name], expected[i]
        assert (mine.command, mine.host, mine.port, mine.sync_timeout) == (
            theirs.command, theirs.host, theirs.port, theirs.sync_timeout,
        )  # fmt: skip
        # Same coordinator port; the host is the coordinator's service name in compose.
        host, port = mine.coordinator.rsplit(":", 1)
        assert host == "coordinator" and int(port) == coordinator.port
        assert theirs.coordinator == f"127.0.0.1:{coordinator.port}"
        # State lives on a named volume of its own.
        (volume,) = services[name]["volumes"]
        vol_name, mount = volume.split(":")
        assert mount == str(mine.state_dir) and vol_name in compose["volumes"]
        assert services[name]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    volumes = [services[n]["volumes"][0].split(":")[0] for n in ("server-1", "server-2")]
    assert len(set(volumes)) == 2


def test_readme_sync_example_runs_against_a_cluster(tmp_path: Path) -> None:
    """The README's SyncBatchNorm example, with `bnserver up`'s ports swapped for free ones."""
    text = (ROOT / "README.md").read_text()
    (example,) = [
        b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "sync_batch_norm" in b
    ]
    base = _free_port_range(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnserver.cli.main", "up", "--servers", "2", "--port", str(base),
         "--state-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for _ in range(4):
            proc.stdout.readline()
        script = example.replace("50051", str(base + 1)).replace("50052", str(base + 2))
        run = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr
        difference = float(run.stdout.strip().rsplit(" ", 1)[-1])
        assert difference < 1e-5
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_compose_publishes_on_loopback_unless_told() -> None:
    for name, service in _compose()["services"].items():
        (port,) = service["ports"]
        bind, published, target = port.rsplit(":", 2)
        assert bind == "${BNSERVICE_PUBLISH:-127.0.0.1}", name
        assert published == target == str(build_parser().parse_args(service["command"]).port)


def test_compose_auth_override_turns_tokens_on_for_the_same_topology() -> None:
    base = _compose()["services"]
    auth = yaml.safe_load((ROOT / "docker-compose.auth.yml").read_text())
    parser = build_parser()
    assert set(auth["services"]) == set(base)
    for name, service in auth["services"].items():
        mine, theirs = (
            parser.parse_args(service["command"]),
            parser.parse_args(base[name]["command"]),
        )
        for field in ("command", "host", "port", "sync_timeout"):
            assert getattr(mine, field) == getattr(theirs, field), (name, field)
        files = {
            flag: getattr(mine, flag)
            for flag in ("auth_file", "peer_token_file", "coordinator_token_file")
            if getattr(mine, flag, None)
        }
        wanted = (
            {"peer_token_file"}
            if mine.command == "coordinator"
            else {"auth_file", "coordinator_token_file"}
        )
        assert set(files) == wanted, name
        for path in files.values():
            secret = Path(path).name
            assert str(path) == f"/run/secrets/{secret}", name
            assert secret in service["secrets"] and secret in auth["secrets"], name
