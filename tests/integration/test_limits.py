"""Size and count limits of `bnserver serve` and `bnserver coordinator`, as real processes.

Going over a limit is RESOURCE_EXHAUSTED (bnclient.ResourceExhaustedError) with a
message naming the limit's flag, and leaves every module as it was.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import bnclient
from bnclient import Client
from bnserver.cli.processes import ServerProcess, start_coordinator, start_server

C = 4
MAX_REQUEST_BYTES = 16384
MAX_TENSOR_ELEMENTS = 4096
MAX_NUM_FEATURES = 64
MAX_BACKWARD_BYTES = 4096
MAX_BACKWARD_HANDLES = 2
MAX_MODULES = 3
SYNC_TIMEOUT = 10.0
#: A waiting rank has joined its round well within this (the coordinator is local).
SETTLE = 0.5

#: Which way a tensor travels: as one message, or as a chunk stream.
TRANSPORTS = {"unary": 1 << 30, "stream": 256}

#: (shape, dtype) of inputs just over one limit and under every other.
OVER_REQUEST_BYTES = ((8, C, 8, 9), np.float64)  # 2304 elements, 18432 bytes
AT_REQUEST_BYTES = ((8, C, 8, 8), np.float64)  # 2048 elements, 16384 bytes: at the limit
OVER_TENSOR_ELEMENTS = ((4, C, 16, 20), np.float16)  # 5120 elements, 10240 bytes
OVER_BACKWARD_BYTES = ((4, C, 8, 10), np.float32)  # 1280 elements, 5120 bytes (+96 kept)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server with every per-call limit small; its embedded coordinator holds one round."""
    proc = start_server(
        tmp_path_factory.mktemp("state"),
        *("--max-request-bytes", str(MAX_REQUEST_BYTES)),
        *("--max-tensor-elements", str(MAX_TENSOR_ELEMENTS)),
        *("--max-num-features", str(MAX_NUM_FEATURES)),
        *("--max-backward-bytes", str(MAX_BACKWARD_BYTES)),
        *("--max-backward-handles", str(MAX_BACKWARD_HANDLES)),
        *("--max-rounds", "1"),
        *("--sync-timeout", str(SYNC_TIMEOUT)),
    )
    yield proc
    proc.kill()


def client_for(server: ServerProcess, transport: str = "unary", **kwargs: Any) -> Client:
    return Client(server.address, timeout=20, stream_threshold=TRANSPORTS[transport], **kwargs)


def data(shape: tuple[int, ...], dtype: Any = np.float32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    loc = np.linspace(-2.0, 3.0, shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2))
    return (rng.standard_normal(shape) + loc).astype(dtype)


def trained(client: Client, name: str) -> Any:
    """A module of C channels with running statistics away from their defaults."""
    bn = client.batch_norm_2d(name, C)
    bn(data((4, C, 3, 3), seed=1))
    return bn


def snapshot(bn: Any) -> tuple[dict[str, np.ndarray], bool]:
    return bn.state_dict(), bn.training


def assert_unchanged(bn: Any, before: tuple[dict[str, np.ndarray], bool]) -> None:
    state, training = before
    now = bn.state_dict()
    assert now.keys() == state.keys()
    for key in state:
        np.testing.assert_array_equal(now[key], state[key], err_msg=f"{key} changed")
    assert bn.training is training


def exhausted(flag: str, call: Any) -> bnclient.ServiceError:
    """`call` raises ResourceExhaustedError whose message names `flag`."""
    with pytest.raises(bnclient.ResourceExhaustedError) as info:
        call()
    err = info.value
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert flag in err.details, f"{flag!r} not named in {err.details!r}"
    return err


# -- per-call sizes ------------------------------------------------------------


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_max_request_bytes(server, transport) -> None:
    """A float64 input of 18432 bytes (2304 elements: under --max-tensor-elements)."""
    with client_for(server, transport) as c:
        bn = trained(c, f"limit.bytes.{transport}")
        before = snapshot(bn)
        shape, dtype = OVER_REQUEST_BYTES
        x = data(shape, dtype)
        exhausted("--max-request-bytes", lambda: bn(x))
        exhausted("--max-request-bytes", lambda: bn.vjp(x))
        assert_unchanged(bn, before)
        # Under the limit the same module trains.
        bn(data((2, C, 4, 4), np.float64))
        assert not np.array_equal(bn.running_mean, before[0]["running_mean"])


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_max_request_bytes_admits_a_tensor_at_the_limit(server, transport) -> None:
    """A tensor of exactly --max-request-bytes bytes is within the limit."""
    with client_for(server, transport) as c:
        bn = c.batch_norm_2d(f"limit.bytes.at.{transport}", C).eval()
        shape, dtype = AT_REQUEST_BYTES
        x = data(shape, dtype)
        assert x.nbytes == MAX_REQUEST_BYTES
        y = bn(x)
    assert y.shape == x.shape


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_max_tensor_elements(server, transport) -> None:
    """A float16 input of 5120 elements (10240 bytes: under --max-request-bytes)."""
    with client_for(server, transport) as c:
        bn = trained(c, f"limit.elements.{transport}")
        before = snapshot(bn)
        shape, dtype = OVER_TENSOR_ELEMENTS
        x = data(shape, dtype)
        exhausted("--max-tensor-elements", lambda: bn(x))
        assert_unchanged(bn, before)
        # The same limit applies to a gradient, which then leaves the handle usable.
        small = data((2, C, 2, 2), seed=3)
        _, vjp = bn.vjp(small)
        after_vjp = snapshot(bn)
        exhausted("--max-tensor-elements", lambda: vjp(np.ones(shape, dtype)))
        dx, _, _ = vjp(np.ones_like(small))
        assert dx.shape == small.shape
        assert_unchanged(bn, after_vjp)


@pytest.mark.parametrize("kind", ["1d", "2d", "sync"])
def test_max_num_features(server, kind) -> None:
    name = f"limit.features.{kind}"
    with client_for(server) as c:

        def make(num_features: int) -> Any:
            if kind == "1d":
                return c.batch_norm_1d(name, num_features)
            if kind == "2d":
                return c.batch_norm_2d(name, num_features)
            return c.sync_batch_norm(name, num_features, group="g", rank=0, world_size=2)

        before = {m.name for m in c.list_modules()}
        exhausted("--max-num-features", lambda: make(MAX_NUM_FEATURES + 1))
        assert {m.name for m in c.list_modules()} == before  # nothing was created
        assert make(MAX_NUM_FEATURES).num_features == MAX_NUM_FEATURES
        c.delete_module(name)


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_max_backward_bytes(server, transport) -> None:
    """A vjp whose kept input (5120 bytes + 96) is over --max-backward-bytes 4096."""
    with client_for(server, transport) as c:
        bn = trained(c, f"limit.backward.{transport}")
        before = snapshot(bn)
        shape, dtype = OVER_BACKWARD_BYTES
        x = data(shape, dtype)
        exhausted("--max-backward-bytes", lambda: bn.vjp(x))
        assert_unchanged(bn, before)  # the refused training forward did not update anything
        # The same input without keeping anything for backward is fine; so is a small vjp.
        bn(x)
        small = data((2, C, 3, 3), seed=5)
        _, vjp = bn.vjp(small)
        dx, dw, db = vjp(np.ones_like(small))
        assert dx.shape == small.shape and dw is not None and db is not None


def test_max_backward_handles_evicts_the_oldest_naming_the_flag(server) -> None:
    """Handles beyond --max-backward-handles evict the oldest (as designed, not
    RESOURCE_EXHAUSTED): its backward is NOT_FOUND naming the flag; newer ones work."""
    with client_for(server) as c:
        bn = c.batch_norm_2d("limit.handles", C)
        xs = [data((2, C, 2, 2), seed=10 + i) for i in range(MAX_BACKWARD_HANDLES + 1)]
        vjps = [bn.vjp(x)[1] for x in xs]
        with pytest.raises(bnclient.NotFoundError) as info:
            vjps[0](np.ones_like(xs[0]))
        assert "--max-backward-handles" in info.value.details
        for x, vjp in zip(xs[1:], vjps[1:], strict=True):
            assert vjp(np.ones_like(x))[0].shape == x.shape


# -- modules per tenant ----------------------------------------------------------


@pytest.fixture(scope="module")
def tenants_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("tenants")
    auth = root / "tokens"
    auth.write_text("alice alice-token-limits\nbob bob-token-limits\n")
    proc = start_server(root / "state", "--auth-file", str(auth), "--max-modules", str(MAX_MODULES))
    yield proc
    proc.kill()


def test_max_modules_per_tenant(tenants_server) -> None:
    alice = Client(tenants_server.address, token="alice-token-limits", timeout=20)
    bob = Client(tenants_server.address, token="bob-token-limits", timeout=20)
    with alice, bob:
        mods = [alice.batch_norm_2d(f"m{i}", C) for i in range(MAX_MODULES)]
        mods[0](data((4, C, 2, 2)))
        before = snapshot(mods[0])
        names = sorted(m.name for m in alice.list_modules())
        exhausted("--max-modules", lambda: alice.batch_norm_2d("one.too.many", C))
        exhausted(
            "--max-modules",
            lambda: alice.sync_batch_norm("sync.too.many", C, group="g", rank=0, world_size=2),
        )
        assert sorted(m.name for m in alice.list_modules()) == names
        assert_unchanged(mods[0], before)
        # Getting an existing module is not creating one.
        assert alice.batch_norm_2d("m0", C).num_features == C
        # The limit is per tenant: bob has his own MAX_MODULES, under the same names too.
        for i in range(MAX_MODULES):
            bob.batch_norm_1d(f"m{i}", C)
        exhausted("--max-modules", lambda: bob.batch_norm_1d("bob.too.many", C))
        # Deleting one makes room again.
        alice.delete_module("m2")
        alice.batch_norm_2d("one.too.many", C)
        assert len(alice.list_modules()) == MAX_MODULES


# -- sync rounds held by a coordinator ------------------------------------------


def _rank(address: str, name: str, rank: int, seed: int) -> np.ndarray:
    with Client(address, timeout=30) as c:
        bn = c.sync_batch_norm(name, C, group="rounds", rank=rank, world_size=2)
        out: np.ndarray = bn(data((2, C, 2, 2), seed=seed))
        return out


def _hold_rounds_then_overflow(address: str, held: int, prefix: str) -> None:
    """Rank 0 of `held` modules waits in its round; rank 0 of one more is refused
    naming --max-rounds; then the held rounds complete and the refused one syncs."""
    with ThreadPoolExecutor(2 * held + 2) as pool:
        waiting: list[Future[np.ndarray]] = [
            pool.submit(_rank, address, f"{prefix}.{i}", 0, i) for i in range(held)
        ]
        time.sleep(SETTLE)
        assert not any(f.done() for f in waiting), [f.exception() for f in waiting if f.done()]
        with Client(address, timeout=30) as c:
            extra = c.sync_batch_norm(f"{prefix}.extra", C, group="rounds", rank=0, world_size=2)
            before = snapshot(extra)
            start = time.monotonic()
            exhausted("--max-rounds", lambda: extra(data((2, C, 2, 2), seed=99)))
            assert time.monotonic() - start < SYNC_TIMEOUT / 2  # refused, not timed out
            assert_unchanged(extra, before)
        # The held rounds were real: their rank 1 completes them.
        partners = [pool.submit(_rank, address, f"{prefix}.{i}", 1, 50 + i) for i in range(held)]
        for f in [*waiting, *partners]:
            assert f.result(timeout=SYNC_TIMEOUT).shape == (2, C, 2, 2)
        # With the rounds done, the refused module syncs.
        pair = [pool.submit(_rank, address, f"{prefix}.extra", r, 70 + r) for r in (0, 1)]
        for f in pair:
            assert f.result(timeout=SYNC_TIMEOUT).shape == (2, C, 2, 2)


def test_max_rounds_of_the_embedded_coordinator(server) -> None:
    _hold_rounds_then_overflow(server.address, 1, "rounds.embedded")


def test_max_rounds_of_a_coordinator(tmp_path: Path) -> None:
    coordinator = start_coordinator("--max-rounds", "2", "--sync-timeout", str(SYNC_TIMEOUT))
    try:
        server = start_server(
            tmp_path / "state",
            *("--coordinator", coordinator.address, "--sync-timeout", str(SYNC_TIMEOUT)),
        )
        try:
            _hold_rounds_then_overflow(server.address, 2, "rounds.remote")
        finally:
            server.kill()
    finally:
        coordinator.kill()
