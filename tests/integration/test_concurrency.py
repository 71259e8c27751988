"""Exactly-once updates: 16 threads x 50 forwards are 800 updates; a retried id is one."""

from __future__ import annotations

import threading

import grpc
import numpy as np

from bnclient import Client
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

THREADS, CALLS, C = 16, 50, 512
MOMENTUM = 0.99  # slow blending: a lost or doubled update still shows after 800 steps


def _sequential(x: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Running stats after `steps` identical updates, blended in float64 then rounded to
    float32 each step (as the server stores them)."""
    x64 = x.astype(np.float64)
    n = x.size // C
    mean = x64.mean(axis=0)
    var = x64.var(axis=0) * n / (n - 1)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    for _ in range(steps):
        rm = (MOMENTUM * rm.astype(np.float64) + (1 - MOMENTUM) * mean).astype(np.float32)
        rv = (MOMENTUM * rv.astype(np.float64) + (1 - MOMENTUM) * var).astype(np.float32)
    return rm, rv


def test_sixteen_threads_lose_no_update(server, name) -> None:
    x = (np.random.default_rng(0).standard_normal((4, C)) * 3 + 7).astype(np.float32)
    with Client(server.address) as client:
        bn = client.batch_norm_1d(name, C, momentum=MOMENTUM)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(CALLS):
                    bn(x)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        rm, rv = bn.running_mean.ravel(), bn.running_var.ravel()
    want_m, want_v = _sequential(x, THREADS * CALLS)
    np.testing.assert_array_equal(rm, want_m)
    np.testing.assert_array_equal(rv, want_v)
    # The check can tell one update from another.
    assert not np.array_equal(rm, _sequential(x, THREADS * CALLS - 1)[0])


def test_a_retried_training_forward_is_applied_once(server, name) -> None:
    """The same ForwardRequest (same request id) twice: one update, the same output."""
    x = (np.random.default_rng(1).standard_normal((8, C)) * 2 + 3).astype(np.float32)
    with Client(server.address) as client:
        bn = client.batch_norm_1d(name, C, momentum=MOMENTUM)
        request = pb.ForwardRequest(ref=pb.ModuleRef(name=name), request_id="retry-me")
        wire.encode(x, request.input)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.BatchNormServiceStub(channel)
            first = wire.decode(stub.Forward(request, timeout=10).output)
            once = bn.state_dict()
            again = wire.decode(stub.Forward(request, timeout=10).output)
            assert bn.state_dict()["running_mean"].tobytes() == once["running_mean"].tobytes()
            assert bn.state_dict()["running_var"].tobytes() == once["running_var"].tobytes()
            assert again.tobytes() == first.tobytes()
            # A new id is a new step.
            request.request_id = "next"
            stub.Forward(request, timeout=10)
            final = bn.running_mean.ravel()
    # Two steps in all: the first id once, and the new one.
    np.testing.assert_array_equal(final, _sequential(x, 2)[0])
