"""Authentication and tenants (`--auth-file`), against real `bnserver` processes.

Without a valid bearer token every call but health is UNAUTHENTICATED; each
tenant has its own module namespace (another tenant's module is NOT_FOUND and
never listed) and its own sync groups; tokens never reach the log; the
coordinator service takes peer tokens only (a tenant's token is
PERMISSION_DENIED), and a server reaches a coordinator with its peer token.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import bnclient
from bnclient import Client
from bnserver.cli.processes import ServerProcess, start_coordinator, start_server
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

C = 3
#: Fresh tokens per run, so a hit in the log can only come from this run's calls.
ALICE = "alice-" + secrets.token_hex(16)
BOB = "bob-" + secrets.token_hex(16)
WRONG = "wrong-" + secrets.token_hex(16)
PEER = "peer-" + secrets.token_hex(16)
TOKENS = {"alice": ALICE, "bob": BOB}
TOKEN_ENV = "BNSERVER_COORDINATOR_TOKEN"

BN_SERVICE = pb.DESCRIPTOR.services_by_name["BatchNormService"]
COORD_SERVICE = pb.DESCRIPTOR.services_by_name["CoordinatorService"]
#: (service, method) of every RPC of both services.
ALL_RPCS = [(s, m) for s in (BN_SERVICE, COORD_SERVICE) for m in s.methods]
RPC_IDS = [f"{s.name}.{m.name}" for s, m in ALL_RPCS]

#: Metadata of a call without a valid token: none, a wrong one, a malformed header.
BAD_CREDENTIALS = {
    "no-token": (),
    "wrong-token": (("authorization", f"Bearer {WRONG}"),),
    "not-bearer": (("authorization", ALICE),),
    "empty-bearer": (("authorization", "Bearer "),),
}


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def write_auth_file(path: Path) -> Path:
    lines = ["# tenants of the auth tests", "", *(f"{t} {tok}" for t, tok in TOKENS.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def debug_server(state_dir: Path, auth_file: Path, *extra: str) -> ServerProcess:
    """`bnserver --log-level DEBUG serve --auth-file ...`: the most the server ever logs."""
    return ServerProcess(
        [
            *("--log-level", "DEBUG", "serve", "--port", "0"),
            *("--state-dir", str(state_dir), "--auth-file", str(auth_file)),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_auth_file(tmp_path_factory.mktemp("auth") / "tokens")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, auth_file: Path) -> Iterator[ServerProcess]:
    """A server with two tenants; its embedded coordinator serves CoordinatorService too."""
    proc = debug_server(tmp_path_factory.mktemp("state"), auth_file, "--sync-timeout", "1")
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def peer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("peers") / "peer-tokens"
    path.write_text(f"# servers allowed on the coordinator\n{PEER}\n")
    return path


@pytest.fixture(scope="module")
def coordinator(peer_file: Path) -> Iterator[ServerProcess]:
    proc = start_coordinator("--peer-token-file", str(peer_file), "--sync-timeout", "5")
    yield proc
    proc.kill()


@pytest.fixture
def alice(server: ServerProcess) -> Iterator[Client]:
    with Client(server.address, token=ALICE, timeout=20) as c:
        yield c


@pytest.fixture
def bob(server: ServerProcess) -> Iterator[Client]:
    with Client(server.address, token=BOB, timeout=20) as c:
        yield c


def batch(seed: int, n: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    loc = np.linspace(-2.0, 3.0, C).reshape(1, C, 1, 1)
    return (rng.standard_normal((n, C, 2, 3)) * 1.5 + loc).astype(np.float32)


def tensor_pb(x: np.ndarray) -> pb.Tensor:
    t = pb.Tensor()
    wire.encode(x, t)
    return t


# -- calling every RPC with raw stubs ------------------------------------------


def _requests(ref: pb.ModuleRef | None) -> dict[str, Any]:
    """A request for every RPC; with `ref`, ones that would act on that module if let in."""
    if ref is None:
        return {}
    x = tensor_pb(batch(0))
    config = pb.ModuleConfig(
        kind=pb.MODULE_KIND_BATCH_NORM_2D,
        num_features=C,
        eps=1e-5,
        momentum=0.9,
        affine=True,
        track_running_stats=True,
    )
    ticket = pb.Ticket(
        group="g", module=ref.name, phase=pb.PHASE_FORWARD, rank=0, world_size=2, signature="s"
    )
    return {
        "CreateModule": pb.CreateModuleRequest(ref=ref, config=config),
        "GetModule": pb.GetModuleRequest(ref=ref),
        "DeleteModule": pb.DeleteModuleRequest(ref=ref),
        "Forward": pb.ForwardRequest(ref=ref, input=x, request_id="r1"),
        "Session": pb.SessionRequest(forward=pb.ForwardRequest(ref=ref, input=x, request_id="r2")),
        "Backward": pb.BackwardRequest(ref=ref, backward_handle="h", grad_output=x),
        "StreamForward": pb.ForwardChunk(
            header=pb.ForwardRequest(ref=ref, input=pb.Tensor(dtype="float32", shape=[0, C]))
        ),
        "StreamBackward": pb.BackwardChunk(
            header=pb.BackwardRequest(
                ref=ref, backward_handle="h", grad_output=pb.Tensor(dtype="float32", shape=[0, C])
            )
        ),
        "SetTraining": pb.SetTrainingRequest(ref=ref, training=False),
        "LoadState": pb.LoadStateRequest(
            ref=ref, strict=False, state=pb.ModuleState(running_mean=tensor_pb(np.full(C, 7.0)))
        ),
        "ResetRunningStats": pb.ResetRequest(ref=ref),
        "ResetParameters": pb.ResetRequest(ref=ref),
        "GetState": pb.GetStateRequest(ref=ref),
        "Abort": pb.AbortRequest(ticket=ticket, reason="test"),
    }


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def call_rpc(
    channel: grpc.Channel,
    service: Any,
    method: Any,
    metadata: tuple[tuple[str, str], ...],
    ref: pb.ModuleRef | None = None,
) -> tuple[grpc.StatusCode, str]:
    """Call one RPC through its generated stub; (status code, details)."""
    stub_class = getattr(pb_grpc, f"{service.name}Stub")
    stub = getattr(stub_class(channel), method.name)
    request = _requests(ref).get(method.name)
    if request is None:
        request = getattr(pb, method.input_type.name)()
    try:
        if method.client_streaming:
            for reply in stub(iter([request]), metadata=metadata, timeout=10):
                if isinstance(reply, pb.SessionReply) and reply.code:
                    # A Session message's own status, as its unary call would end.
                    return grpc.StatusCode[_CODE_NAMES[reply.code]], reply.message
        else:
            stub(request, metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        assert isinstance(err, grpc.Call)
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def call_reflection(
    channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]
) -> tuple[grpc.StatusCode, list[str]]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        replies = list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10))
    except grpc.RpcError as err:
        assert isinstance(err, grpc.Call)
        return err.code(), []
    names = [s.name for r in replies for s in r.list_services_response.service]
    return grpc.StatusCode.OK, names


def health_status(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), metadata=metadata, timeout=10
    )
    status: int = reply.status
    return status


@pytest.fixture(scope="module")
def alices_module(server: ServerProcess) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """A trained module of alice's, and its state (which no test may change)."""
    with Client(server.address, token=ALICE, timeout=20) as c:
        bn = c.batch_norm_2d("alice.secret", C)
        bn(batch(1))
        bn(batch(2))
        yield bn.name, bn.state_dict()


def assert_state(client: Client, name: str, expected: dict[str, np.ndarray]) -> None:
    state = client.batch_norm_2d(name, C).state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)


# -- without a valid token: UNAUTHENTICATED, except health ---------------------


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS), ids=list(BAD_CREDENTIALS))
@pytest.mark.parametrize(("service", "method"), ALL_RPCS, ids=RPC_IDS)
def test_every_rpc_needs_a_valid_token(
    server, alices_module, alice, service, method, credentials
) -> None:
    """Each RPC, even one naming an existing module, is refused and changes nothing."""
    name, state = alices_module
    with grpc.insecure_channel(server.address) as channel:
        code, details = call_rpc(
            channel, service, method, BAD_CREDENTIALS[credentials], pb.ModuleRef(name=name)
        )
    assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
    assert name in [m.name for m in alice.list_modules()]
    assert_state(alice, name, state)
    assert alice.batch_norm_2d(name, C).training


@pytest.mark.parametrize(("service", "method"), ALL_RPCS, ids=RPC_IDS)
def test_every_rpc_passes_auth_with_a_valid_token(server, service, method) -> None:
    """The control: with a tenant's token the same stubs reach the service (empty requests
    are then INVALID_ARGUMENT or NOT_FOUND, ListModules and Describe OK; never
    UNAUTHENTICATED); the coordinator service is for peers, so a tenant's token there is
    PERMISSION_DENIED."""
    with grpc.insecure_channel(server.address) as channel:
        code, details = call_rpc(channel, service, method, bearer(BOB))
    if service is COORD_SERVICE:
        assert code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
        return
    ok = ("ListModules", "Describe")
    expected = grpc.StatusCode.OK if method.name in ok else None
    reached = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert code == expected or code in reached, (code, details)


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS), ids=list(BAD_CREDENTIALS))
def test_reflection_needs_a_valid_token(server, credentials) -> None:
    with grpc.insecure_channel(server.address) as channel:
        code, names = call_reflection(channel, BAD_CREDENTIALS[credentials])
        assert code == grpc.StatusCode.UNAUTHENTICATED, names
        # Control: with a token, reflection lists the services.
        code, names = call_reflection(channel, bearer(ALICE))
    assert code == grpc.StatusCode.OK
    assert {BN_SERVICE.full_name, COORD_SERVICE.full_name} <= set(names)


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS), ids=list(BAD_CREDENTIALS))
def test_health_needs_no_token(server, coordinator, credentials) -> None:
    for proc in (server, coordinator):
        with grpc.insecure_channel(proc.address) as channel:
            status = health_status(channel, BAD_CREDENTIALS[credentials])
        assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("token", [None, WRONG], ids=["no-token", "wrong-token"])
def test_sdk_raises_unauthenticated_error(server, alices_module, token) -> None:
    name, _ = alices_module
    with Client(server.address, token=token, timeout=10) as c:
        calls: list[Callable[[], object]] = [
            c.list_modules,
            lambda: c.batch_norm_2d(name, C),
            lambda: c.batch_norm_2d("new.by.nobody", C),
            lambda: c.delete_module(name),
        ]
        for call in calls:
            with pytest.raises(bnclient.UnauthenticatedError) as info:
                call()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert isinstance(info.value, bnclient.ServiceError)
    with Client(server.address, token=ALICE, timeout=10) as c:
        assert "new.by.nobody" not in [m.name for m in c.list_modules()]


# -- tenants -------------------------------------------------------------------


def test_other_tenants_module_is_not_found(server, alices_module, alice, bob) -> None:
    """Every RPC naming alice's module, made by bob, is NOT_FOUND (create aside) and
    leaves alice's module as it was."""
    name, state = alices_module
    ref = pb.ModuleRef(name=name)
    # Create makes bob's own module; Abort and Describe name no module.
    skip = {"CreateModule", "Abort", "Describe"}
    with grpc.insecure_channel(server.address) as channel:
        for service, method in ALL_RPCS:
            if service is not BN_SERVICE or method.name in skip or method.name == "ListModules":
                continue
            code, details = call_rpc(channel, service, method, bearer(BOB), ref)
            assert code == grpc.StatusCode.NOT_FOUND, (method.name, code, details)
    assert_state(alice, name, state)
    assert name in [m.name for m in alice.list_modules()]
    assert alice.batch_norm_2d(name, C).training


def test_sdk_calls_on_other_tenants_module_are_not_found(server, alices_module, alice) -> None:
    """Through the SDK: a raw ModuleRef forward, get, state and delete by bob."""
    name, state = alices_module
    with Client(server.address, token=BOB, timeout=20) as c:
        with pytest.raises(bnclient.NotFoundError) as info:
            c._call("GetModule", pb.GetModuleRequest(ref=pb.ModuleRef(name=name)))
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        request = pb.ForwardRequest(ref=pb.ModuleRef(name=name), input=tensor_pb(batch(3)))
        with pytest.raises(bnclient.NotFoundError):
            c._call("Forward", request)
        with pytest.raises(bnclient.NotFoundError):
            c._call("GetState", pb.GetStateRequest(ref=pb.ModuleRef(name=name)))
        with pytest.raises(bnclient.NotFoundError):
            c.delete_module(name)
        assert name not in [m.name for m in c.list_modules()]
    assert_state(alice, name, state)


def test_same_name_in_two_tenants_is_two_modules(server, alice, bob) -> None:
    """get-or-create by bob of a name alice uses creates bob's own, separate module."""
    name = "shared.name"
    a = alice.batch_norm_2d(name, C)
    a(batch(10))
    a_state = a.state_dict()
    # A config alice's module does not have: no ALREADY_EXISTS, since it is not alice's.
    b = bob.batch_norm_2d(name, C + 2, momentum=0.5)
    assert b.num_features == C + 2
    b_state = b.state_dict()
    np.testing.assert_array_equal(b_state["running_mean"], np.zeros((1, C + 2, 1, 1)))
    np.testing.assert_array_equal(b_state["running_var"], np.ones((1, C + 2, 1, 1)))
    # Training bob's module leaves alice's alone, and the other way round.
    rng = np.random.default_rng(11)
    b(rng.standard_normal((4, C + 2, 2, 2)).astype(np.float32) + 5.0)
    assert_state(alice, name, a_state)
    b_trained = b.state_dict()
    assert not np.array_equal(b_trained["running_mean"], b_state["running_mean"])
    a(batch(12))
    b_again = bob.batch_norm_2d(name, C + 2, momentum=0.5).state_dict()
    np.testing.assert_array_equal(b_again["running_mean"], b_trained["running_mean"])
    # Each tenant lists its own module under that name, with its own config.
    [a_info] = [m for m in alice.list_modules() if m.name == name]
    [b_info] = [m for m in bob.list_modules() if m.name == name]
    assert (a_info.num_features, b_info.num_features) == (C, C + 2)
    # Deleting bob's leaves alice's.
    bob.delete_module(name)
    assert name not in [m.name for m in bob.list_modules()]
    assert alice.batch_norm_2d(name, C).state_dict()["running_mean"].shape == (1, C, 1, 1)
    alice.delete_module(name)


def test_list_never_shows_other_tenants_names(server, alices_module, alice, bob) -> None:
    for i in range(3):
        alice.batch_norm_1d(f"alice.only.{i}", C)
    bob.batch_norm_1d("bob.only", C)
    alice_names = {m.name for m in alice.list_modules()}
    bob_names = {m.name for m in bob.list_modules()}
    assert {"alice.only.0", "alice.only.1", "alice.only.2", alices_module[0]} <= alice_names
    assert "bob.only" in bob_names
    assert not alice_names & bob_names, alice_names & bob_names
    for i in range(3):
        alice.delete_module(f"alice.only.{i}")
    bob.delete_module("bob.only")


def _sync_step(address: str, token: str, rank: int, name: str, x: np.ndarray) -> Any:
    with Client(address, token=token, timeout=20) as c:
        bn = c.sync_batch_norm(name, C, group="g", rank=rank, world_size=2)
        try:
            return bn(x)
        except bnclient.ServiceError as exc:
            return exc


def test_sync_groups_of_two_tenants_never_meet(server) -> None:
    """alice's rank 0 and bob's rank 1 of the same group and name: no group forms
    (both time out after --sync-timeout 1); each tenant's own two ranks do form one."""
    name = "sync.same.name"
    x0, x1 = batch(20), batch(21)
    with ThreadPoolExecutor(2) as pool:
        start = time.monotonic()
        f0 = pool.submit(_sync_step, server.address, ALICE, 0, name, x0)
        f1 = pool.submit(_sync_step, server.address, BOB, 1, name, x1)
        r0, r1 = f0.result(), f1.result()
        elapsed = time.monotonic() - start
    for r in (r0, r1):
        assert isinstance(r, bnclient.DeadlineExceededError), r
    assert elapsed < 10, elapsed
    # No statistics moved.
    for token, rank in ((ALICE, 0), (BOB, 1)):
        with Client(server.address, token=token, timeout=20) as c:
            state = c.sync_batch_norm(name, C, group="g", rank=rank, world_size=2).state_dict()
            np.testing.assert_array_equal(state["running_mean"], np.zeros((1, C, 1, 1)))
    # Control: each tenant's own ranks 0 and 1 (same group, same name) sync fine.
    for token in (ALICE, BOB):
        with ThreadPoolExecutor(2) as pool:
            f0 = pool.submit(_sync_step, server.address, token, 0, name, x0)
            f1 = pool.submit(_sync_step, server.address, token, 1, name, x1)
            y0, y1 = f0.result(), f1.result()
        assert isinstance(y0, np.ndarray), y0
        assert isinstance(y1, np.ndarray), y1
        y = np.concatenate([y0, y1]).astype(np.float64)
        np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
        np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1.0, rtol=1e-3)


# -- tokens never logged -----------------------------------------------------


def test_tokens_never_logged(tmp_path: Path, auth_file: Path) -> None:
    """A server's whole log (DEBUG) after good, failed and erroneous calls holds no token."""
    proc = debug_server(tmp_path / "state", auth_file)
    try:
        with grpc.insecure_channel(proc.address) as channel:
            for metadata in (*BAD_CREDENTIALS.values(), bearer(ALICE)):
                for service, method in ALL_RPCS:
                    call_rpc(channel, service, method, metadata, pb.ModuleRef(name="m"))
                call_reflection(channel, metadata)
        for token in (None, WRONG, ALICE, BOB):
            with Client(proc.address, token=token, timeout=10) as c:
                try:
                    c.batch_norm_2d("logged.module", C)(batch(30))
                    c.batch_norm_2d("logged.module", C + 1)  # ALREADY_EXISTS
                except bnclient.ServiceError:
                    pass
    finally:
        code = proc.terminate()
    log = proc.stderr
    assert code == 0, log
    assert "saved" in log  # the log was captured to its end
    for token in (ALICE, BOB, WRONG):
        assert token not in log
        assert token[-16:] not in log  # nor a part of it


def test_bad_auth_file_line_is_not_echoed(tmp_path: Path) -> None:
    """A malformed line may hold a token: start-up fails naming the line, not its text."""
    secret = "leak-" + secrets.token_hex(16)
    bad = tmp_path / "tokens"
    bad.write_text(f"alice {ALICE}\nbob {secret} extra\n")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "bnserver.cli", "serve", "--port", "0"),
            *("--state-dir", str(tmp_path / "s"), "--auth-file", str(bad)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{bad}:2" in output
    assert secret not in output
    assert ALICE not in output


# -- a coordinator with a peer token file -----------------------------------------


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS), ids=list(BAD_CREDENTIALS))
def test_coordinator_rpcs_need_a_valid_peer_token(coordinator, credentials) -> None:
    with grpc.insecure_channel(coordinator.address) as channel:
        for service, method in ALL_RPCS:
            if service is not COORD_SERVICE:
                continue
            ref = pb.ModuleRef(name="m")
            code, details = call_rpc(channel, service, method, BAD_CREDENTIALS[credentials], ref)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method.name, code, details)
            # Control: with the peer token the call gets past auth (an empty part is
            # INVALID_ARGUMENT; on the Rounds stream that status travels in its RoundEnd).
            code, details = call_rpc(channel, service, method, bearer(PEER))
            expected = (
                grpc.StatusCode.OK if method.name == "Rounds" else grpc.StatusCode.INVALID_ARGUMENT
            )
            assert code == expected, (method.name, code, details)


def test_tenants_cannot_touch_rounds_on_the_embedded_coordinator(server, alice) -> None:
    """bob, with his own valid token, calls Abort and Reduce on alice's round in a loop
    while alice trains a 2-rank SyncBatchNorm: every call is PERMISSION_DENIED, and
    every one of alice's steps succeeds."""
    name = "alice.sync"
    ranks = [alice.sync_batch_norm(name, C, group="g", rank=r, world_size=2) for r in range(2)]
    ticket = pb.Ticket(
        tenant="alice", group="g", module=name, phase=pb.PHASE_FORWARD, rank=1, world_size=2
    )
    ticket.signature = "SyncBatchNorm"
    stop = time.monotonic() + 2.0
    denied: list[grpc.StatusCode] = []

    def bob_attacks() -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.CoordinatorServiceStub(channel)
            while time.monotonic() < stop:
                for call in (
                    lambda: stub.Abort(
                        pb.AbortRequest(ticket=ticket, reason="bob"), metadata=bearer(BOB)
                    ),
                    lambda: stub.Reduce(pb.ReduceRequest(ticket=ticket), metadata=bearer(BOB)),
                ):
                    try:
                        call()
                        denied.append(grpc.StatusCode.OK)
                    except grpc.RpcError as err:
                        denied.append(err.code())  # type: ignore[attr-defined]

    steps = 0
    with ThreadPoolExecutor(3) as pool:
        attack = pool.submit(bob_attacks)
        while time.monotonic() < stop:
            x = batch(steps)
            futures = [pool.submit(ranks[r], x[r * 2 : r * 2 + 2]) for r in range(2)]
            for f in futures:
                f.result(timeout=10)  # raises if bob got through
            steps += 1
        attack.result()
    assert steps > 5 and denied
    assert set(denied) == {grpc.StatusCode.PERMISSION_DENIED}


def _start_server_with_token(
    monkeypatch: pytest.MonkeyPatch, state_dir: Path, coordinator: ServerProcess, token: str | None
) -> ServerProcess:
    with monkeypatch.context() as env:
        if token is None:
            env.delenv(TOKEN_ENV, raising=False)
        else:
            env.setenv(TOKEN_ENV, token)
        return start_server(state_dir, "--coordinator", coordinator.address, "--sync-timeout", "5")


def _two_ranks(addresses: list[str], name: str) -> tuple[Any, Any, float]:
    x0, x1 = batch(40), batch(41)

    def step(address: str, rank: int, x: np.ndarray) -> Any:
        with Client(address, timeout=30) as c:
            bn = c.sync_batch_norm(name, C, group="coord", rank=rank, world_size=2)
            try:
                return bn(x)
            except bnclient.ServiceError as exc:
                return exc

    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        f0 = pool.submit(step, addresses[0], 0, x0)
        f1 = pool.submit(step, addresses[1 % len(addresses)], 1, x1)
        return f0.result(), f1.result(), time.monotonic() - start


def test_server_with_coordinator_token_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coordinator: ServerProcess
) -> None:
    servers = [
        _start_server_with_token(monkeypatch, tmp_path / f"s{i}", coordinator, PEER)
        for i in range(2)
    ]
    assert TOKEN_ENV not in os.environ or os.environ[TOKEN_ENV] != PEER
    try:
        y0, y1, _ = _two_ranks([s.address for s in servers], "coord.ok")
    finally:
        for s in servers:
            s.kill()
    assert isinstance(y0, np.ndarray), y0
    assert isinstance(y1, np.ndarray), y1
    x = np.concatenate([batch(40), batch(41)]).astype(np.float64)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    expected = (x - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(np.concatenate([y0, y1]), expected, rtol=1e-4, atol=1e-4)
    for s in servers:
        assert PEER not in s.stderr
    assert PEER not in coordinator.stderr


@pytest.mark.parametrize("token", [WRONG, None], ids=["wrong-token", "no-token"])
def test_server_without_valid_coordinator_token_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coordinator: ServerProcess, token
) -> None:
    """The ranks fail at once (they do not wait out the 5 s round timeout), say why,
    and their statistics stay as they were."""
    server = _start_server_with_token(monkeypatch, tmp_path / "s", coordinator, token)
    try:
        r0, r1, elapsed = _two_ranks([server.address], "coord.denied")
        for r in (r0, r1):
            assert isinstance(r, bnclient.ServiceError), r
            assert r.code == grpc.StatusCode.UNAUTHENTICATED, r
            assert "token" in r.details, r
        assert elapsed < 4, elapsed
        with Client(server.address, timeout=10) as c:
            for rank in (0, 1):
                bn = c.sync_batch_norm("coord.denied", C, group="coord", rank=rank, world_size=2)
                np.testing.assert_array_equal(
                    bn.state_dict()["running_mean"], np.zeros((1, C, 1, 1))
                )
    finally:
        server.kill()
    assert WRONG not in server.stderr
