"""Per-tenant and server-wide bounds: one tenant's calls never evict another's backward
handles, module state is bounded, nothing is retained per deleted name, and every
accepted eps keeps outputs finite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bnclient import Client, InvalidArgumentError, ResourceExhaustedError
from bnserver.cli.processes import start_server
from bnserver.core.config import MIN_EPS, Kind, ModuleConfig
from bnserver.engine import Engine
from bnserver.limits import Limits
from bnserver.state.persistence import Persister, StateDir
from bnserver.state.registry import ModuleKey

C = 4
ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789"


def test_one_tenants_vjps_never_evict_anothers_handles(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {ALICE}\nbob {BOB}\n")
    x = np.random.default_rng(0).standard_normal((8, C)).astype(np.float32)
    with (
        start_server(tmp_path / "s", "--auth-file", str(tokens)) as server,
        Client(server.address, token=ALICE, timeout=10) as alice,
        Client(server.address, token=BOB, timeout=10) as bob,
    ):
        _, alices_vjp = alice.batch_norm_1d("a.bn", C).vjp(x)
        bobs = bob.batch_norm_1d("b.bn", C)
        for _ in range(200):  # over --max-backward-handles (64) many times
            bobs.vjp(x)
        dx, _, _ = alices_vjp(np.ones_like(x))
        assert dx.shape == x.shape


def test_module_state_is_bounded_server_wide_and_per_tenant(tmp_path: Path) -> None:
    flags = ("--max-state-bytes", str(8 << 20), "--max-tenant-state-bytes", str(3 << 20))
    with start_server(tmp_path / "s", *flags) as server, Client(server.address, timeout=10) as c:
        c.batch_norm_1d("first", 1 << 17)  # 2 MiB of state
        with pytest.raises(ResourceExhaustedError, match="--max-tenant-state-bytes"):
            c.batch_norm_1d("second", 1 << 17)
        c.delete_module("first")
        c.batch_norm_1d("second", 1 << 17)  # the deleted module's bytes were given back
    engine = Engine(limits=Limits(max_state_bytes=1 << 20))
    with pytest.raises(Exception, match="--max-state-bytes"):
        engine.create(ModuleKey("huge"), ModuleConfig(Kind.BATCH_NORM_1D, 1 << 17))


def test_nothing_is_retained_per_deleted_name(tmp_path: Path) -> None:
    engine = Engine()
    persister = Persister(StateDir(tmp_path, engine.registry), interval=60)
    engine.persistence = persister
    try:
        for i in range(500):
            key = ModuleKey(f"name-{i}", tenant=f"t{i % 7}")
            engine.create(key, ModuleConfig(Kind.BATCH_NORM_1D, C))
            engine.forward(key, np.ones((2, C), np.float32), request_id=f"r{i}")
            engine.delete(key)
        assert len(engine.registry) == 0
        assert len(engine.registry.creating) == 0
        assert len(persister.state.key_lock) == 0
        assert engine.state_bytes() == 0
        assert not list(tmp_path.glob("module-*.npz"))
        persister.snapshot()
        assert persister.snapshot_age() == 0.0
    finally:
        persister.close()


def test_every_accepted_eps_keeps_outputs_finite(tmp_path: Path) -> None:
    """Near-constant float32 channels (one ulp apart) at the smallest eps accepted."""
    x = np.full((64, C), 1.0, np.float32)
    x[::2] = np.nextafter(np.float32(1.0), np.float32(2.0))
    with start_server(tmp_path / "s") as server, Client(server.address, timeout=10) as c:
        with pytest.raises(InvalidArgumentError, match="eps"):
            c.batch_norm_1d("tiny", C, eps=5e-324)
        bn = c.batch_norm_1d("floor", C, eps=MIN_EPS)
        for dtype in (np.float16, np.float32, np.float64):
            y = bn(x.astype(dtype))
            assert np.isfinite(y).all(), dtype
        assert np.isfinite(bn.running_var).all()
