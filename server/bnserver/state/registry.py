"""The registry of named modules hosted by one server."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from bnserver.core.config import ModuleConfig
from bnserver.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from bnserver.state.batchnorm import BatchNorm

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


class Registry:
    """Named modules, keyed by ModuleKey. Thread-safe.

    max_modules: modules per tenant.
    """

    def __init__(self, max_modules: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._modules: dict[ModuleKey, BatchNorm] = {}
        self.max_modules = max_modules

    def key_for(self, name: str, config: ModuleConfig, tenant: str = "") -> ModuleKey:
        """The key a module of `config` named `name` lives under."""
        check_name(name)
        return ModuleKey(name, config.sync.rank if config.sync is not None else 0, tenant)

    def get_or_create(self, key: ModuleKey, config: ModuleConfig) -> tuple[BatchNorm, bool]:
        """The module under `key`, created from `config` if absent; and whether it was created.

        An existing module with a different config is AlreadyExists.
        """
        config.validate()
        with self._lock:
            module = self._modules.get(key)
            if module is None:
                if sum(1 for k in self._modules if k.tenant == key.tenant) >= self.max_modules:
                    raise ResourceExhausted(
                        f"a tenant may hold at most {self.max_modules} modules (--max-modules)"
                    )
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

    def restore(
        self,
        key: ModuleKey,
        config: ModuleConfig,
        state: Mapping[str, np.ndarray],
        training: bool,
        num_batches_tracked: int = 0,
    ) -> None:
        """Rebuild a module saved on disk under `key` (start-up only)."""
        module = BatchNorm(config)
        module.load_state_dict(state)
        module.set_training(training)
        module.num_batches_tracked = num_batches_tracked
        with self._lock:
            self._modules[key] = module

    def __len__(self) -> int:
        return len(self._modules)
