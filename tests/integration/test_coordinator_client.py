"""The server's side of its coordinator link: a Rounds stream that breaks is replaced,
and nothing accumulates while the coordinator is down."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from bnserver.errors import Unavailable
from bnserver.rpc.coordinator_client import RemoteCoordinator
from bnserver.sync.ticket import Contribution, Phase, Ticket


def test_steps_during_an_outage_fail_fast_and_leave_no_threads_behind() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = RemoteCoordinator(f"127.0.0.1:{port}", timeout=2.0)
    ticket = Ticket("", "g", "m", Phase.FORWARD, 0, 2, "sig")
    part = Contribution(4, (np.zeros(3), np.ones(3)))
    try:
        with pytest.raises(Unavailable):
            remote.contribute(ticket, part)
        before = threading.active_count()
        for _ in range(30):
            with pytest.raises(Unavailable):
                remote.contribute(ticket, part)
        assert threading.active_count() <= before + 2
    finally:
        remote.close()
