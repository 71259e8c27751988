"""The registry of named modules hosted by one server."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from bnserver.config import ModuleConfig
from bnserver.errors import AlreadyExists, InvalidArgument, NotFound
from bnserver.modules import BatchNorm

#: Longest module name accepted, in characters.
MAX_NAME_LENGTH = 256


@dataclass(frozen=True, order=True)
class ModuleKey:
    """Where a module lives: its name and, for SyncBatchNorm ranks sharing a name, its rank."""

    name: str
    rank: int = 0

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


class Registry:
    """Named modules, keyed by ModuleKey. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._modules: dict[ModuleKey, BatchNorm] = {}

    def key_for(self, name: str, config: ModuleConfig) -> ModuleKey:
        """The key a module of `config` named `name` lives under."""
        check_name(name)
        return ModuleKey(name, config.sync.rank if config.sync is not None else 0)

    def get_or_create(self, key: ModuleKey, config: ModuleConfig) -> tuple[BatchNorm, bool]:
        """The module under `key`, created from `config` if absent; and whether it was created.

        An existing module with a different config is AlreadyExists.
        """
        config.validate()
        with self._lock:
            module = self._modules.get(key)
            if module is None:
                module = self._modules[key] = BatchNorm(config)
                return module, True
        if module.config != config:
            raise AlreadyExists(
                f"module {str(key)!r} exists as {module.config.describe()}; "
                f"asked for {config.describe()} (delete it first to change its config)"
            )
        return module, False

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
        if module is None:
            raise NotFound(f"no module named {str(key)[:300]!r}")
        return module

    def items(self) -> list[tuple[ModuleKey, BatchNorm]]:
        """A sorted snapshot of (key, module) pairs."""
        with self._lock:
            return sorted(self._modules.items(), key=lambda kv: kv[0])

    def restore(self, key: ModuleKey, module: BatchNorm) -> None:
        """Put a module loaded from disk under `key` (start-up only)."""
        with self._lock:
            self._modules[key] = module

    def __len__(self) -> int:
        return len(self._modules)
