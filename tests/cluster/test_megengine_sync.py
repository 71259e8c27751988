"""MegEngine's own SyncBatchNorm test, against a real coordinator and two servers.

A (3, 8, 4, 16) batch is split along the last axis between two ranks on
different servers; after each of four training steps the ranks' outputs,
stitched together, and their running statistics equal a plain BatchNorm2d run
on the whole batch (and a float64 reference).
"""

from __future__ import annotations

import numpy as np

from bnclient import Client
from tests.cluster.conftest import run_ranks

SHAPE = (3, 8, 4, 16)
STEPS = 4
MOMENTUM = 0.9
EPS = 1e-5


def _reference_step(x: np.ndarray, running: tuple[np.ndarray, np.ndarray]):
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3))
    var = x64.var(axis=(0, 2, 3))
    n = x.size // x.shape[1]
    y = (x64 - mean[None, :, None, None]) / np.sqrt(var + EPS)[None, :, None, None]
    rm = MOMENTUM * running[0] + (1 - MOMENTUM) * mean
    rv = MOMENTUM * running[1] + (1 - MOMENTUM) * var * n / (n - 1)
    return y, (rm, rv)


def test_two_ranks_split_on_last_axis_match_whole_batch(cluster, group) -> None:
    rng = np.random.default_rng(2024)
    batches = [rng.standard_normal(SHAPE).astype(np.float32) * 3 + 1 for _ in range(STEPS)]
    halves = SHAPE[3] // 2
    clients = [Client(cluster.addresses[0]), Client(cluster.addresses[1])]
    whole_client = Client(cluster.addresses[2])
    try:
        ranks = [
            c.sync_batch_norm("bn", SHAPE[1], group=group, rank=r, world_size=2)
            for r, c in enumerate(clients)
        ]
        whole = whole_client.batch_norm_2d(f"{group}.whole", SHAPE[1])
        running = (np.zeros(SHAPE[1]), np.ones(SHAPE[1]))
        for x in batches:
            parts = [x[..., :halves], x[..., halves:]]
            outs = run_ranks(
                [lambda bn=bn, part=part: bn(part) for bn, part in zip(ranks, parts, strict=True)]
            )
            stitched = np.concatenate(outs, axis=-1)
            expected, running = _reference_step(x, running)
            np.testing.assert_allclose(stitched, expected, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(stitched, whole(x), rtol=1e-5, atol=1e-5)
            for bn in ranks:
                np.testing.assert_allclose(bn.running_mean.ravel(), running[0], rtol=1e-5)
                np.testing.assert_allclose(bn.running_var.ravel(), running[1], rtol=1e-5)
            np.testing.assert_array_equal(ranks[0].running_var, ranks[1].running_var)
            np.testing.assert_allclose(ranks[0].running_var, whole.running_var, rtol=1e-6)
        # eval uses the running statistics and needs no peer
        ranks[0].eval()
        x = batches[0][..., :halves]
        rm, rv = running
        expected = (x - rm[None, :, None, None]) / np.sqrt(rv + EPS)[None, :, None, None]
        np.testing.assert_allclose(ranks[0](x), expected, rtol=1e-5, atol=1e-5)
    finally:
        for c in [*clients, whole_client]:
            c.close()
