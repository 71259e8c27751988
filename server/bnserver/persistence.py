"""Module state on disk: one file per module under the state directory.

Each module is an .npz holding its config (JSON), training flag and state
arrays. Files are written atomically (temporary file, fsync, rename), so a
crash never leaves a torn file; a file that cannot be read at start-up is
reported and moved aside into `corrupt/`, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from bnserver.config import Kind, ModuleConfig, SyncSpec
from bnserver.modules import STATE_KEYS, BatchNorm
from bnserver.registry import ModuleKey, Registry

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _file_name(key: ModuleKey) -> str:
    digest = hashlib.sha256(f"{key.rank}:{key.name}".encode()).hexdigest()[:32]
    return f"module-{digest}.npz"


def _config_to_json(config: ModuleConfig) -> dict[str, object]:
    data = dataclasses.asdict(config)
    data["kind"] = config.kind.value
    return data


def _config_from_json(data: dict[str, object]) -> ModuleConfig:
    data = dict(data)
    sync = data.pop("sync")
    kind = Kind(data.pop("kind"))
    spec = SyncSpec(**sync) if isinstance(sync, dict) else None
    return ModuleConfig(kind=kind, sync=spec, **data).validate()  # type: ignore[arg-type]


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateDir:
    """Saves and loads the modules of a Registry under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def save_module(self, key: ModuleKey, module: BatchNorm) -> None:
        meta = {
            "version": FORMAT_VERSION,
            "name": key.name,
            "rank": key.rank,
            "config": _config_to_json(module.config),
            "training": module.training,
        }
        arrays = {k: v.reshape(-1) for k, v in module.state_dict().items()}
        buf = io.BytesIO()
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        _atomic_write(self.root / _file_name(key), buf.getvalue())

    def remove_module(self, key: ModuleKey) -> None:
        (self.root / _file_name(key)).unlink(missing_ok=True)

    def save_all(self, registry: Registry) -> int:
        """Write every module and remove files of modules that are gone; return the count."""
        items = registry.items()
        keep = set()
        for key, module in items:
            self.save_module(key, module)
            keep.add(_file_name(key))
        for path in self.root.glob("module-*.npz"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
        return len(items)

    def load_into(self, registry: Registry) -> int:
        """Restore every readable module file; set unreadable ones aside. Return the count."""
        loaded = 0
        for path in sorted(self.root.glob("module-*.npz")):
            try:
                key, config, state, training = self._load(path)
                registry.restore(key, config, state, training)
            except Exception as exc:
                aside = self.root / "corrupt"
                aside.mkdir(exist_ok=True)
                os.replace(path, aside / path.name)
                log.error("state file %s is unreadable (%s); moved to %s", path, exc, aside)
                continue
            loaded += 1
        return loaded

    @staticmethod
    def _load(path: Path) -> tuple[ModuleKey, ModuleConfig, dict[str, np.ndarray], bool]:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode())
            if meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format version {meta.get('version')!r}")
            key = ModuleKey(str(meta["name"]), int(meta["rank"]))
            state = {k: data[k] for k in STATE_KEYS if k in data.files}
            return key, _config_from_json(meta["config"]), state, bool(meta["training"])
