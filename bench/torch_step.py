"""The training step of the example CNN (examples/train_cnn.py) with remote BatchNorm vs
the same step with local torch BatchNorm, measured alternately in one run.

Usage: python -m bench.torch_step
Also the forward and backward of each of its BatchNorm layers alone, remote vs local,
which is where the difference goes.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from bench.common import server_log, table
from bnclient import Client
from bnserver.cli.processes import start_server

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_cnn.py"
BATCH = 32
STEPS = 40
WARMUP = 5


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_cnn", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alternate(a: Callable[[], object], b: Callable[[], object], steps: int) -> tuple[float, float]:
    """Median seconds of a() and b(), run in turns (so both see the same machine load)."""
    for _ in range(WARMUP):
        a()
        b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(steps):
        for fn, out in ((a, times[0]), (b, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def rows() -> list[list[str]]:
    example = load_example()
    out = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        start_server(tmp, stderr_path=server_log("server")) as server,
        Client(server.address) as client,
    ):
        local, remote = example.pair(client, "bench.torch_step")
        opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (local, remote)]
        data = example.batches(BATCH)
        x, y = next(data)

        def step(i: int) -> Callable[[], object]:
            model = (local, remote)[i]
            return lambda: example.train_step(model, opts[i], x, y)

        ours, peer = alternate(step(1), step(0), STEPS)
        out.append(
            [
                f"CNN training step, batch {BATCH}, remote BatchNorm",
                _ms(ours),
                f"local torch BatchNorm {_ms(peer)}",
                f"{ours / peer:.2f}x",
            ]
        )
        # Where the difference goes: each BatchNorm layer's forward and backward.
        inputs: dict[str, torch.Tensor] = {}
        hooks = [
            m.register_forward_hook(lambda m, a, o, n=n: inputs.setdefault(n, a[0].detach()))
            for n, m in local.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        local(x)
        for h in hooks:
            h.remove()
        for layer_name, tensor in inputs.items():
            pair = (remote.get_submodule(layer_name), local.get_submodule(layer_name))

            def fwd_bwd(bn: nn.Module, t: torch.Tensor = tensor) -> Callable[[], object]:
                def run() -> None:
                    xx = t.clone().requires_grad_()
                    out = bn(xx)
                    out.backward(out.detach())

                return run

            ours, peer = alternate(fwd_bwd(pair[0]), fwd_bwd(pair[1]), STEPS)
            out.append(
                [
                    f"  BatchNorm forward+backward {tuple(tensor.shape)}",
                    _ms(ours),
                    f"local torch {_ms(peer)}",
                    f"{ours / peer:.1f}x",
                ]
            )
    return out


if __name__ == "__main__":
    print(table(rows(), ["measure", "ours", "peer", "ratio"]))
