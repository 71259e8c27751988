"""Module state on disk: one file per module under the state directory.

Each module is an .npz holding its key, config (JSON), training flag and state
arrays. Files are written atomically (temporary file, fsync, rename, fsync of
the directory), so a crash never leaves a torn file; a file that cannot be
read at start-up is reported and moved aside into `corrupt/`, never silently
dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import threading
from enum import Enum
from pathlib import Path

import numpy as np

from bnserver.core.config import Kind, ModuleConfig, SyncSpec
from bnserver.errors import Unavailable
from bnserver.state.batchnorm import STATE_KEYS, BatchNorm
from bnserver.state.registry import ModuleKey, Registry

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _file_name(key: ModuleKey) -> str:
    digest = hashlib.sha256(f"{key.tenant}\0{key.rank}\0{key.name}".encode()).hexdigest()[:32]
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
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateDir:
    """Saves and loads the modules of a Registry under `root`, one file per module.

    Writes of one module are serialized, and a module that is no longer the
    registry's (deleted, or replaced by a new one of that name) is never
    written, so a late snapshot cannot resurrect a deleted module.
    """

    def __init__(self, root: Path, registry: Registry) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.registry = registry
        self._locks_lock = threading.Lock()
        self._locks: dict[ModuleKey, threading.Lock] = {}

    def _lock_for(self, key: ModuleKey) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(key, threading.Lock())

    def save_module(self, key: ModuleKey, module: BatchNorm) -> None:
        """Write `module` atomically, if it is still the registry's module under `key`."""
        with self._lock_for(key):
            if not self.registry.holds(key, module):
                return
            training, batches, state = module.snapshot()
            meta = {
                "version": FORMAT_VERSION,
                "name": key.name,
                "rank": key.rank,
                "tenant": key.tenant,
                "config": _config_to_json(module.config),
                "training": training,
                "num_batches_tracked": batches,
            }
            arrays = {k: v.reshape(-1) for k, v in state.items()}
            arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
            buf = io.BytesIO()
            np.savez(buf, **arrays)  # type: ignore[arg-type]
            _atomic_write(self.root / _file_name(key), buf.getvalue())

    def remove_module(self, key: ModuleKey) -> None:
        """Delete the file of a module that the registry no longer holds."""
        with self._lock_for(key):
            if self.registry.contains(key):
                return  # created again meanwhile: the file is the new module's
            path = self.root / _file_name(key)
            if path.exists():
                path.unlink()
                _fsync_dir(self.root)

    def save_all(self) -> int:
        """Write every module and remove files of modules that are gone; return the count."""
        items = self.registry.items()
        for key, module in items:
            self.save_module(key, module)
        keep = {_file_name(key) for key, _ in items}
        for path in self.root.glob("module-*.npz"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
        return len(items)

    def load(self) -> int:
        """Restore every readable module file; set unreadable ones aside. Return the count."""
        loaded = 0
        for path in sorted(self.root.glob("module-*.npz")):
            try:
                key, config, state, training, batches = self._read(path)
                self.registry.restore(key, config, state, training, batches)
            except Exception as exc:
                aside = self.root / "corrupt"
                aside.mkdir(exist_ok=True)
                os.replace(path, aside / path.name)
                log.error("state file %s is unreadable (%s); moved to %s", path, exc, aside)
                continue
            loaded += 1
        return loaded

    @staticmethod
    def _read(path: Path) -> tuple[ModuleKey, ModuleConfig, dict[str, np.ndarray], bool, int]:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode())
            if meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format version {meta.get('version')!r}")
            key = ModuleKey(str(meta["name"]), int(meta["rank"]), str(meta.get("tenant", "")))
            state = {k: data[k] for k in STATE_KEYS if k in data.files}
            config = _config_from_json(meta["config"])
            batches = int(meta.get("num_batches_tracked", 0))
            return key, config, state, bool(meta["training"]), batches


class Durability(Enum):
    """When a training forward's running-stats update reaches the disk."""

    SNAPSHOT = "snapshot"  # within --snapshot-interval seconds
    ALWAYS = "always"  # before the call is answered


class Persister:
    """Keeps the state directory in step with the modules (the engine's `Persistence`).

    Creates, deletes, state loads, resets and mode changes are written before
    the call is answered. Running statistics changed by training forwards are
    written by a background snapshot every `interval` seconds, or before the
    call is answered with Durability.ALWAYS.
    """

    def __init__(
        self, state: StateDir, interval: float = 1.0, durability: Durability = Durability.SNAPSHOT
    ) -> None:
        self.state = state
        self.interval = interval
        self.durability = durability
        self._dirty: dict[ModuleKey, BatchNorm] = {}
        self._dirty_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bnserver-snapshot", daemon=True)
        self._thread.start()

    def changed(self, key: ModuleKey, module: BatchNorm) -> None:
        self._save_now(key, module)

    def trained(self, key: ModuleKey, module: BatchNorm) -> None:
        if self.durability is Durability.ALWAYS:
            self._save_now(key, module)
        else:
            self._mark(key, module)

    def _mark(self, key: ModuleKey, module: BatchNorm) -> None:
        with self._dirty_lock:
            self._dirty[key] = module

    def _save_now(self, key: ModuleKey, module: BatchNorm) -> None:
        """Write before the call is answered; a failed write fails the call (UNAVAILABLE)."""
        try:
            self.state.save_module(key, module)
        except OSError as exc:
            self._mark(key, module)  # the snapshot thread keeps trying
            raise Unavailable(
                f"the change was made but could not be written to the state directory "
                f"({exc.strerror or exc}); it is retried every --snapshot-interval"
            ) from None

    def deleted(self, key: ModuleKey) -> None:
        with self._dirty_lock:
            self._dirty.pop(key, None)
        self.state.remove_module(key)

    def snapshot(self) -> int:
        """Write the modules trained since the last snapshot; return how many."""
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, {}
        for key, module in dirty.items():
            self.state.save_module(key, module)
        return len(dirty)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.snapshot()
            except Exception:
                log.exception("snapshot failed; retrying in %s s", self.interval)

    def close(self) -> int:
        """Stop snapshotting and write every module; return the count."""
        self._stop.set()
        self._thread.join()
        return self.state.save_all()
