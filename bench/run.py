"""`make bench`: every benchmark, one table of ratios against peers measured in the same run.

Usage: python -m bench.run [--skip-huge]
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np

from bench import kernel, sync, torch_step, transport
from bench.common import table


def machine() -> str:
    try:
        import torch

        peer = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        peer = "torch not installed"
    return (
        f"{os.cpu_count()} cores {platform.machine()}, Python {platform.python_version()}, "
        f"numpy {np.__version__}, {peer}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-huge", action="store_true", help="skip the 1 GiB and 3 GiB rows")
    args = parser.parse_args()
    rows = kernel.rows() + transport.rows(args.skip_huge) + sync.rows(cluster=False)
    rows += sync.rows(cluster=True)[1:]
    rows += torch_step.rows()
    print(f"machine: {machine()}\n")
    print(table(rows, ["measure", "ours", "peer", "ratio"]))


if __name__ == "__main__":
    main()
