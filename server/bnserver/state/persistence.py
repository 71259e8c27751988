"""Module state on disk, under the state directory.

* One file per module (`module-<hash>.npz`): its key, config, identity
  (`uid`), revision, training flag, `num_batches_tracked`, request ids of the
  dedup window, and state arrays. Creates, state loads, resets and mode
  changes (and, with `--durability=always`, training forwards) are written
  here *before* they are published and acknowledged.
* One journal (`journal.npz`) for the running statistics that training
  forwards change: the snapshot thread writes the records of every module
  trained since start-up in one file every `--snapshot-interval` seconds, so
  its cost does not grow with one fsync per module. At start-up a journal
  entry replaces its module's file when it has the same uid and a newer
  revision; at a clean stop the modules changed since their file was written
  are written again and the journal is removed.

Every file is written atomically (temporary file, fsync, rename, fsync of the
directory), so a crash never leaves a torn file; a module file that cannot be
read at start-up is reported and moved aside into `corrupt/`. The directory is
locked (`StateDirLock`) for one server at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import numpy as np

from bnserver.core.config import Kind, ModuleConfig, SyncSpec
from bnserver.errors import NotFound, Unavailable
from bnserver.state.batchnorm import (
    STATE_KEYS,
    Applied,
    BatchNorm,
    Normalization,
    Record,
)
from bnserver.state.registry import KeyLocks, ModuleKey, Registry

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
JOURNAL = "journal.npz"


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


def encode_record(key: ModuleKey, record: Record) -> bytes:
    """The .npz bytes of one module's record."""
    rows = [(rid, a) for rid, a in record.applied]
    stats = [a.norm for _, a in rows if a.norm is not None]
    meta = {
        "version": FORMAT_VERSION,
        "name": key.name,
        "rank": key.rank,
        "tenant": key.tenant,
        "config": _config_to_json(record.config),
        "uid": record.uid,
        "revision": record.revision,
        "training": record.training,
        "num_batches_tracked": record.num_batches_tracked,
        "applied": [[rid, a.at, a.norm is not None] for rid, a in rows],
    }
    arrays: dict[str, np.ndarray] = {k: v.reshape(-1) for k, v in record.state_dict().items()}
    if stats:
        arrays["applied_count"] = np.array([n.count for n in stats], dtype=np.int64)
        arrays["applied_mean"] = np.stack([n.mean for n in stats])
        arrays["applied_inv_std"] = np.stack([n.inv_std for n in stats])
        if all(n.gate is not None for n in stats):
            arrays["applied_gate"] = np.stack([n.gate for n in stats])  # type: ignore[misc]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def decode_record(payload: bytes | Path) -> tuple[ModuleKey, Record]:
    """The key and record of module file bytes (or a path); raises on anything malformed."""
    source = payload if isinstance(payload, Path) else io.BytesIO(payload)
    with np.load(source, allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        version = meta.get("version")
        if version not in (1, FORMAT_VERSION):
            raise ValueError(f"unknown format version {version!r}")
        key = ModuleKey(str(meta["name"]), int(meta["rank"]), str(meta.get("tenant", "")))
        config = _config_from_json(meta["config"])
        state = {k: np.asarray(data[k], dtype=np.float32) for k in STATE_KEYS if k in data.files}
        applied: list[tuple[str, Applied]] = []
        row = 0
        for rid, at, has_stats in meta.get("applied", []):
            norm = None
            if has_stats:
                gate = data["applied_gate"][row] if "applied_gate" in data.files else None
                norm = Normalization(
                    int(data["applied_count"][row]),
                    np.array(data["applied_mean"][row]),
                    np.array(data["applied_inv_std"][row]),
                    None if gate is None else np.array(gate),
                )
                row += 1
            applied.append((str(rid), Applied(float(at), norm)))
    present = {
        "weight": config.affine,
        "bias": config.affine,
        "running_mean": config.track_running_stats,
        "running_var": config.track_running_stats,
    }
    for name, wanted in present.items():
        if wanted != (name in state) or (wanted and state[name].shape != (config.num_features,)):
            raise ValueError(f"state entry {name!r} does not fit {config.describe()}")
    record = Record(
        config,
        str(meta.get("uid", "")) or os.urandom(8).hex(),
        int(meta.get("revision", 0)),
        bool(meta["training"]),
        int(meta.get("num_batches_tracked", 0)),
        state.get("weight"),
        state.get("bias"),
        state.get("running_mean"),
        state.get("running_var"),
        tuple(applied),
    )
    return key, record


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()  # a full disk must not keep a half-written temporary file
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateDirBusy(Exception):
    """Another process holds the state directory."""


class StateDirLock:
    """An exclusive lock on a state directory for this process's lifetime.

    `flock` on `root/LOCK`, which also holds the holder's pid; the kernel drops the
    lock when the process dies, so a crash never leaves a stale lock behind.
    """

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "LOCK"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise StateDirBusy(
                f"state directory {root} is in use by another bnserver (pid {holder}); "
                f"give each server its own --state-dir"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = -1


class StateDir:
    """The files of a Registry's modules under `root` (see the module docstring).

    Writes of one module are serialized, and a module that is no longer the
    registry's (deleted, or replaced by a new one of that name) is never
    written, so a late snapshot cannot resurrect a deleted module.
    """

    def __init__(self, root: Path, registry: Registry) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.registry = registry
        self.key_lock = KeyLocks()
        #: Records recovered from the journal at start-up that could not be filed.
        self.recovered: dict[ModuleKey, bytes] = {}

    def write(self, key: ModuleKey, record: Record, module: BatchNorm | None = None) -> None:
        """Write `record` as the file of `key` (OSError if the write fails). With `module`,
        only while it is the registry's module under `key` (else NotFound: deleted)."""
        payload = encode_record(key, record)
        with self.key_lock(key):
            if module is not None and not self.registry.holds(key, module):
                raise NotFound(f"module {str(key)[:300]!r} was deleted meanwhile")
            _atomic_write(self.root / _file_name(key), payload)

    def write_published(self, key: ModuleKey, module: BatchNorm) -> None:
        """Write `module`'s current record, if it is still the registry's under `key`."""
        with self.key_lock(key):
            if not self.registry.holds(key, module):
                return
            _atomic_write(self.root / _file_name(key), encode_record(key, module.record()))

    def remove(self, key: ModuleKey, unpublish: Callable[[], None]) -> None:
        """Delete the file of `key`, then `unpublish` the module, with no write between
        (OSError if the file cannot be removed: then nothing is unpublished)."""
        with self.key_lock(key):
            path = self.root / _file_name(key)
            if path.exists():
                path.unlink()
                _fsync_dir(self.root)
            unpublish()

    def write_journal(self, entries: dict[ModuleKey, bytes]) -> None:
        """Write the journal: each entry is a module's record bytes (`encode_record`)."""
        arrays = {
            _file_name(key): np.frombuffer(payload, dtype=np.uint8)
            for key, payload in entries.items()
        }
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        _atomic_write(self.root / JOURNAL, buf.getvalue())

    def drop_journal(self) -> None:
        path = self.root / JOURNAL
        if path.exists():
            path.unlink()
            _fsync_dir(self.root)

    def load(self) -> int:
        """Restore every readable module, newest of file and journal; set unreadable files
        aside. Return the count."""
        loaded: dict[str, tuple[ModuleKey, Record]] = {}
        self._from_journal: set[str] = set()
        for path in sorted(self.root.glob("module-*.npz")):
            try:
                loaded[path.name] = decode_record(path)
            except Exception as exc:
                aside = self.root / "corrupt"
                aside.mkdir(exist_ok=True)
                os.replace(path, aside / path.name)
                log.error("state file %s is unreadable (%s); moved to %s", path, exc, aside)
        for name, payload in self._journal_entries():
            if name not in loaded:
                continue  # deleted after the journal was written
            try:
                key, newer = decode_record(payload)
            except Exception as exc:
                log.error("journal entry for %s is unreadable (%s); ignored", name, exc)
                continue
            _, older = loaded[name]
            if newer.uid == older.uid and newer.revision > older.revision:
                loaded[name] = (key, newer)
                self._from_journal.add(name)
        for key, record in loaded.values():
            self.registry.restore(key, record)
        self._file_journal_winners([loaded[name] for name in sorted(self._from_journal)])
        return len(loaded)

    def _file_journal_winners(self, recovered: list[tuple[ModuleKey, Record]]) -> None:
        """Write the module files of state recovered from the journal, then drop it, so
        the journal never holds the only copy of what a restart brought back. What
        cannot be written stays journaled (`recovered`: the persister keeps it)."""
        for key, record in recovered:
            try:
                self.write(key, record)
            except OSError as exc:
                log.error("could not file %s recovered from the journal (%s)", key, exc)
                self.recovered[key] = encode_record(key, record)
        if not self.recovered:
            with contextlib.suppress(OSError):
                self.drop_journal()

    def _journal_entries(self) -> list[tuple[str, bytes]]:
        path = self.root / JOURNAL
        if not path.exists():
            return []
        try:
            with np.load(path, allow_pickle=False) as data:
                return [(name, data[name].tobytes()) for name in data.files]
        except Exception as exc:
            log.error("journal %s is unreadable (%s); ignored", path, exc)
            return []


class Durability(Enum):
    """When a training forward's running-stats update reaches the disk."""

    SNAPSHOT = "snapshot"  # within --snapshot-interval seconds
    ALWAYS = "always"  # before the call is answered


#: Longest pause between attempts to write a snapshot that keeps failing, seconds.
MAX_RETRY_INTERVAL = 30.0


class Persister:
    """Keeps the state directory in step with the modules (the engine's `Persistence`).

    `write` is called with a staged record before it is published; a failure is
    Unavailable and the change is not made. Training forwards mark their module
    dirty (`trained`); the snapshot thread journals dirty modules every
    `interval` seconds, retrying failed writes with backoff (one log line per
    failure) and never dropping a dirty module.
    """

    def __init__(
        self, state: StateDir, interval: float = 1.0, durability: Durability = Durability.SNAPSHOT
    ) -> None:
        self.state = state
        self.interval = interval
        self.durability = durability
        self.write_failures = 0
        self._dirty: dict[ModuleKey, BatchNorm] = {}
        self._dirty_since: float | None = None  # monotonic time of the oldest unwritten change
        # key -> (uid, record bytes); seeded with what start-up recovered but could not file
        self._journal: dict[ModuleKey, tuple[str, bytes]] = {
            key: ("", payload) for key, payload in state.recovered.items()
        }
        self._unfiled: set[ModuleKey] = set(state.recovered)  # journaled, not filed since
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bnserver-snapshot", daemon=True)
        self._thread.start()

    @property
    def always(self) -> bool:
        return self.durability is Durability.ALWAYS

    def write(self, key: ModuleKey, record: Record, module: BatchNorm | None = None) -> None:
        try:
            self.state.write(key, record, module)
        except OSError as exc:
            self.write_failures += 1
            raise Unavailable(
                f"the change could not be written to the state directory "
                f"({exc.strerror or exc}); nothing was changed, retry later"
            ) from None
        with self._lock:
            self._unfiled.discard(key)

    def trained(self, key: ModuleKey, module: BatchNorm) -> None:
        with self._lock:
            self._dirty[key] = module
            if self._dirty_since is None:
                self._dirty_since = time.monotonic()

    def delete(self, key: ModuleKey, unpublish: Callable[[], None]) -> None:
        try:
            self.state.remove(key, unpublish)
        except OSError as exc:
            self.write_failures += 1
            raise Unavailable(
                f"the module's file could not be removed ({exc.strerror or exc}); "
                f"the module was not deleted, retry later"
            ) from None
        with self._lock:
            self._dirty.pop(key, None)
            self._journal.pop(key, None)
            self._unfiled.discard(key)

    def snapshot_age(self) -> float:
        """Seconds since the oldest change not yet on disk (0 when all are written)."""
        since = self._dirty_since
        return 0.0 if since is None else time.monotonic() - since

    def snapshot(self) -> int:
        """Journal the modules trained since the last snapshot; return how many.

        On a failed write the modules stay dirty (OSError is raised)."""
        with self._lock:
            dirty, self._dirty = self._dirty, {}
            since, self._dirty_since = self._dirty_since, None
        if not dirty:
            return 0
        try:
            updates = {}
            for key, module in dirty.items():
                if self.state.registry.holds(key, module):
                    updates[key] = (module.uid, encode_record(key, module.record()))
            with self._lock:
                journal = {**self._journal, **updates}
                # A module deleted meanwhile must not come back through the journal.
                journal = {k: v for k, v in journal.items() if self.state.registry.contains(k)}
            self.state.write_journal({k: payload for k, (_, payload) in journal.items()})
        except BaseException:
            with self._lock:
                for key, module in dirty.items():
                    self._dirty.setdefault(key, module)
                if since is not None:
                    self._dirty_since = min(since, self._dirty_since or since)
            raise
        with self._lock:
            self._journal = journal
            self._unfiled.update(updates)
        return len(updates)

    def _run(self) -> None:
        wait = self.interval
        while not self._stop.wait(wait):
            try:
                self.snapshot()
                wait = self.interval
            except Exception as exc:
                self.write_failures += 1
                wait = min(max(wait, self.interval) * 2, MAX_RETRY_INTERVAL)
                log.error(
                    "snapshot of %d module(s) failed (%s); retrying in %g s",
                    len(self._dirty),
                    exc,
                    wait,
                )

    def close(self) -> int:
        """Stop snapshotting; write the files of the modules changed since their file was
        written, then drop the journal. Return how many files were written."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            changed = set(self._unfiled) | set(self._dirty)
        written = 0
        try:
            for key in sorted(changed):
                module = self._module(key)
                if module is not None:
                    self.state.write_published(key, module)
                    written += 1
            self.state.drop_journal()
        except OSError as exc:
            # Keep the journal (the newest state of what could not be filed) and say so.
            log.error("could not write every changed module at shutdown (%s)", exc)
            with contextlib.suppress(Exception):
                self.snapshot()
        return written

    def _module(self, key: ModuleKey) -> BatchNorm | None:
        try:
            return self.state.registry.get(key)
        except LookupError:
            return None
