"""The registry of named modules hosted by one server."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from bnserver.core.config import ModuleConfig
from bnserver.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from bnserver.state.batchnorm import DEDUP_WINDOW, BatchNorm, Record

#: Longest module name accepted, in characters.
MAX_NAME_LENGTH = 256


@dataclass(frozen=True, order=True)
class ModuleKey:
    """Where a module lives: its name, its rank (SyncBatchNorm ranks may share a name)
    and its tenant (each tenant has a namespace of its own; "" without auth)."""

    name: str
    rank: int = 0
    tenant: str = ""

    def __str__(self) -> str:
        return self.name if self.rank == 0 else f"{self.name} (rank {self.rank})"


def check_name(name: str) -> None:
    if not name:
        raise InvalidArgument("module name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"module name has {len(name)} characters; at most {MAX_NAME_LENGTH} are allowed"
        )
    if not name.isprintable():
        raise InvalidArgument("module name must contain printable characters only")


class KeyLocks:
    """One lock per module key, kept only while someone holds or waits for it (so
    nothing is retained per name once its calls are done)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[ModuleKey, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def __call__(self, key: ModuleKey) -> Iterator[None]:
        with self._lock:
            lock, users = self._held.get(key, (threading.Lock(), 0))
            self._held[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._held[key]
                if users == 1:
                    del self._held[key]
                else:
                    self._held[key] = (lock, users - 1)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)


class Registry:
    """Named modules, keyed by ModuleKey. Thread-safe.

    A module is *published* (visible to every call) only once it is durable:
    the engine creates one under `creating(key)`, writes it, then `publish`es it.

    max_modules: modules per tenant.
    dedup_window: the request-id window of the modules it builds.
    """

    def __init__(self, max_modules: int = 10_000, dedup_window: float = DEDUP_WINDOW) -> None:
        self.dedup_window = dedup_window
        self._lock = threading.Lock()
        self._modules: dict[ModuleKey, BatchNorm] = {}
        self._per_tenant: Counter[str] = Counter()
        self.max_modules = max_modules
        #: Serializes the creates and deletes of one key (nothing kept per name after).
        self.creating = KeyLocks()

    def key_for(self, name: str, config: ModuleConfig, tenant: str = "") -> ModuleKey:
        """The key a module of `config` named `name` lives under."""
        check_name(name)
        return ModuleKey(name, config.sync.rank if config.sync is not None else 0, tenant)

    def existing(self, key: ModuleKey, config: ModuleConfig) -> BatchNorm | None:
        """The published module under `key` if its config is `config`, None if there is
        none; AlreadyExists if it has another config."""
        with self._lock:
            module = self._modules.get(key)
        if module is not None and module.config != config:
            raise AlreadyExists(
                f"module {str(key)!r} exists as {module.config.describe()}; "
                f"asked for {config.describe()} (delete it first to change its config)"
            )
        return module

    def check_room(self, key: ModuleKey) -> None:
        """ResourceExhausted if `key`'s tenant holds --max-modules modules."""
        with self._lock:
            if self._per_tenant[key.tenant] >= self.max_modules:
                raise ResourceExhausted(
                    f"a tenant may hold at most {self.max_modules} modules (--max-modules)"
                )

    def publish(self, key: ModuleKey, module: BatchNorm) -> None:
        with self._lock:
            if self._modules.get(key) is None:
                self._per_tenant[key.tenant] += 1
            self._modules[key] = module

    def get_or_create(self, key: ModuleKey, config: ModuleConfig) -> tuple[BatchNorm, bool]:
        """The module under `key`, created (and published at once, with no persistence)
        from `config` if absent; and whether it was created."""
        config.validate()
        with self.creating(key):
            module = self.existing(key, config)
            if module is not None:
                return module, False
            self.check_room(key)
            module = BatchNorm(config, self.dedup_window)
            self.publish(key, module)
            return module, True

    def get(self, key: ModuleKey) -> BatchNorm:
        with self._lock:
            module = self._modules.get(key)
        if module is None:
            raise NotFound(f"no module named {str(key)[:300]!r}")
        return module

    def delete(self, key: ModuleKey) -> BatchNorm:
        """Remove and return the module under `key`."""
        with self._lock:
            module = self._modules.pop(key, None)
            if module is not None:
                self._per_tenant[key.tenant] -= 1
                if not self._per_tenant[key.tenant]:
                    del self._per_tenant[key.tenant]
        if module is None:
            raise NotFound(f"no module named {str(key)[:300]!r}")
        return module

    def items(self, tenant: str | None = None) -> list[tuple[ModuleKey, BatchNorm]]:
        """A sorted snapshot of (key, module) pairs, of one tenant or of all."""
        with self._lock:
            pairs = [kv for kv in self._modules.items() if tenant in (None, kv[0].tenant)]
        return sorted(pairs, key=lambda kv: kv[0])

    def contains(self, key: ModuleKey) -> bool:
        with self._lock:
            return key in self._modules

    def holds(self, key: ModuleKey, module: BatchNorm) -> bool:
        """Whether `module` is (still) the module under `key`."""
        with self._lock:
            return self._modules.get(key) is module

    def restore(self, key: ModuleKey, record: Record) -> BatchNorm:
        """Rebuild a module read from disk under `key` (start-up only)."""
        module = BatchNorm(record.config, self.dedup_window)
        module.restore(record)
        self.publish(key, module)
        return module

    def __len__(self) -> int:
        with self._lock:
            return len(self._modules)
