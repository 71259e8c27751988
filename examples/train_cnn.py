"""Train a small CNN with remote BatchNorm next to the same CNN with local torch BatchNorm.

    python examples/train_cnn.py                      # starts a server of its own
    python examples/train_cnn.py --address 127.0.0.1:50051 --steps 50

Both models start from the same weights and see the same batches of a
synthetic 10-class image task; the script prints both loss curves side by
side and the median step time of each.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Iterator

import torch
from torch import nn

from bnclient import Client
from bnclient.torch import convert_batchnorm

#: The task: 3x32x32 images, 10 classes.
IMAGE, CLASSES = (3, 32, 32), 10


def make_cnn() -> nn.Module:
    """Two conv blocks with BatchNorm2d and a classifier with BatchNorm1d (the classic
    small CIFAR-10 network: 32 and 64 channels)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128, bias=False),
        nn.BatchNorm1d(128),
        nn.ReLU(inplace=True),
        nn.Linear(128, CLASSES),
    )


def batches(batch_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless stream of (images, labels): labels come from a fixed random linear
    teacher, so the task is learnable."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(CLASSES, *IMAGE, generator=gen)
    while True:
        x = torch.randn(batch_size, *IMAGE, generator=gen) * 2 + 0.5
        logits = torch.einsum("nchw,kchw->nk", x, teacher)
        yield x, logits.argmax(dim=1)


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> float:
    """One optimizer step; returns the loss."""
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    return loss.item()


def pair(client: Client, prefix: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(local model, remote model): the same initial weights; the remote one's BatchNorm
    layers live on the server as f"{prefix}.{layer}"."""
    torch.manual_seed(seed)
    local = make_cnn()
    remote = convert_batchnorm(copy.deepcopy(local), client, prefix=prefix)
    return local, remote


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="a running bnserver (default: start one)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prefix", default="examples.train_cnn")
    args = parser.parse_args()

    server = None
    address = args.address
    if address is None:
        from bnserver.cli.processes import start_server

        server = start_server(tempfile.mkdtemp(prefix="bnserver-example-"))
        address = server.address
    try:
        with Client(address) as client:
            local, remote = pair(client, args.prefix)
            opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (local, remote)]
            times: list[list[float]] = [[], []]
            header = ("step", "local loss", "remote loss", "local ms", "remote ms")
            print("{:>4}  {:>10}  {:>11}  {:>8}  {:>9}".format(*header))
            data = batches(args.batch_size)
            for step in range(args.steps):
                x, y = next(data)
                losses = []
                for i, (model, opt) in enumerate(zip((local, remote), opts, strict=True)):
                    start = time.perf_counter()
                    losses.append(train_step(model, opt, x, y))
                    times[i].append(time.perf_counter() - start)
                print(
                    f"{step:>4}  {losses[0]:>10.6f}  {losses[1]:>11.6f}  "
                    f"{times[0][-1] * 1e3:>8.2f}  {times[1][-1] * 1e3:>9.2f}"
                )
            local_ms, remote_ms = (statistics.median(t) * 1e3 for t in times)
            print(
                f"median step: local {local_ms:.2f} ms, remote {remote_ms:.2f} ms "
                f"({remote_ms / local_ms:.2f}x)"
            )
    finally:
        if server is not None:
            server.terminate()


if __name__ == "__main__":
    main()
