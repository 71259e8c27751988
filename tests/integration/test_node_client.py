"""examples/node: a Node.js client written from the .proto alone, run against a real server.

Needs `node` and `npm` (and the npm registry, for `npm ci`); skipped without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bnclient import Client

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "node"
PROTO = ROOT / "proto" / "bnservice" / "v1" / "bnservice.proto"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="node and npm are not installed",
)


def _example_input(shape: tuple[int, ...]) -> np.ndarray:
    """What client.js sends: value i is ((i * 37) % 101) / 10, as float32."""
    i = np.arange(int(np.prod(shape)))
    return (((i * 37) % 101) / 10).astype(np.float32).reshape(shape)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the example with its locked dependencies installed (npm ci, one retry)."""
    work = tmp_path_factory.mktemp("node") / "example"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("node_modules"))
    command = ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"]
    for _attempt in range(2):
        run = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300)
        if run.returncode == 0:
            return work
    pytest.fail(f"npm ci failed ({run.returncode}):\n{run.stderr[-2000:]}")


def test_node_example_against_a_server(installed: Path, fresh_server) -> None:
    env = {**os.environ, "BNSERVICE_PROTO": str(PROTO)}
    run = subprocess.run(
        ["node", "client.js", fresh_server.address, "node.example"],
        cwd=installed,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    steps = {entry["step"]: entry for entry in map(json.loads, run.stdout.splitlines())}
    assert steps["health"]["status"] == "SERVING"
    assert steps["create"] == {"step": "create", "name": "node.example", "training": True}

    # The unary forward matches whole-batch BatchNorm of the same input here.
    x = _example_input((4, 3, 2, 2)).astype(np.float64)
    mean, var = x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), keepdims=True)
    expected = ((x - mean) / np.sqrt(var + 1e-5)).ravel()[:8]
    forward = steps["forward"]
    assert forward["streamed"] is False and forward["shape"] == [4, 3, 2, 2]
    np.testing.assert_allclose(forward["head"], expected, rtol=1e-5, atol=1e-5)

    # 6 MiB each way, over grpc-js's 4 MiB default receive limit: streamed.
    streamed = steps["stream_forward"]
    assert streamed["streamed"] is True and streamed["shape"] == [2, 3, 512, 512]
    np.testing.assert_allclose(streamed["mean"], 0, atol=1e-4)
    np.testing.assert_allclose(streamed["std"], 1, atol=1e-4)
    assert steps["list"]["names"] == ["node.example"]

    # Both training forwards reached the module: its running mean moved twice.
    big = _example_input((2, 3, 512, 512)).astype(np.float64)
    running = 0.9 * (0.9 * 0 + 0.1 * mean.ravel()) + 0.1 * big.mean(axis=(0, 2, 3))
    with Client(fresh_server.address) as client:
        bn = client.batch_norm_2d("node.example", 3)
        np.testing.assert_allclose(bn.running_mean.ravel(), running, rtol=1e-5)
