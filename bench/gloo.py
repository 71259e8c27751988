"""The peer of the SyncBatchNorm rows: torch's batch_norm plus a gloo all_reduce.

Each of `world_size` processes (torch.distributed, gloo backend, loopback TCP)
runs the step a SyncBatchNorm rank runs: per-channel (count, sum, sum of
squares) of its batch, one all_reduce of them, then torch's batch_norm with
the global statistics. Prints seconds per step for rank 0.

Usage (internal): python -m bench.gloo WORLD_SIZE PORT STEPS
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

SHAPE = (8, 16, 8, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _rank(rank: int, world_size: int, port: int, steps: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    x = torch.randn(SHAPE)
    c = SHAPE[1]
    running_mean, running_var = torch.zeros(c), torch.ones(c)

    def step() -> torch.Tensor:
        dims = [0, 2, 3]
        stats = torch.cat(
            [
                torch.tensor([float(x.numel() // c)]),
                x.sum(dims, dtype=torch.float64).float(),
                (x * x).sum(dims, dtype=torch.float64).float(),
            ]
        )
        dist.all_reduce(stats)
        n = stats[0]
        mean = stats[1 : 1 + c] / n
        var = stats[1 + c :] / n - mean * mean
        running_mean.mul_(0.9).add_(mean, alpha=0.1)
        running_var.mul_(0.9).add_(var * n / (n - 1), alpha=0.1)
        return torch.batch_norm(x, None, None, mean, var, False, 0.0, 1e-5, False)

    for _ in range(20):
        step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    if rank == 0:
        print(f"{elapsed / steps!r}", flush=True)
    dist.destroy_process_group()


def step_seconds(world_size: int, steps: int = 200) -> float | None:
    """Seconds per step of `world_size` gloo ranks; None when torch is not installed."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.gloo", str(world_size), str(port), str(steps), str(r)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world_size)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return float(outs[0].strip().splitlines()[-1])


if __name__ == "__main__":
    world, port_arg, steps_arg, rank_arg = (int(a) for a in sys.argv[1:5])
    _rank(rank_arg, world, port_arg, steps_arg)
