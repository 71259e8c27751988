"""The server's domain facade: what each RPC does, in plain Python and numpy.

`bnserver.service` decodes a request, calls one method here and encodes the
result; nothing here sees protobuf or gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bnserver.calls import CallContext
from bnserver.config import Kind, ModuleConfig
from bnserver.coordinator import Coordinator
from bnserver.errors import InvalidArgument, NotFound, ServiceError
from bnserver.handles import BackwardStore
from bnserver.limits import Limits
from bnserver.modules import BatchNorm, Gradients, SavedForBackward
from bnserver.registry import ModuleKey, Registry
from bnserver.sync import Reducer, SyncBatchNorm


@dataclass(frozen=True)
class ModuleInfo:
    key: ModuleKey
    config: ModuleConfig
    training: bool


def _info(key: ModuleKey, module: BatchNorm) -> ModuleInfo:
    return ModuleInfo(key, module.config, module.training)


class Persistence(Protocol):
    """Told of every state change, after it happened (`bnserver.persistence.Persister`)."""

    def changed(self, key: ModuleKey, module: BatchNorm) -> None:
        """Created, state loaded, reset or mode changed: must be durable before replying."""

    def trained(self, key: ModuleKey, module: BatchNorm) -> None:
        """Running statistics updated by a training forward."""

    def deleted(self, key: ModuleKey) -> None: ...


class Volatile:
    """No persistence (the default for an Engine built in process)."""

    def changed(self, key: ModuleKey, module: BatchNorm) -> None:
        pass

    def trained(self, key: ModuleKey, module: BatchNorm) -> None:
        pass

    def deleted(self, key: ModuleKey) -> None:
        pass


class Engine:
    """Modules of one server plus the backward handles they hand out.

    reducer: where SyncBatchNorm modules merge statistics (default: an
        in-process coordinator, the single-machine setup).
    limits: size and count limits.
    persistence: told of every state change (default: none; set by the CLI).
    """

    def __init__(self, reducer: Reducer | None = None, limits: Limits | None = None) -> None:
        self.reducer: Reducer = reducer if reducer is not None else Coordinator()
        self.limits = limits if limits is not None else Limits()
        self.registry = Registry(self._build, self.limits.max_modules)
        self.handles = BackwardStore(
            self.limits.max_backward_handles, self.limits.max_backward_bytes
        )
        self.persistence: Persistence = Volatile()

    def _build(self, key: ModuleKey, config: ModuleConfig) -> BatchNorm:
        if config.kind is Kind.SYNC_BATCH_NORM:
            # Tenants' groups never meet: the namespace is part of the round's group.
            return SyncBatchNorm(config, key.name, self.reducer, namespace=key.tenant)
        return BatchNorm(config)

    def create(self, key: ModuleKey, config: ModuleConfig) -> ModuleInfo:
        """Get-or-create `key` with `config`."""
        self.limits.check_num_features(config.num_features)
        expected = self.registry.key_for(key.name, config, key.tenant)
        if expected != key:
            raise InvalidArgument(
                f"module rank {key.rank} does not match the config's rank {expected.rank}"
            )
        module, created = self.registry.get_or_create(key, config)
        if created:
            self.persistence.changed(key, module)
        return _info(key, module)

    def get(self, key: ModuleKey) -> ModuleInfo:
        return _info(key, self.registry.get(key))

    def list(self, tenant: str = "") -> list[ModuleInfo]:
        """The modules of `tenant`, sorted by name and rank."""
        return [_info(k, m) for k, m in self.registry.items(tenant)]

    def delete(self, key: ModuleKey) -> None:
        self.handles.drop_module(self.registry.delete(key))
        self.persistence.deleted(key)

    def forward(
        self,
        key: ModuleKey,
        x: np.ndarray,
        keep_for_backward: bool = False,
        call: CallContext | None = None,
        request_id: str = "",
    ) -> tuple[np.ndarray, str]:
        """Run the module on `x`; return the output and a backward handle ('' unless kept).

        `call` tells when the caller gives up (a sync module then withdraws).
        """
        module = self.registry.get(key)
        if keep_for_backward:
            try:
                self.handles.check_fits(SavedForBackward.size_for(x))
            except ServiceError as exc:
                module.abandon(backward=False, reason=str(exc))
                raise
        updates = module.updates
        y, saved = module.forward(x, keep_for_backward, call, request_id)
        if module.updates != updates:
            self.persistence.trained(key, module)
        handle = self.handles.put(saved) if saved is not None else ""
        return y, handle

    def backward(
        self,
        key: ModuleKey,
        handle: str,
        grad_out: np.ndarray,
        call: CallContext | None = None,
    ) -> Gradients:
        """Gradients for a kept forward; the handle is spent only if backward succeeds."""
        module = self.registry.get(key)
        try:
            saved = self.handles.take(handle, module)
        except ServiceError as exc:
            module.abandon(backward=True, reason=str(exc))
            raise
        try:
            return module.backward(saved, grad_out, call)
        except ServiceError:
            # A rejected backward (say, a malformed grad_output) must not cost the handle.
            self.handles.put_back(handle, saved)
            raise

    def abandon(self, key: ModuleKey, backward: bool, reason: str) -> None:
        """A call for `key` was refused before reaching the module: a sync module's peers
        must not wait for it (no-op for other modules and unknown keys)."""
        try:
            module = self.registry.get(key)
        except NotFound:
            return
        module.abandon(backward, reason)

    def set_training(self, key: ModuleKey, training: bool) -> ModuleInfo:
        module = self.registry.get(key)
        module.set_training(training)
        self.persistence.changed(key, module)
        return _info(key, module)

    def state(self, key: ModuleKey) -> dict[str, np.ndarray]:
        return self.registry.get(key).state_dict()

    def load_state(
        self, key: ModuleKey, state: Mapping[str, np.ndarray], strict: bool = True
    ) -> ModuleInfo:
        module = self.registry.get(key)
        module.load_state_dict(state, strict)
        self.persistence.changed(key, module)
        return _info(key, module)

    def reset_running_stats(self, key: ModuleKey) -> ModuleInfo:
        module = self.registry.get(key)
        module.reset_running_stats()
        self.persistence.changed(key, module)
        return _info(key, module)

    def reset_parameters(self, key: ModuleKey) -> ModuleInfo:
        module = self.registry.get(key)
        module.reset_parameters()
        self.persistence.changed(key, module)
        return _info(key, module)
