"""Module configuration: MegEngine's constructor arguments, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from bnserver.errors import InvalidArgument


class Kind(Enum):
    """Which module class a config builds; fixes the accepted input ranks."""

    BATCH_NORM_1D = "BatchNorm1d"
    BATCH_NORM_2D = "BatchNorm2d"
    BATCH_NORM_3D = "BatchNorm3d"
    SYNC_BATCH_NORM = "SyncBatchNorm"

    @property
    def input_ndims(self) -> tuple[int, ...]:
        return _INPUT_NDIMS[self]


_INPUT_NDIMS = {
    Kind.BATCH_NORM_1D: (2, 3),
    Kind.BATCH_NORM_2D: (4,),
    Kind.BATCH_NORM_3D: (5,),
    Kind.SYNC_BATCH_NORM: (2, 3, 4, 5),
}


#: Smallest eps accepted. Below it a near-constant float32 channel can make
#: 1/sqrt(var + eps) overflow float32 and the outputs NaN; 1e-12 keeps inv_std
#: within 1e6, so every finite batch gives finite outputs.
MIN_EPS = 1e-12

#: Most ranks a sync group may have.
MAX_WORLD_SIZE = 4096


@dataclass(frozen=True)
class SyncSpec:
    """A SyncBatchNorm rank's place in its group."""

    group: str
    rank: int
    world_size: int
    eps_mode: str = "additive"  # or "max": max(var, eps) instead of var + eps


@dataclass(frozen=True)
class ModuleConfig:
    """Construction arguments of a BatchNorm module (MegEngine's names and defaults).

    momentum follows MegEngine: running = momentum * running + (1 - momentum) * batch,
    so 0.9 here is PyTorch's 0.1. None is PyTorch's momentum=None: the running
    statistics are the cumulative average of every training batch so far.
    """

    kind: Kind
    num_features: int
    eps: float = 1e-5
    momentum: float | None = 0.9
    affine: bool = True
    track_running_stats: bool = True
    freeze: bool = False
    sync: SyncSpec | None = None

    def validate(self) -> ModuleConfig:
        """Return self, or raise InvalidArgument naming the first bad field."""
        if self.num_features <= 0:
            raise InvalidArgument(f"num_features must be > 0, got {self.num_features}")
        if not (math.isfinite(self.eps) and self.eps >= MIN_EPS):
            raise InvalidArgument(f"eps must be a finite number >= {MIN_EPS:g}, got {self.eps}")
        if self.momentum is not None and not (
            math.isfinite(self.momentum) and 0 <= self.momentum <= 1
        ):
            raise InvalidArgument(f"momentum must be in [0, 1], got {self.momentum}")
        if self.freeze and not self.track_running_stats:
            raise InvalidArgument(
                "freeze=True needs track_running_stats=True (it normalizes with the running stats)"
            )
        if (self.kind is Kind.SYNC_BATCH_NORM) != (self.sync is not None):
            raise InvalidArgument("group, rank and world_size are given exactly for SyncBatchNorm")
        if self.sync is not None:
            s = self.sync
            if not s.group:
                raise InvalidArgument("a SyncBatchNorm needs a non-empty group name")
            if not 1 <= s.world_size <= MAX_WORLD_SIZE:
                raise InvalidArgument(
                    f"world_size must be in 1..{MAX_WORLD_SIZE}, got {s.world_size}"
                )
            if not 0 <= s.rank < s.world_size:
                raise InvalidArgument(f"rank must be in 0..{s.world_size - 1}, got {s.rank}")
            if s.eps_mode not in ("additive", "max"):
                raise InvalidArgument(f"eps_mode must be 'additive' or 'max', got {s.eps_mode!r}")
        return self

    def group_signature(self) -> str:
        """What every rank of a sync group must agree on: the config without the rank."""
        assert self.sync is not None
        s = self.sync
        return (
            f"SyncBatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"freeze={self.freeze}, world_size={s.world_size}, eps_mode={s.eps_mode!r})"
        )

    def describe(self) -> str:
        """MegEngine-style summary, e.g. 'BatchNorm2d(64, eps=1e-05, momentum=0.9, ...)'."""
        text = (
            f"{self.kind.value}({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"freeze={self.freeze}"
        )
        if self.sync is not None:
            text += (
                f", group={self.sync.group!r}, rank={self.sync.rank}, "
                f"world_size={self.sync.world_size}, eps_mode={self.sync.eps_mode!r}"
            )
        return text + ")"
