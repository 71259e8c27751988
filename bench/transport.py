"""Remote forward vs raw gRPC, same run: round trips, small calls, server memory, 3 GiB.

Usage: python -m bench.transport [--skip-huge]
Peers: `bench.echo`, a raw gRPC server that sends the same bytes straight back
(bidi stream in 1 MiB chunks, or one unary message), plus the local kernel time
for the same tensor. Our server runs as a real `bnserver serve` process.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.common import median_seconds, server_log, table
from bench.echo import EchoClient
from bnclient import Client
from bnserver.cli.processes import ServerProcess, start_server
from bnserver.core.config import Kind, ModuleConfig
from bnserver.state.batchnorm import BatchNorm
from bnservice import wire

MiB = 1 << 20
GiB = 1 << 30
ROUND_TRIPS = {
    "1 MiB": (16, 64, 16, 16),
    "25.7 MB": (32, 64, 56, 56),
    "1 GiB": (256, 64, 128, 128),
}
SMALL = (8, 16)


@contextmanager
def echo_server() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.echo"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        match = re.search(r"listening on (\S+)", proc.stdout.readline())
        assert match, "echo server did not start"
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(10)


def _data(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).random(shape, dtype=np.float32) * 4 + 1


def round_trip_row(client: Client, echo: EchoClient, label: str) -> list[str]:
    """Our remote training forward vs echoing the same bytes plus the local kernel."""
    shape = ROUND_TRIPS[label]
    x = _data(shape)
    repeat = 3 if x.nbytes >= GiB else 10
    bn = client.batch_norm_2d(f"bench.rt.{label}", shape[1])
    local = BatchNorm(ModuleConfig(Kind.BATCH_NORM_2D, shape[1]))
    ours = median_seconds(lambda: bn(x), repeat=repeat, warmup=1)
    echo_t = median_seconds(lambda: echo.echo_chunks(list(wire.chunks(x))), repeat=repeat, warmup=1)
    kernel = median_seconds(lambda: local.forward(x), repeat=repeat, warmup=1)
    client.delete_module(f"bench.rt.{label}")
    return [
        f"remote train forward, {label} {shape}",
        f"{ours * 1e3:.1f} ms",
        f"echo {echo_t * 1e3:.1f} + kernel {kernel * 1e3:.1f} ms",
        f"{ours / (echo_t + kernel):.2f}x",
    ]


def round_trip_row_with(client: Client, echo: str, names: list[str]) -> list[list[str]]:
    """The streamed (remote-host) round trips, through `client`."""
    echo_client = EchoClient(echo)
    rows = [round_trip_row(client, echo_client, label) for label in names]
    echo_client.close()
    return rows


def _throughput(call: Callable[[], object], threads: int = 8, per_thread: int = 300) -> float:
    """Calls per second with `threads` threads making `per_thread` calls each."""
    start = threading.Barrier(threads + 1)

    def run() -> None:
        start.wait()
        for _ in range(per_thread):
            call()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return threads * per_thread / (time.perf_counter() - t0)


def small_call_rows(server: str, echo: str) -> list[list[str]]:
    x = _data(SMALL)
    payload = x.tobytes()
    echo_client = EchoClient(echo)
    with Client(server) as client:
        bn = client.batch_norm_1d("bench.small", SMALL[1])
        bn(x)
        ours = median_seconds(lambda: bn(x), repeat=500, warmup=50)
        peer = median_seconds(lambda: echo_client.unary(payload), repeat=500, warmup=50)
        ours_tp = _throughput(lambda: bn(x))
        peer_tp = _throughput(lambda: echo_client.unary(payload))
    echo_client.close()
    return [
        [
            f"small forward latency {SMALL}",
            f"{ours * 1e3:.3f} ms",
            f"unary echo {peer * 1e3:.3f} ms",
            f"{ours / peer:.2f}x",
        ],
        [
            f"small forward throughput {SMALL}, 8 threads",
            f"{ours_tp:.0f} calls/s",
            f"unary echo {peer_tp:.0f} calls/s",
            f"{ours_tp / peer_tp:.2f}x",
        ],
    ]


def _status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert match, field
    return int(match.group(1))


def memory_row(state_dir: str) -> list[str]:
    """Peak RSS of a fresh server over one 1 GiB training forward, streamed (as from
    another host), relative to the tensor."""
    shape = ROUND_TRIPS["1 GiB"]
    x = _data(shape)
    with (
        start_server(Path(state_dir) / "mem", stderr_path=server_log("mem")) as proc,
        Client(proc.address, shared_memory=False) as client,
    ):
        bn = client.batch_norm_2d("bench.mem", shape[1])
        bn(np.ones((2, shape[1], 2, 2), np.float32))  # warm every code path on a tiny input
        base = _status_kib(proc.proc.pid, "VmRSS") * 1024
        bn(x)
        peak = _status_kib(proc.proc.pid, "VmHWM") * 1024
        proc.terminate()
    ratio = (peak - base) / x.nbytes
    return [
        "server peak RSS growth, 1 GiB forward (streamed)",
        f"{(peak - base) / GiB:.2f} GiB",
        f"tensor {x.nbytes / GiB:.2f} GiB",
        f"{ratio:.2f}x",
    ]


def same_host_row(client: Client, label: str) -> list[str]:
    """Our training forward through the SDK on this host (shared memory when the server
    shares the host) vs local torch batch_norm on the same tensor, measured in turns."""
    import torch

    shape = ROUND_TRIPS[label]
    x = _data(shape)
    repeat = 3 if x.nbytes >= GiB else 10
    bn = client.batch_norm_2d(f"bench.same.{label}", shape[1])
    t = torch.from_numpy(x)
    c = shape[1]
    rm, rv, w, b = torch.zeros(c), torch.ones(c), torch.ones(c), torch.zeros(c)

    def local() -> object:
        return torch.nn.functional.batch_norm(t, rm, rv, w, b, training=True, momentum=0.1)

    ours = median_seconds(lambda: bn(x), repeat=repeat, warmup=1)
    peer = median_seconds(local, repeat=repeat, warmup=1)
    client.delete_module(f"bench.same.{label}")
    via = "shared memory" if client.uses_shared_memory else "streamed"
    return [
        f"same-host train forward, {label} ({via})",
        f"{ours * 1e3:.1f} ms",
        f"local torch {peer * 1e3:.1f} ms",
        f"{ours / peer:.2f}x",
    ]


def _rss_anon(pid: int) -> int:
    return _status_kib(pid, "RssAnon") * 1024


def private_memory_row(state_dir: str) -> list[str]:
    """Peak private (anonymous) memory growth of a fresh server over one 1 GiB training
    forward through shared memory (the mapped shared pages are the client's; sampled
    every millisecond)."""
    shape = ROUND_TRIPS["1 GiB"]
    x = _data(shape)
    with (
        start_server(Path(state_dir) / "anon", stderr_path=server_log("anon")) as proc,
        Client(proc.address) as client,
    ):
        bn = client.batch_norm_2d("bench.anon", shape[1])
        bn(np.ones((2, shape[1], 2, 2), np.float32))
        pid = proc.proc.pid
        base = _rss_anon(pid)
        peak = base
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss_anon(pid))
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        bn(x)
        done.set()
        sampler.join()
        via = "shared memory" if client.uses_shared_memory else "streamed"
        proc.terminate()
    return [
        f"server peak private memory growth, 1 GiB forward ({via})",
        f"{(peak - base) / GiB:.3f} GiB",
        f"tensor {x.nbytes / GiB:.2f} GiB",
        f"{(peak - base) / x.nbytes:.2f}x",
    ]


def huge_row(address: str) -> list[str]:
    """A 3 GiB tensor forward (over gRPC's 2 GiB message limit) through the SDK."""
    shape = (768, 64, 128, 128)
    x = np.empty(shape, np.float32)
    x[...] = np.arange(shape[3], dtype=np.float32)  # cheap to make; per-channel mean 63.5
    with Client(address) as client:
        bn = client.batch_norm_2d("bench.huge", shape[1])
        start = time.perf_counter()
        y = bn(x)
        elapsed = time.perf_counter() - start
        client.delete_module("bench.huge")
    ok = y.shape == shape and abs(float(y[:, :, 0, :].mean())) < 1e-3
    return [
        f"3 GiB forward {shape}",
        "works" if ok else "WRONG RESULT",
        f"{elapsed:.1f} s",
        "",
    ]


def rows(skip_huge: bool = False) -> list[list[str]]:
    names = ["1 MiB", "25.7 MB"] if skip_huge else list(ROUND_TRIPS)
    with tempfile.TemporaryDirectory() as tmp:
        with echo_server() as echo:
            server: ServerProcess
            with start_server(Path(tmp) / "main", stderr_path=server_log("main")) as server:
                # As from another host: streamed, never shared memory.
                with Client(server.address, shared_memory=False) as streamed:
                    out = round_trip_row_with(streamed, echo, names)
                with Client(server.address) as client:
                    out += [same_host_row(client, label) for label in names if label != "1 MiB"]
                out += small_call_rows(server.address, echo)
                if not skip_huge:
                    out.append(huge_row(server.address))
                server.terminate()
        if not skip_huge:
            out.append(memory_row(tmp))
            out.append(private_memory_row(tmp))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-huge", action="store_true", help="skip the 1 GiB and 3 GiB rows")
    print(table(rows(parser.parse_args().skip_huge), ["measure", "ours", "peer", "ratio"]))


if __name__ == "__main__":
    main()
