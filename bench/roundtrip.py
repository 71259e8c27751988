"""Remote forward round trip of a real server process vs the local kernel, same run.

Usage: python -m bench.roundtrip
"""

from __future__ import annotations

import tempfile

import numpy as np

from bench.common import median_seconds, table
from bnclient import Client
from bnserver.config import Kind, ModuleConfig
from bnserver.launch import start_server
from bnserver.modules import BatchNorm

SHAPE = (32, 64, 56, 56)


def rows() -> list[list[str]]:
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    local = BatchNorm(ModuleConfig(Kind.BATCH_NORM_2D, SHAPE[1]))
    kernel = median_seconds(lambda: local.forward(x), repeat=10)
    with tempfile.TemporaryDirectory() as state, start_server(state) as server:
        with Client(server.address) as client:
            bn = client.batch_norm_2d("bench.bn", SHAPE[1])
            remote = median_seconds(lambda: bn(x), repeat=10)
        server.terminate()
    mb = x.nbytes / 1e6
    return [
        [f"kernel train {SHAPE} ({mb:.1f} MB)", f"{kernel * 1e3:.1f} ms", "", ""],
        [
            f"remote train round trip {SHAPE}",
            f"{remote * 1e3:.1f} ms",
            f"kernel {kernel * 1e3:.1f} ms",
            f"{remote / kernel:.2f}x",
        ],
    ]


def main() -> None:
    print(table(rows(), ["measure", "ours", "peer", "ratio"]))


if __name__ == "__main__":
    main()
