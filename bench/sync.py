"""SyncBatchNorm step time for 2 and 4 ranks vs a single-rank BatchNorm2d forward,
and vs torch's batch_norm plus a gloo all_reduce of the same statistics.

Usage: python -m bench.sync [--cluster]
Each rank is its own process with its own Client. By default they share one
server with its embedded coordinator; with --cluster each rank has its own
server process and the coordinator runs alone (as `bnserver up`). Every rank
forwards the same small (8, 16, 8, 8) float32 batch; a step is done when all
ranks have their output. Peers, measured in the same run: a BatchNorm2d
forward of the same batch through the same server, and (when torch is
installed) the same step as torch.distributed gloo processes (bench.gloo).
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from bench import gloo
from bench.common import median_seconds, server_log, table
from bnclient import Client
from bnserver.cli.processes import ServerProcess, start_coordinator, start_server

SHAPE = (8, 16, 8, 8)
STEPS = 200


def _rank_loop(address: str, group: str, rank: int, world_size: int, start: Any, out: Any) -> None:
    """One rank in its own process: warm up, wait for every rank, time STEPS steps."""
    x = np.random.default_rng(rank).standard_normal(SHAPE, dtype=np.float32)
    with Client(address) as client:
        bn = client.sync_batch_norm(group, SHAPE[1], group=group, rank=rank, world_size=world_size)
        for _ in range(10):
            bn(x)
        start.wait()
        t0 = time.perf_counter()
        for _ in range(STEPS):
            bn(x)
        out.put((rank, (time.perf_counter() - t0) / STEPS))


def step_time(addresses: list[str], world_size: int, group: str) -> float:
    """Seconds per synchronized training step of `world_size` ranks, each its own process
    (as real workers are, and as the gloo peer's ranks are)."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(world_size)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_rank_loop,
            args=(addresses[r % len(addresses)], group, r, world_size, start, out),
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    times: list[tuple[int, float]] = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    return max(t for _, t in times)


def rows(cluster: bool) -> list[list[str]]:
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        procs: list[ServerProcess] = []
        if cluster:
            coordinator = stack.enter_context(
                start_coordinator(stderr_path=server_log("coordinator"))
            )
            for i in range(4):
                procs.append(
                    stack.enter_context(
                        start_server(
                            Path(tmp) / str(i),
                            "--coordinator",
                            coordinator.address,
                            stderr_path=server_log(f"server-{i}"),
                        )
                    )
                )
        else:
            procs.append(stack.enter_context(start_server(tmp, stderr_path=server_log("server"))))
        addresses = [p.address for p in procs]
        with Client(addresses[0]) as client:
            single_bn = client.batch_norm_2d("bench.single", SHAPE[1])
            single = median_seconds(lambda: single_bn(x), repeat=200, warmup=20)
        out = [[f"BatchNorm2d forward {SHAPE}, 1 rank", f"{single * 1e3:.2f} ms", "", ""]]
        where = "one server each" if cluster else "one server"
        steps = {}
        for world in (2, 4):
            t = steps[world] = step_time(addresses, world, f"bench-{world}")
            out.append(
                [
                    f"SyncBatchNorm step, {world} ranks ({where})",
                    f"{t * 1e3:.2f} ms",
                    f"single-rank {single * 1e3:.2f} ms",
                    f"{t / single:.2f}x",
                ]
            )
    if cluster:
        for world in (2, 4):
            peer = gloo.step_seconds(world)
            if peer is None:
                out.append([f"gloo peer, {world} ranks", "torch not installed", "", ""])
                continue
            out.append(
                [
                    f"SyncBatchNorm step, {world} ranks, vs torch batch_norm + gloo all_reduce",
                    f"{steps[world] * 1e3:.2f} ms",
                    f"gloo {peer * 1e3:.2f} ms",
                    f"{steps[world] / peer:.2f}x",
                ]
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", action="store_true", help="one server process per rank")
    print(table(rows(parser.parse_args().cluster), ["measure", "ours", "peer", "ratio"]))


if __name__ == "__main__":
    main()
