"""The engine in process: per-module locking, idempotent forwards, persistence hooks."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from bnserver.core.config import Kind, ModuleConfig
from bnserver.engine import Engine
from bnserver.state.registry import ModuleKey

C = 3


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, C)).astype(np.float32)


def test_different_modules_do_not_wait_for_each_other() -> None:
    engine = Engine()
    a, b = ModuleKey("a"), ModuleKey("b")
    for key in (a, b):
        engine.create(key, ModuleConfig(Kind.BATCH_NORM_1D, C))
    done = {"a": threading.Event(), "b": threading.Event()}

    def run(key: ModuleKey) -> None:
        engine.forward(key, _x())
        done[key.name].set()

    module_a = engine.registry.get(a)
    with module_a.lock:  # module a is busy
        threading.Thread(target=run, args=(a,), daemon=True).start()
        threading.Thread(target=run, args=(b,), daemon=True).start()
        assert done["b"].wait(10), "a forward on module b waited for module a's lock"
        assert not done["a"].is_set(), "module a's forward ran while its lock was held"
    assert done["a"].wait(10)


def test_a_sync_rank_failing_before_its_step_aborts_its_peers_at_once() -> None:
    """Rank 1's vjp is refused (over --max-backward-bytes) before it contributes: rank 0
    must hear ABORTED now, not wait out the round timeout."""
    import time

    from bnserver.core.config import SyncSpec
    from bnserver.errors import Aborted, ResourceExhausted
    from bnserver.limits import Limits
    from bnserver.sync.coordinator import Coordinator

    engine = Engine(Coordinator(timeout=10.0), Limits(max_backward_bytes=64))
    keys = [ModuleKey("s", rank) for rank in range(2)]
    for rank, key in enumerate(keys):
        engine.create(key, ModuleConfig(Kind.SYNC_BATCH_NORM, C, sync=SyncSpec("g", rank, 2)))
    outcome: list[BaseException] = []

    def rank0() -> None:
        try:
            engine.forward(keys[0], _x(0))
        except BaseException as exc:
            outcome.append(exc)

    waiting = threading.Thread(target=rank0)
    start = time.monotonic()
    waiting.start()
    time.sleep(0.2)
    with pytest.raises(ResourceExhausted):
        engine.forward(keys[1], _x(1), keep_for_backward=True)
    waiting.join(5)
    assert outcome and isinstance(outcome[0], Aborted), outcome
    assert time.monotonic() - start < 3


def test_put_back_respects_the_limits_and_deleted_modules() -> None:
    from bnserver.state.backward_store import BackwardStore

    engine = Engine()
    key = ModuleKey("h")
    engine.create(key, ModuleConfig(Kind.BATCH_NORM_1D, C))
    module = engine.registry.get(key)
    store = BackwardStore(max_handles=1)
    _, first = module.forward(_x(), keep_for_backward=True)
    _, second = module.forward(_x(), keep_for_backward=True)
    assert first is not None and second is not None
    h1 = store.put(first)
    taken = store.take(h1, module)
    store.put(second)
    store.put_back(h1, taken)
    assert len(store) == 1  # putting back evicted the other one rather than exceed the limit
    store.drop_module(module)
    store.put_back(h1, taken)
    assert len(store) == 0  # a deleted module's context does not come back
