"""The server's domain facade: what each RPC does, in plain Python and numpy.

`bnserver.rpc.batchnorm_service` decodes a request, calls one method here and encodes the
result; nothing here sees protobuf or gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bnserver.calls import CallContext
from bnserver.core.config import ModuleConfig
from bnserver.errors import InvalidArgument, ServiceError
from bnserver.limits import Limits
from bnserver.state.backward_store import BackwardStore
from bnserver.state.batchnorm import (
    COUNT_KEY,
    STATE_KEYS,
    BatchNorm,
    CallParams,
    Gradients,
    SavedForBackward,
)
from bnserver.state.registry import ModuleKey, Registry
from bnserver.sync.coordinator import Coordinator
from bnserver.sync.step import Reducer, Step, SyncStep
from bnserver.sync.ticket import Phase, Ticket

#: Longest request id accepted, in characters (a uuid4 hex is 32).
MAX_REQUEST_ID = 128


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
        self.registry = Registry(max_modules=self.limits.max_modules)
        self.handles = BackwardStore(
            self.limits.max_backward_handles, self.limits.max_backward_bytes
        )
        self.persistence: Persistence = Volatile()

    def step(
        self,
        key: ModuleKey,
        phase: Phase,
        call: CallContext | None = None,
        training: bool | None = None,
    ) -> Step:
        """The step a forward or backward of `key` runs in (NotFound for an unknown key).

        Use it as a context manager around everything the call does after it
        knows its module, decoding included. `training`: the mode a forward
        brings with it (None: the module's).
        """
        module = self.registry.get(key)
        sync = module.config.sync
        if sync is None:
            return Step(call)
        ticket = Ticket(
            key.tenant,
            sync.group,
            key.name,
            phase,
            sync.rank,
            sync.world_size,
            module.config.group_signature(),
        )
        return SyncStep(
            ticket,
            self.reducer,
            call,
            module.step_locks[phase],
            lambda: module.uses_batch_stats(training),
        )

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
        request_id: str = "",
        step: Step | None = None,
        params: CallParams | None = None,
    ) -> tuple[np.ndarray, str]:
        """Run the module on `x`; return the output and a backward handle ('' unless kept).

        `step` is the one `self.step(key, Phase.FORWARD)` opened (None: open one here).
        `params`: the caller's weight, bias and mode for this forward, stored with it.
        A mode change is durable before the reply; parameters, like running
        statistics, reach the disk with the next snapshot.
        """
        if step is None:
            training = None if params is None else params.training
            with self.step(key, Phase.FORWARD, training=training) as own:
                return self.forward(key, x, keep_for_backward, request_id, own, params)
        if len(request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(
                f"request_id has {len(request_id)} characters; at most {MAX_REQUEST_ID} are allowed"
            )
        module = self.registry.get(key)
        if keep_for_backward:
            self.handles.check_fits(SavedForBackward.size_for(x))
        updates, training = module.updates, module.training
        y, saved = module.forward(x, keep_for_backward, request_id, step, params)
        if params is not None and params.training not in (None, training):
            self.persistence.changed(key, module)
        elif module.updates != updates or (params is not None and params.weight is not None):
            self.persistence.trained(key, module)
        handle = self.handles.put(saved) if saved is not None else ""
        return y, handle

    def backward(
        self, key: ModuleKey, handle: str, grad_out: np.ndarray, step: Step | None = None
    ) -> Gradients:
        """Gradients for a kept forward; the handle is spent only if backward succeeds.

        `step` is the one `self.step(key, Phase.BACKWARD)` opened (None: open one here).
        """
        if step is None:
            with self.step(key, Phase.BACKWARD) as own:
                return self.backward(key, handle, grad_out, own)
        module = self.registry.get(key)
        saved = self.handles.take(handle, module)
        try:
            return module.backward(saved, grad_out, step)
        except ServiceError:
            # A rejected backward (say, a malformed grad_output) must not cost the handle.
            self.handles.put_back(handle, saved)
            raise

    def set_training(self, key: ModuleKey, training: bool) -> ModuleInfo:
        module = self.registry.get(key)
        module.set_training(training)
        self.persistence.changed(key, module)
        return _info(key, module)

    def state(self, key: ModuleKey, entries: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """The module's state entries (all, or those named in `entries`), with
        `num_batches_tracked` as an int64 0-d array when it tracks running statistics."""
        module = self.registry.get(key)
        unknown = sorted(set(entries) - {*STATE_KEYS, COUNT_KEY})
        if unknown:
            raise InvalidArgument(
                f"unknown state entries {unknown}; entries are {[*STATE_KEYS, COUNT_KEY]}"
            )
        _, batches, state = module.snapshot()  # read together, under the module's lock
        if module.config.track_running_stats:
            state[COUNT_KEY] = np.array(batches, np.int64)
        return {k: v for k, v in state.items() if not entries or k in entries}

    def running_stats(self, key: ModuleKey) -> dict[str, np.ndarray]:
        """running_mean, running_var and num_batches_tracked (none without tracking)."""
        return self.registry.get(key).running_stats()

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
