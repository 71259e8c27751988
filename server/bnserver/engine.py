"""The server's domain facade: what each RPC does, in plain Python and numpy.

`bnserver.rpc.batchnorm_service` decodes a request, calls one method here and encodes the
result; nothing here sees protobuf or gRPC.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bnserver.calls import CallContext
from bnserver.core.config import ModuleConfig
from bnserver.errors import InvalidArgument, ResourceExhausted, ServiceError
from bnserver.limits import Limits
from bnserver.state.backward_store import BackwardStore
from bnserver.state.batchnorm import (
    COUNT_KEY,
    DEDUP_WINDOW,
    STATE_KEYS,
    BatchNorm,
    CallParams,
    Gradients,
    Persist,
    Record,
    SavedForBackward,
)
from bnserver.state.registry import ModuleKey, Registry
from bnserver.sync.coordinator import Coordinator
from bnserver.sync.step import Reducer, Step, SyncStep
from bnserver.sync.ticket import Phase, Ticket

#: A staged change of a module's Record.
Change = Callable[[Record], Record]

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
    """Where changes become durable (`bnserver.state.persistence.Persister`).

    always: whether training forwards are written before they are acknowledged.
    """

    @property
    def always(self) -> bool: ...

    def write(self, key: ModuleKey, record: Record, module: BatchNorm | None = None) -> None:
        """Make `record` durable before it is published; raise Unavailable if it cannot be.
        With `module`, the write is skipped (NotFound) if `module` is no longer `key`'s."""

    def trained(self, key: ModuleKey, module: BatchNorm) -> None:
        """Running statistics updated by a training forward (written within the interval)."""

    def delete(self, key: ModuleKey, unpublish: Callable[[], None]) -> None:
        """Remove the module's file, then call `unpublish`; Unavailable if it cannot be."""


class Volatile:
    """No persistence (the default for an Engine built in process)."""

    always = False

    def write(self, key: ModuleKey, record: Record, module: BatchNorm | None = None) -> None:
        pass

    def trained(self, key: ModuleKey, module: BatchNorm) -> None:
        pass

    def delete(self, key: ModuleKey, unpublish: Callable[[], None]) -> None:
        unpublish()


class Engine:
    """Modules of one server plus the backward handles they hand out.

    reducer: where SyncBatchNorm modules merge statistics (default: an
        in-process coordinator, the single-machine setup).
    limits: size and count limits.
    persistence: told of every state change (default: none; set by the CLI).
    """

    def __init__(
        self,
        reducer: Reducer | None = None,
        limits: Limits | None = None,
        dedup_window: float = DEDUP_WINDOW,
    ) -> None:
        self.reducer: Reducer = reducer if reducer is not None else Coordinator()
        self.limits = limits if limits is not None else Limits()
        self.dedup_window = dedup_window
        self.registry = Registry(self.limits.max_modules, dedup_window)
        self.persistence: Persistence = Volatile()
        self._lock = threading.Lock()
        self._handles: dict[str, BackwardStore] = {}
        self._state_bytes: Counter[str] = Counter()

    def handles(self, tenant: str) -> BackwardStore:
        """The backward handles of `tenant`: each tenant's are bounded on their own, so
        one tenant's calls never evict another's."""
        with self._lock:
            store = self._handles.get(tenant)
            if store is None:
                store = self._handles[tenant] = BackwardStore(
                    self.limits.max_backward_handles, self.limits.max_backward_bytes
                )
            return store

    def backward_handles(self) -> int:
        """Backward contexts held, over all tenants."""
        with self._lock:
            stores = list(self._handles.values())
        return sum(len(s) for s in stores)

    def state_bytes(self, tenant: str | None = None) -> int:
        """Bytes of module state accounted to `tenant` (None: the whole server)."""
        with self._lock:
            if tenant is None:
                return sum(self._state_bytes.values())
            return self._state_bytes[tenant]

    def _reserve_state(self, key: ModuleKey, config: ModuleConfig) -> int:
        """Account a new module's state bytes, or raise ResourceExhausted naming the flag."""
        need = module_state_bytes(config)
        with self._lock:
            total = sum(self._state_bytes.values())
            if total + need > self.limits.max_state_bytes:
                raise ResourceExhausted(
                    f"a module of {config.num_features} channels needs {need} bytes of state; "
                    f"the server holds {total} of its {self.limits.max_state_bytes} "
                    f"(--max-state-bytes)"
                )
            mine = self._state_bytes[key.tenant]
            if mine + need > self.limits.max_tenant_state_bytes:
                raise ResourceExhausted(
                    f"a module of {config.num_features} channels needs {need} bytes of state; "
                    f"this tenant holds {mine} of its {self.limits.max_tenant_state_bytes} "
                    f"(--max-tenant-state-bytes)"
                )
            self._state_bytes[key.tenant] = mine + need
        return need

    def _release_state(self, key: ModuleKey, config: ModuleConfig) -> None:
        with self._lock:
            left = self._state_bytes[key.tenant] - module_state_bytes(config)
            if left > 0:
                self._state_bytes[key.tenant] = left
            else:
                del self._state_bytes[key.tenant]

    def account_restored(self) -> None:
        """Account the state bytes of the modules restored from disk (start-up)."""
        with self._lock:
            for key, module in self.registry.items():
                self._state_bytes[key.tenant] += module_state_bytes(module.config)

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
        """Get-or-create `key` with `config`: written, then published, then answered."""
        self.limits.check_num_features(config.num_features)
        expected = self.registry.key_for(key.name, config, key.tenant)
        if expected != key:
            raise InvalidArgument(
                f"module rank {key.rank} does not match the config's rank {expected.rank}"
            )
        config.validate()
        # One create or delete of a key at a time: a second creator waits until the
        # first's module is durable (or its write failed and it tries its own).
        with self.registry.creating(key):
            module = self.registry.existing(key, config)
            if module is not None:
                return _info(key, module)
            self.registry.check_room(key)
            self._reserve_state(key, config)
            try:
                module = BatchNorm(config, self.dedup_window)
                self.persistence.write(key, module.record())
            except BaseException:
                self._release_state(key, config)
                raise
            self.registry.publish(key, module)
        return _info(key, module)

    def get(self, key: ModuleKey) -> ModuleInfo:
        return _info(key, self.registry.get(key))

    def list(self, tenant: str = "") -> list[ModuleInfo]:
        """The modules of `tenant`, sorted by name and rank."""
        return [_info(k, m) for k, m in self.registry.items(tenant)]

    def delete(self, key: ModuleKey) -> None:
        """Remove the module's file, then the module: a delete that cannot be written
        leaves the module in memory and on disk (Unavailable)."""
        with self.registry.creating(key):
            module = self.registry.get(key)

            def unpublish() -> None:
                self.registry.delete(key)
                self._release_state(key, module.config)

            self.persistence.delete(key, unpublish)
        self.handles(key.tenant).drop_module(module)

    def forward(
        self,
        key: ModuleKey,
        x: np.ndarray,
        keep_for_backward: bool = False,
        request_id: str = "",
        step: Step | None = None,
        params: CallParams | None = None,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, str]:
        """Run the module on `x`; return the output and a backward handle ('' unless kept).

        `out`: where the output goes (x's shape and dtype; x itself unless kept for
        backward), else a new array.

        `step` is the one `self.step(key, Phase.FORWARD)` opened (None: open one here).
        `params`: the caller's weight, bias and mode for this forward, stored with it.
        A mode change is durable before the reply; parameters, like running
        statistics, reach the disk within the snapshot interval (before the reply
        with --durability=always).
        """
        if step is None:
            training = None if params is None else params.training
            with self.step(key, Phase.FORWARD, training=training) as own:
                return self.forward(key, x, keep_for_backward, request_id, own, params, out)
        if len(request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(
                f"request_id has {len(request_id)} characters; at most {MAX_REQUEST_ID} are allowed"
            )
        module = self.registry.get(key)
        handles = self.handles(key.tenant)
        if keep_for_backward:
            handles.check_fits(SavedForBackward.size_for(x))
        persist = self._persist(key, module) if self.persistence.always else None
        updates = module.updates
        y, saved = module.forward(
            x,
            keep_for_backward,
            request_id,
            step,
            persist,
            params,
            out,
            persist_mode=self._persist(key, module),
        )
        weights = params is not None and params.weight is not None
        if persist is None and (module.updates != updates or weights):
            self.persistence.trained(key, module)
        handle = handles.put(saved) if saved is not None else ""
        return y, handle

    def backward(
        self,
        key: ModuleKey,
        handle: str,
        grad_out: np.ndarray,
        step: Step | None = None,
        out: np.ndarray | None = None,
    ) -> Gradients:
        """Gradients for a kept forward; the handle is spent only if backward succeeds.

        `out`: where dx goes (grad_out's shape and dtype, may be grad_out itself).

        `step` is the one `self.step(key, Phase.BACKWARD)` opened (None: open one here).
        """
        if step is None:
            with self.step(key, Phase.BACKWARD) as own:
                return self.backward(key, handle, grad_out, own, out)
        module = self.registry.get(key)
        handles = self.handles(key.tenant)
        saved = handles.take(handle, module)
        try:
            return module.backward(saved, grad_out, step, out)
        except ServiceError:
            # A rejected backward (say, a malformed grad_output) must not cost the handle.
            handles.put_back(handle, saved)
            raise

    def _persist(self, key: ModuleKey, module: BatchNorm) -> Persist:
        return lambda record: self.persistence.write(key, record, module)

    def _commit(self, key: ModuleKey, change: Callable[[BatchNorm], Change]) -> ModuleInfo:
        """Stage a change of `key`'s module, write it, then publish it."""
        module = self.registry.get(key)
        module.commit(change(module), self._persist(key, module))
        return _info(key, module)

    def set_training(self, key: ModuleKey, training: bool) -> ModuleInfo:
        return self._commit(key, lambda m: m.mode_set(training))

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
        return self._commit(key, lambda m: m.loaded(state, strict))

    def reset_running_stats(self, key: ModuleKey) -> ModuleInfo:
        return self._commit(key, lambda m: m.running_stats_reset)

    def reset_parameters(self, key: ModuleKey) -> ModuleInfo:
        return self._commit(key, lambda m: m.parameters_reset)


def module_state_bytes(config: ModuleConfig) -> int:
    """Bytes a module's state is accounted for: its float32 (C,) entries, an allowance
    for its dedup window's bookkeeping, and a fixed overhead."""
    entries = 2 * int(config.affine) + 2 * int(config.track_running_stats)
    return 4 * config.num_features * entries + 4096
