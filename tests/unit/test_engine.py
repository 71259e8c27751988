"""The engine in process: per-module locking, idempotent forwards, persistence hooks."""

from __future__ import annotations

import threading

import numpy as np

from bnserver.config import Kind, ModuleConfig
from bnserver.engine import Engine
from bnserver.registry import ModuleKey

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
