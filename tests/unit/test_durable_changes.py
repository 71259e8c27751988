"""Changes reach the disk before they are published, also on the paths that are easy
to get wrong: state recovered from the journal, and a mode brought by a forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bnserver.core.config import Kind, ModuleConfig
from bnserver.engine import Engine
from bnserver.errors import Unavailable
from bnserver.state.batchnorm import CallParams
from bnserver.state.persistence import Persister, StateDir
from bnserver.state.registry import ModuleKey

C = 4
KEY = ModuleKey("bn")


def _engine(root: Path) -> tuple[Engine, Persister]:
    engine = Engine()
    state = StateDir(root, engine.registry)
    state.load()
    persister = Persister(state, interval=3600)
    engine.persistence = persister
    return engine, persister


def _x(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((8, C)) + 5).astype(np.float32)


def test_state_recovered_from_the_journal_survives_the_next_clean_stop(tmp_path: Path) -> None:
    engine, persister = _engine(tmp_path)
    engine.create(KEY, ModuleConfig(Kind.BATCH_NORM_1D, C))
    engine.forward(KEY, _x(), request_id="r1")
    trained = engine.state(KEY)["running_mean"]
    persister.snapshot()  # journaled, then a crash: no close()
    persister._stop.set()
    engine, persister = _engine(tmp_path)  # recovers it from the journal, and files it
    np.testing.assert_array_equal(engine.state(KEY)["running_mean"], trained)
    persister.close()  # a clean stop with nothing changed since
    engine, persister = _engine(tmp_path)
    np.testing.assert_array_equal(engine.state(KEY)["running_mean"], trained)
    # The request id came back with it: the retry is still applied once.
    engine.forward(KEY, _x(), request_id="r1")
    assert int(engine.state(KEY)["num_batches_tracked"]) == 1
    persister.close()


def test_a_mode_brought_by_a_forward_that_cannot_be_written_is_not_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, persister = _engine(tmp_path)
    engine.create(KEY, ModuleConfig(Kind.BATCH_NORM_1D, C))
    engine.set_training(KEY, False)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StateDir, "write", full)
    for _ in range(2):  # the retry fails the same way while the disk is full
        with pytest.raises(Unavailable):
            engine.forward(KEY, _x(), request_id="r1", params=CallParams(training=True))
        assert not engine.get(KEY).training
    monkeypatch.undo()
    engine.forward(KEY, _x(), request_id="r1", params=CallParams(training=True))
    assert engine.get(KEY).training
    persister._stop.set()
    engine, persister = _engine(tmp_path)  # written before it was answered
    assert engine.get(KEY).training
    persister.close()
