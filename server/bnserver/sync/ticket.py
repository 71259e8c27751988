"""What one rank sends to a round, and what every rank of the round gets back.

A `Ticket` names the round a rank's part joins and what the rank claims to
be; it is immutable and has exactly one wire encoding (`bnservice.v1.Ticket`,
built by `bnserver.rpc.codec`). Only O(C) numbers travel: tensors stay on
the servers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from bnserver.core.config import MAX_WORLD_SIZE
from bnserver.errors import InvalidArgument

#: Largest per-rank element count per channel: merged counts of a full group
#: stay far inside int64.
MAX_COUNT = 1 << 48


class Phase(Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


@dataclass(frozen=True)
class RoundKey:
    """Which rounds a part can join: one tenant's group's module, in one phase."""

    tenant: str
    group: str
    module: str
    phase: Phase

    def __str__(self) -> str:
        return f"{self.phase.value} round of module {self.module!r} in group {self.group!r}"


@dataclass(frozen=True)
class Ticket:
    """One rank's claim on a round.

    signature: the module's config without its rank (`ModuleConfig.group_signature`);
        every rank of a round must send the same string.
    """

    tenant: str
    group: str
    module: str
    phase: Phase
    rank: int
    world_size: int
    signature: str

    @property
    def key(self) -> RoundKey:
        return RoundKey(self.tenant, self.group, self.module, self.phase)

    def check(self) -> Ticket:
        """Return self, or raise InvalidArgument for a rank or world_size out of range."""
        if not 1 <= self.world_size <= MAX_WORLD_SIZE:
            raise InvalidArgument(
                f"world_size must be in 1..{MAX_WORLD_SIZE}, got {self.world_size}"
            )
        if not 0 <= self.rank < self.world_size:
            raise InvalidArgument(f"rank must be in 0..{self.world_size - 1}, got {self.rank}")
        if not self.group or not self.module:
            raise InvalidArgument("a round needs a group and a module name")
        return self

    def __str__(self) -> str:
        return f"rank {self.rank} of the {self.key}"


@dataclass(frozen=True)
class RunningState:
    """A rank's running statistics as they were when it joined a forward round.

    version: training updates applied so far (`num_batches_tracked`).
    mean, var: float32 (C,).
    Ranks compare these to find a stale rank (restarted from an older snapshot,
    or one whose reply was lost) and bring it back in step.
    """

    version: int
    mean: np.ndarray
    var: np.ndarray

    def same_as(self, other: RunningState) -> bool:
        """Equal version and bit-identical arrays."""
        return (
            self.version == other.version
            and self.mean.tobytes() == other.mean.tobytes()
            and self.var.tobytes() == other.var.tobytes()
        )


@dataclass(frozen=True)
class Contribution:
    """One rank's numbers.

    Forward: count, vectors (mean, m2), float64 (C,), and the rank's running
    state when the round updates running statistics. Backward: count 0,
    vectors (sum_dy, sum_dy_xhat).
    """

    count: int
    vectors: tuple[np.ndarray, ...]
    state: RunningState | None = None

    @property
    def width(self) -> int:
        """C, the channel count of the vectors."""
        return int(self.vectors[0].shape[0]) if self.vectors else 0

    def check(self) -> Contribution:
        """Return self, or raise InvalidArgument for malformed numbers."""
        if not 0 <= self.count <= MAX_COUNT:
            raise InvalidArgument(f"count must be in 0..{MAX_COUNT}, got {self.count}")
        if len(self.vectors) != 2:
            raise InvalidArgument(f"a contribution carries 2 vectors, got {len(self.vectors)}")
        shape = self.vectors[0].shape
        if len(shape) != 1 or any(v.shape != shape or v.dtype != np.float64 for v in self.vectors):
            raise InvalidArgument("contribution vectors must be float64 of one shape (C,)")
        s = self.state
        if s is not None and (
            s.version < 0
            or s.mean.shape != shape
            or s.var.shape != shape
            or s.mean.dtype != np.float32
            or s.var.dtype != np.float32
        ):
            raise InvalidArgument("a running state must be float32 (C,) with a version >= 0")
        return self


@dataclass(frozen=True)
class Outcome:
    """A completed round, identical for every rank.

    count, vectors: the merged numbers (as in Contribution).
    reference: when the ranks' running states differed, the state every rank
        adopts before applying this round (that of `reference_rank`, the
        lowest rank with the highest version); None when they all agreed.
    stale: the ranks whose state differed from the reference.
    """

    count: int
    vectors: tuple[np.ndarray, ...]
    reference: RunningState | None = None
    reference_rank: int = -1
    stale: tuple[int, ...] = ()
