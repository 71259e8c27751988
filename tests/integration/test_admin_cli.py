"""The `bnserver` command line as an operator uses it, against real server processes:
ls / show / rm / export / import, --version, and one-line errors with exit codes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnclient import Client
from bnserver.cli.processes import ServerProcess, start_server

C = 3


def bnserver(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bnserver.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory):
    proc = start_server(tmp_path_factory.mktemp("admin-state"), "--log-level", "warning")
    yield proc
    proc.kill()


def _trained(client: Client, name: str):
    bn = client.batch_norm_2d(name, C, momentum=0.5)
    bn(np.random.default_rng(3).standard_normal((4, C, 2, 2)).astype(np.float32) * 2 + 7)
    return bn


def test_ls_and_show(admin_server: ServerProcess) -> None:
    with Client(admin_server.address) as client:
        _trained(client, "ls.a")
        client.batch_norm_1d("ls.b", 5, affine=False).eval()
        client.sync_batch_norm("ls.sync", C, group="g", rank=1, world_size=2)
    run = bnserver("ls", "--address", admin_server.address)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "CHANNELS", "MODE", "CONFIG"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["ls.a"][1:4] == ["BatchNorm2d", "3", "train"]
    assert rows["ls.b"][1:4] == ["BatchNorm1d", "5", "eval"]
    assert "affine=False" in rows["ls.b"]
    assert rows["ls.sync"][1] == "SyncBatchNorm" and "rank=1/2" in rows["ls.sync"]

    show = bnserver("show", "ls.a", "--address", admin_server.address)
    assert show.returncode == 0, show.stderr
    assert "kind:     BatchNorm2d" in show.stdout and "momentum=0.5" in show.stdout
    (mean_line,) = [line for line in show.stdout.splitlines() if "running_mean" in line]
    assert "1x3x1x1" in mean_line and "float32" in mean_line
    sync = bnserver("show", "ls.sync", "--rank", "1", "--address", admin_server.address)
    assert sync.returncode == 0 and "rank:     1 of 2 in group 'g'" in sync.stdout

    missing = bnserver("show", "ls.missing", "--address", admin_server.address)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "bnserver show: no module named 'ls.missing'"


def test_export_import_round_trip_and_framework_layouts(
    admin_server: ServerProcess, tmp_path: Path
) -> None:
    address = ["--address", admin_server.address]
    with Client(admin_server.address) as client:
        source = _trained(client, "io.source").state_dict()
        target = client.batch_norm_2d("io.target", C, momentum=0.5)
        exported = tmp_path / "state.npz"
        run = bnserver("export", "io.source", str(exported), *address)
        assert run.returncode == 0, run.stderr
        with np.load(exported) as data:
            assert sorted(data.files) == sorted(source)
            assert data["running_mean"].shape == (1, C, 1, 1)
        run = bnserver("import", "io.target", str(exported), *address)
        assert run.returncode == 0, run.stderr
        for key, value in target.state_dict().items():
            assert value.tobytes() == source[key].tobytes(), key

        # PyTorch: (C,) arrays with num_batches_tracked, under a model's key prefix.
        torch_file = tmp_path / "torch.npz"
        torch_state = {
            "layer1.bn.weight": np.full(C, 2.0, np.float32),
            "layer1.bn.bias": np.full(C, 0.5, np.float32),
            "layer1.bn.running_mean": np.arange(C, dtype=np.float32),
            "layer1.bn.running_var": np.full(C, 3.0, np.float32),
            "layer1.bn.num_batches_tracked": np.array(7),
            "layer1.conv.weight": np.zeros((C, C, 3, 3), np.float32),
        }
        np.savez(torch_file, **torch_state)
        run = bnserver("import", "io.target", str(torch_file), "--prefix", "layer1.bn.", *address)
        assert run.returncode == 0, run.stderr
        np.testing.assert_array_equal(target.running_mean.ravel(), np.arange(C))
        np.testing.assert_array_equal(target.weight.ravel(), np.full(C, 2.0))

        # MegEngine: (1, C, 1, 1) arrays.
        mge_file = tmp_path / "mge.npz"
        np.savez(mge_file, running_var=np.full((1, C, 1, 1), 9.0, np.float32))
        strict = bnserver("import", "io.target", str(mge_file), *address)
        assert strict.returncode == 1 and "INVALID_ARGUMENT" in strict.stderr
        assert len(strict.stderr.strip().splitlines()) == 1
        run = bnserver("import", "io.target", str(mge_file), "--no-strict", *address)
        assert run.returncode == 0, run.stderr
        np.testing.assert_array_equal(target.running_var.ravel(), np.full(C, 9.0))

        run = bnserver(
            "export", "io.target", str(tmp_path / "t.npz"), "--layout", "torch", *address
        )
        assert run.returncode == 0, run.stderr
        with np.load(tmp_path / "t.npz") as data:
            assert data["running_var"].shape == (C,)

    unknown = bnserver("import", "io.target", str(torch_file), *address)
    assert unknown.returncode == 1 and "--prefix" in unknown.stderr
    absent = bnserver("import", "io.absent", str(exported), *address)
    assert absent.returncode == 1 and "create the module first" in absent.stderr


def test_rm(admin_server: ServerProcess) -> None:
    with Client(admin_server.address) as client:
        client.batch_norm_1d("rm.me", C)
        run = bnserver("rm", "rm.me", "--address", admin_server.address)
        assert run.returncode == 0, run.stderr
        assert "rm.me" not in [m.name for m in client.list_modules()]
    again = bnserver("rm", "rm.me", "--address", admin_server.address)
    assert again.returncode == 1 and "NOT_FOUND" in again.stderr


def test_tokens_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "auth").write_text("acme secret-acme\nzeta secret-zeta\n")
    (tmp_path / "acme.token").write_text("secret-acme\n")
    with start_server(tmp_path / "state", "--auth-file", str(tmp_path / "auth")) as proc:
        with Client(proc.address, token="secret-zeta") as client:
            client.batch_norm_1d("zeta.only", C)
        with Client(proc.address, token="secret-acme") as client:
            client.batch_norm_1d("acme.only", C)
        address = ["--address", proc.address]
        run = bnserver("ls", "--token-file", str(tmp_path / "acme.token"), *address)
        assert run.returncode == 0, run.stderr
        assert "acme.only" in run.stdout and "zeta.only" not in run.stdout
        refused = bnserver("ls", *address)
        assert refused.returncode == 1
        assert refused.stderr.startswith("bnserver ls: UNAUTHENTICATED")


def _taken_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_startup_and_connection_errors_are_one_line(tmp_path: Path) -> None:
    with _taken_port() as sock:
        port = str(sock.getsockname()[1])
        for command in (
            ["serve", "--port", port, "--state-dir", str(tmp_path)],
            ["coordinator", "--port", port],
            ["serve", "--port", "0", "--metrics-port", port, "--state-dir", str(tmp_path)],
        ):
            run = bnserver(*command)
            assert run.returncode == 1, command
            errors = run.stderr.strip().splitlines()
            assert len(errors) == 1 and "Address already in use" in errors[0], run.stderr
            assert "Traceback" not in run.stderr
        # Nothing listens on a port just bound and closed by us: unreachable.
        unreachable = f"127.0.0.1:{port}"
    for command in (["ls"], ["show", "x"], ["health"]):
        run = bnserver(*command, "--address", unreachable)
        assert run.returncode == 1, command
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "UNAVAILABLE" in run.stderr
    missing = bnserver("serve", "--port", "0", "--auth-file", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert missing.stderr.strip().endswith(
        "cannot read --auth-file " + str(tmp_path / "nope") + ": No such file or directory"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--port", "99999"], "99999 is out of range"),
        (["coordinator", "--metrics-port", "-1"], "-1 is out of range"),
        (["--log-level", "foo", "serve"], "invalid choice: 'foo'"),
        (["serve", "--log-level", "foo"], "invalid choice: 'foo'"),
        (["serve", "--log-format", "xml"], "invalid choice: 'xml'"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], message: str) -> None:
    run = bnserver(*args)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr


def test_version_and_help() -> None:
    from bnserver import __version__

    run = bnserver("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"bnserver {__version__}"
    serve_help = " ".join(bnserver("serve", "--help").stdout.split())
    for text in ("(default 10)", "(default 4096)", "(default 1024)", "--metrics-port"):
        assert text in serve_help
    health_help = " ".join(bnserver("health", "--help").stdout.split())
    assert "--address HOST:PORT the server or coordinator to ask" in health_help


def test_log_options_after_the_subcommand(tmp_path: Path) -> None:
    with start_server(tmp_path / "state", "--log-level", "warning") as proc:
        with Client(proc.address) as client:
            client.list_modules()
        assert proc.terminate() == 0
        # At warning, neither the start-up lines nor the access log are written.
        assert "INFO" not in proc.stderr
