"""SyncBatchNorm: a BatchNorm whose batch statistics span every rank of a group.

The module asks a `Reducer` (the coordinator, in process or remote) to merge
its per-channel statistics with the other ranks'; normalization, gradients and
the running-stats update then use the global values, exactly as if the ranks'
batches were one. Running statistics (eval, freeze) never involve the reducer.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol

import numpy as np

from bnserver import kernel
from bnserver.calls import CallContext
from bnserver.config import ModuleConfig
from bnserver.coordinator import Contribution, Phase, RoundKey
from bnserver.errors import Aborted, InvalidArgument
from bnserver.modules import BatchNorm, Gradients, SavedForBackward, checked


class Reducer(Protocol):
    """Merges one contribution per rank; `bnserver.coordinator.Coordinator` is one."""

    def contribute(
        self,
        key: RoundKey,
        rank: int,
        world_size: int,
        signature: Hashable,
        part: Contribution,
        call: CallContext | None = None,
    ) -> Contribution: ...

    def abort(self, key: RoundKey, rank: int, world_size: int, reason: str) -> None: ...


class SyncBatchNorm(BatchNorm):
    """MegEngine's SyncBatchNorm: (N, C), (N, C, L) or (N, C, H, W) input.

    name:      the module's name, shared by the ranks of its group.
    reducer:   where the group's statistics are merged.
    namespace: the tenant; groups of different tenants are distinct.
    """

    def __init__(
        self, config: ModuleConfig, name: str, reducer: Reducer, namespace: str = ""
    ) -> None:
        super().__init__(config)
        assert config.sync is not None
        self.sync = config.sync
        self.name = name
        self.reducer = reducer
        self.signature = config.group_signature()
        # A tenant's group "g" is "tenant/g" at the coordinator: tenants never meet.
        self.group = f"{namespace}/{self.sync.group}" if namespace else self.sync.group

    def _key(self, phase: Phase) -> RoundKey:
        return RoundKey(self.group, self.name, phase)

    def _eps_mode(self) -> kernel.EpsMode:
        return "max" if self.sync.eps_mode == "max" else "additive"

    def _all_reduce(
        self, phase: Phase, part: Contribution, call: CallContext | None
    ) -> Contribution:
        key = self._key(phase)
        return self.reducer.contribute(
            key, self.sync.rank, self.sync.world_size, self.signature, part, call
        )

    def _abort(self, phase: Phase, reason: str) -> None:
        self.reducer.abort(self._key(phase), self.sync.rank, self.sync.world_size, reason)

    def abandon(self, backward: bool, reason: str) -> None:
        if self.uses_batch_stats():
            self._abort(Phase.BACKWARD if backward else Phase.FORWARD, reason)

    def forward(
        self,
        x: np.ndarray,
        keep_for_backward: bool = False,
        call: CallContext | None = None,
        request_id: str = "",
    ) -> tuple[np.ndarray, SavedForBackward | None]:
        try:
            self.check_input(x)
        except InvalidArgument as exc:
            # Peers would otherwise wait out the timeout for this rank.
            if self.uses_batch_stats():
                self._abort(Phase.FORWARD, str(exc))
            raise
        return super().forward(x, keep_for_backward, call, request_id)

    def backward(
        self,
        saved: SavedForBackward,
        grad_out: np.ndarray,
        call: CallContext | None = None,
    ) -> Gradients:
        try:
            self.check_grad(saved, grad_out)
        except InvalidArgument as exc:
            if saved.count is not None:
                self._abort(Phase.BACKWARD, str(exc))
            raise
        return super().backward(saved, grad_out, call)

    def _batch_moments(self, x: np.ndarray, call: CallContext | None) -> kernel.Moments:
        local = kernel.moments(x)
        part = Contribution(local.count, (local.mean, local.m2))
        merged = self._all_reduce(Phase.FORWARD, part, call)
        if call is not None and call.expired():
            # Answered too late for the caller, who has seen a failure: change nothing.
            raise Aborted("the call ended (cancelled or past its deadline) while its round ran")
        mean, m2 = merged.vectors
        return checked(kernel.Moments(merged.count, mean, m2))

    def _global_grad_sums(
        self, sum_dy: kernel.Vector, sum_dy_xhat: kernel.Vector, call: CallContext | None
    ) -> tuple[kernel.Vector, kernel.Vector]:
        part = Contribution(0, (sum_dy, sum_dy_xhat))
        merged = self._all_reduce(Phase.BACKWARD, part, call)
        total_dy, total_dy_xhat = merged.vectors
        return total_dy, total_dy_xhat
