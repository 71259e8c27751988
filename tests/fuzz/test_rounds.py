"""Hostile parts on a coordinator's Rounds stream (the stream servers keep open to it).

Hundreds of malformed, out-of-range and well-formed parts go up one stream: each
part is answered by exactly one RoundEnd with its id (INVALID_ARGUMENT for the
malformed ones, a merged outcome or a round's failure for the rest), the stream
stays open, and the coordinator still answers health and completes a real round.
Bytes that do not parse end the stream with INVALID_ARGUMENT, and nothing else.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bnserver.cli.processes import start_coordinator
from bnservice import wire
from bnservice.v1 import bnservice_pb2 as pb
from bnservice.v1 import bnservice_pb2_grpc as pb_grpc

PARTS = 400


def tensor(rng: random.Random) -> pb.Tensor:
    choice = rng.randrange(6)
    if choice == 0:
        return pb.Tensor(dtype="float64", shape=[3], data=b"\0" * rng.randrange(40))
    if choice == 1:
        return pb.Tensor(dtype=rng.choice(["float32", "int8", "", "x" * 50]), shape=[3])
    if choice == 2:
        return pb.Tensor(dtype="float64", shape=[-1, 2**40])
    t = pb.Tensor()
    wire.encode(np.random.default_rng(rng.randrange(99)).standard_normal(3), t)
    return t


def part(rng: random.Random, tag: int) -> pb.RoundPart:
    world = rng.choice([0, 1, 2, 3, -5, 2**31 - 1])
    ticket = pb.Ticket(
        tenant=rng.choice(["", "t", "x" * 300]),
        group=rng.choice(["fz", "", "g" * 1000]),
        module=f"m{rng.randrange(4)}",
        phase=rng.choice([0, 1, 2, 7]),
        rank=rng.choice([0, 1, 2, -1, 99]),
        world_size=world,
        signature=rng.choice(["s", "", "other"]),
    )
    request = pb.ReduceRequest(
        ticket=ticket,
        count=rng.choice([0, 2, 5, -3, 2**62]),
        vectors=[tensor(rng) for _ in range(rng.choice([0, 1, 2, 2, 2, 3]))],
    )
    return pb.RoundPart(id=tag, part=request)


def test_hostile_parts_on_one_stream_are_each_answered_once() -> None:
    rng = random.Random(5)
    with start_coordinator("--sync-timeout", "1") as coordinator:
        channel = grpc.insecure_channel(coordinator.address)
        outbox: queue.SimpleQueue[pb.RoundPart | None] = queue.SimpleQueue()

        def parts() -> Iterator[pb.RoundPart]:
            while (p := outbox.get()) is not None:
                yield p

        stub = pb_grpc.CoordinatorServiceStub(channel)
        ends: dict[int, list[pb.RoundEnd]] = {}
        stream = stub.Rounds(parts(), timeout=60)
        done = threading.Event()

        def read() -> None:
            for end in stream:
                ends.setdefault(end.id, []).append(end)
                if len(ends) == PARTS:
                    done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for tag in range(1, PARTS + 1):
            outbox.put(part(rng, tag))
        assert done.wait(30), f"{PARTS - len(ends)} parts unanswered"
        assert all(len(v) == 1 for v in ends.values()), "a part was answered twice"
        codes = {grpc.StatusCode.INVALID_ARGUMENT.value[0], 0}
        codes |= {grpc.StatusCode.ABORTED.value[0], grpc.StatusCode.DEADLINE_EXCEEDED.value[0]}
        assert {e[0].code for e in ends.values()} <= codes
        assert any(e[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for e in ends.values())
        outbox.put(None)
        reader.join(10)
        # A real round still completes, and health answers.
        good = part(random.Random(0), 1)
        good.part.ticket.CopyFrom(
            pb.Ticket(group="ok", module="m", phase=1, rank=0, world_size=1, signature="s")
        )
        good.part.count = 4
        del good.part.vectors[:]
        for _ in range(2):
            wire.encode(np.ones(3), good.part.vectors.add())
        (end,) = list(stub.Rounds(iter([good]), timeout=10))
        assert end.code == 0 and end.outcome.count == 4
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Bytes that are no RoundPart end the stream with INVALID_ARGUMENT.
        raw = channel.stream_stream("/bnservice.v1.CoordinatorService/Rounds")  # type: ignore[call-arg]
        try:
            list(raw(iter([b"\xff\xff\xff"]), timeout=10))
            raise AssertionError("garbage was accepted")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        channel.close()
        assert coordinator.proc.poll() is None
        assert "Traceback" not in coordinator.stderr
