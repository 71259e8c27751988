"""The SDK rides out a server restart: idempotent calls retry UNAVAILABLE with backoff."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bnclient import Client, NotFoundError, UnavailableError
from bnserver.cli.processes import ServerProcess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(port: int, state_dir: Path) -> ServerProcess:
    return ServerProcess(["serve", "--port", str(port), "--state-dir", str(state_dir)])


def test_calls_retry_until_the_restarted_server_answers(tmp_path: Path) -> None:
    port = _free_port()
    first = _serve(port, tmp_path)
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    restarted: list[ServerProcess] = []
    try:
        with Client(f"127.0.0.1:{port}", retries=8, retry_backoff=0.1) as client:
            bn = client.batch_norm_1d("survivor", 4)
            bn(x)
            assert first.terminate() == 0
            threading.Timer(0.5, lambda: restarted.append(_serve(port, tmp_path))).start()
            start = time.monotonic()
            y = bn(x)  # UNAVAILABLE until the new process serves: retried
            assert time.monotonic() - start > 0.4
            assert y.shape == x.shape
            # Two updates in all: the retried forward was applied once, after the restart.
            n = x.shape[0]
            mean = x.astype(np.float64).mean(axis=0)
            var = x.astype(np.float64).var(axis=0) * n / (n - 1)
            np.testing.assert_allclose(bn.running_mean.ravel(), mean * (1 - 0.9**2), rtol=1e-5)
            np.testing.assert_allclose(
                bn.running_var.ravel(), 0.9**2 + var * (1 - 0.9**2), rtol=1e-5
            )
            client.delete_module("survivor")
            with pytest.raises(NotFoundError):
                client.delete_module("survivor")  # a first attempt's NOT_FOUND is real
    finally:
        first.kill()
        for proc in restarted:
            proc.kill()


def test_retries_give_up_with_unavailable(tmp_path: Path) -> None:
    with Client(f"127.0.0.1:{_free_port()}", retries=2, retry_backoff=0.05) as client:
        start = time.monotonic()
        with pytest.raises(UnavailableError):
            client.list_modules()
        assert time.monotonic() - start < 10
