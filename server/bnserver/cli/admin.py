"""Administering a running server from a shell, through the SDK.

bnserver ls                      a table of the modules (name, kind, channels, mode, config)
bnserver show NAME               a module's config and a summary of its state
bnserver rm NAME                 delete a module
bnserver export NAME FILE        its state dict to an .npz
bnserver import NAME FILE        an .npz state dict into an existing module

Each takes --address, --token-file (or $BNSERVICE_TOKEN) and --ca. A
SyncBatchNorm rank sharing its name with the group's other ranks is chosen
with --rank. `import` reads MegEngine's layout ((1, C, 1, 1) arrays), PyTorch's
((C,) arrays; `num_batches_tracked` is ignored) or what `export` wrote, and
with --prefix takes one module's entries from a whole model's state dict.
Failures are one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bnclient import Client, ModuleInfo, NotFoundError, ServiceError, UnavailableError
from bnclient.modules import STATE_KEYS, BatchNorm

DEFAULT_ADDRESS = "127.0.0.1:50051"
TOKEN_ENV = "BNSERVICE_TOKEN"

#: Entries of a PyTorch BatchNorm state dict that have no counterpart here.
IGNORED_KEYS = ("num_batches_tracked",)


class AdminError(Exception):
    """A failure reported as one line (the message) and exit code 1."""


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            lines = Path(args.token_file).read_text().split()
        except OSError as exc:
            raise AdminError(
                f"cannot read --token-file {args.token_file}: {exc.strerror}"
            ) from None
        if len(lines) != 1:
            raise AdminError(f"--token-file {args.token_file} must hold exactly one token")
        return lines[0]
    return os.environ.get(TOKEN_ENV) or None


def _client(args: argparse.Namespace) -> Client:
    ca = None
    if args.ca:
        try:
            ca = Path(args.ca).read_bytes()
        except OSError as exc:
            raise AdminError(f"cannot read --ca {args.ca}: {exc.strerror}") from None
    # One retry at most: an operator wants to hear of an unreachable server at once.
    return Client(
        args.address, token=_token(args), root_certificates=ca, timeout=args.timeout, retries=1
    )


def _proxy(client: Client, name: str, rank: int) -> BatchNorm:
    """A proxy of an existing module (any kind)."""
    return client.module(name, rank)


def _find(client: Client, name: str, rank: int) -> ModuleInfo:
    for info in client.list_modules():
        if info.name == name and info.rank == rank:
            return info
    where = f" (rank {rank})" if rank else ""
    raise AdminError(f"no module named {name!r}{where}")


def config_text(info: ModuleInfo) -> str:
    """The tenant-visible construction arguments, as `key=value` words."""
    words = [
        f"eps={info.eps:g}",
        f"momentum={info.momentum:g}",
        f"affine={info.affine}",
        f"track_running_stats={info.track_running_stats}",
        f"freeze={info.freeze}",
    ]
    if info.kind == "SyncBatchNorm":
        words.append(f"group={info.group} rank={info.rank}/{info.world_size}")
    return " ".join(words)


def _mode(info: ModuleInfo) -> str:
    return "train" if info.training else "eval"


def list_modules(args: argparse.Namespace, client: Client) -> None:
    modules = client.list_modules()
    if args.json:
        print(json.dumps([{**vars(m), "mode": _mode(m)} for m in modules], indent=2))
        return
    header = ["NAME", "KIND", "CHANNELS", "MODE", "CONFIG"]
    table = [header] + [
        [m.name, m.kind, str(m.num_features), _mode(m), config_text(m)] for m in modules
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for row in table:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]))


def show(args: argparse.Namespace, client: Client) -> None:
    info = _find(client, args.name, args.rank)
    print(f"name:     {info.name}")
    if info.kind == "SyncBatchNorm":
        print(f"rank:     {info.rank} of {info.world_size} in group {info.group!r}")
    print(f"kind:     {info.kind}")
    print(f"channels: {info.num_features}")
    print(f"mode:     {_mode(info)}")
    print(f"config:   {config_text(info)}")
    state = _proxy(client, args.name, args.rank).state_dict()
    print("state:" if state else "state:    none (affine=False, track_running_stats=False)")
    for key, value in state.items():
        shape = "x".join(map(str, value.shape))
        print(
            f"  {key:<13} {shape:<12} {value.dtype}  min {value.min():.6g}  "
            f"mean {value.mean():.6g}  max {value.max():.6g}"
        )


def remove(args: argparse.Namespace, client: Client) -> None:
    client.delete_module(args.name, args.rank)
    print(f"deleted {args.name}")


def export(args: argparse.Namespace, client: Client) -> None:
    state = _proxy(client, args.name, args.rank).state_dict()
    if args.layout == "torch":
        state = {k: v.reshape(-1) for k, v in state.items()}
    try:
        with open(args.file, "wb") as f:
            np.savez(f, **state)  # type: ignore[arg-type]
    except OSError as exc:
        raise AdminError(f"cannot write {args.file}: {exc.strerror}") from None
    print(f"exported {', '.join(state) or 'no entries'} of {args.name} to {args.file}")


def read_state(path: Path, prefix: str = "") -> dict[str, np.ndarray]:
    """The BatchNorm entries of an .npz state dict; raises AdminError on anything else.

    Keys may carry `prefix` (a module's path in a model's state dict, e.g.
    "layer1.0.bn1."); entries without it are skipped. Arrays may be (C,)
    (PyTorch) or (1, C, 1, 1) (MegEngine, and what `export` writes).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            entries = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as exc:
        raise AdminError(f"cannot read {path} as an .npz state dict: {exc}") from None
    state: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in entries.items():
        if not key.startswith(prefix):
            continue
        short = key[len(prefix) :]
        if short in IGNORED_KEYS:
            continue
        if short not in STATE_KEYS:
            unknown.append(key)
            continue
        state[short] = value
    if unknown:
        raise AdminError(
            f"{path}: unexpected entries {unknown}; entries are {list(STATE_KEYS)}"
            + (" (use --prefix for a model's state dict)" if not prefix else "")
        )
    if not state:
        raise AdminError(f"{path}: no BatchNorm entries" + (f" under {prefix!r}" if prefix else ""))
    return state


def import_(args: argparse.Namespace, client: Client) -> None:
    state = read_state(Path(args.file), args.prefix)
    try:
        _proxy(client, args.name, args.rank).load_state_dict(state, strict=args.strict)
    except NotFoundError as exc:
        raise AdminError(f"{exc.details}; create the module first, then import") from None
    print(f"imported {', '.join(state)} into {args.name}")


def run(command: Callable[[argparse.Namespace, Client], None], args: argparse.Namespace) -> int:
    """Run an admin command; report failures as one line and exit code 1."""
    try:
        with _client(args) as client:
            command(args, client)
    except AdminError as exc:
        print(f"bnserver {args.command}: {exc}", file=sys.stderr)
        return 1
    except UnavailableError as exc:
        print(f"bnserver {args.command}: cannot reach {args.address} ({exc})", file=sys.stderr)
        return 1
    except ServiceError as exc:
        print(f"bnserver {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def add_parsers(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    parents: list[argparse.ArgumentParser],
) -> None:
    """Add ls, show, rm, export and import to the `bnserver` subcommands."""
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help=f"the server (default {DEFAULT_ADDRESS})",
    )
    conn.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"file holding the tenant's token (default: ${TOKEN_ENV}, else none)",
    )
    conn.add_argument("--ca", metavar="FILE", help="PEM root certificate of a TLS server")
    conn.add_argument(
        "--timeout", type=float, default=10.0, help="seconds the command may take (default 10)"
    )
    every = [conn, *parents]

    def named(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", metavar="NAME", help="module name")
        p.add_argument(
            "--rank", type=int, default=0, help="the SyncBatchNorm rank of NAME (default 0)"
        )

    def bind(
        p: argparse.ArgumentParser, command: Callable[[argparse.Namespace, Client], None]
    ) -> None:
        p.set_defaults(func=lambda args: run(command, args))

    p = sub.add_parser("ls", parents=every, help="list the modules of the token's tenant")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bind(p, list_modules)

    p = sub.add_parser("show", parents=every, help="a module's config and state summary")
    named(p)
    bind(p, show)

    p = sub.add_parser("rm", parents=every, help="delete a module")
    named(p)
    bind(p, remove)

    p = sub.add_parser("export", parents=every, help="write a module's state dict to an .npz")
    named(p)
    p.add_argument("file", metavar="FILE", help="the .npz to write")
    p.add_argument(
        "--layout",
        choices=["megengine", "torch"],
        default="megengine",
        help="megengine: (1, C, 1, 1) arrays; torch: (C,) arrays (default megengine)",
    )
    bind(p, export)

    p = sub.add_parser(
        "import", parents=every, help="load an .npz state dict into an existing module"
    )
    named(p)
    p.add_argument("file", metavar="FILE", help="the .npz to read ((C,) or (1, C, 1, 1) arrays)")
    p.add_argument(
        "--prefix",
        default="",
        help="take the entries under this key prefix (e.g. 'layer1.0.bn1.') of a model's "
        "state dict",
    )
    p.add_argument(
        "--no-strict",
        dest="strict",
        action="store_false",
        help="load the entries present only (default: exactly the module's entries)",
    )
    bind(p, import_)
