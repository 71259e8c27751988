"""SyncBatchNorm step time for 2 and 4 ranks vs a single-rank BatchNorm2d forward,
and vs torch's batch_norm plus a gloo all_reduce of the same statistics.

Usage: python -m bench.sync [--cluster]
Ranks run in threads, each with its own Client. By default they share one
server with its embedded coordinator; with --cluster each rank has its own
server process and the coordinator runs alone (as `bnserver up`). Every rank
forwards the same small (8, 16, 8, 8) float32 batch; a step is done when all
ranks have their output. Peers, measured in the same run: a BatchNorm2d
forward of the same batch through the same server, and (when torch is
installed) the same step as torch.distributed gloo processes (bench.gloo).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from bench import gloo
from bench.common import median_seconds, table
from bnclient import Client
from bnserver.cli.processes import ServerProcess, start_coordinator, start_server

SHAPE = (8, 16, 8, 8)
STEPS = 200


def step_time(addresses: list[str], world_size: int, group: str) -> float:
    """Seconds per synchronized training step of `world_size` ranks."""
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    clients = [Client(addresses[r % len(addresses)]) for r in range(world_size)]
    modules = [
        c.sync_batch_norm(group, SHAPE[1], group=group, rank=r, world_size=world_size)
        for r, c in enumerate(clients)
    ]
    start = threading.Barrier(world_size + 1)

    def rank(r: int) -> None:
        for _ in range(10):  # warm-up
            modules[r](x)
        start.wait()
        for _ in range(STEPS):
            modules[r](x)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.close()
    return elapsed / STEPS


def rows(cluster: bool) -> list[list[str]]:
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        procs: list[ServerProcess] = []
        if cluster:
            coordinator = stack.enter_context(start_coordinator())
            for i in range(4):
                procs.append(
                    stack.enter_context(
                        start_server(Path(tmp) / str(i), "--coordinator", coordinator.address)
                    )
                )
        else:
            procs.append(stack.enter_context(start_server(tmp)))
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
