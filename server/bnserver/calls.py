"""What the domain layers know of the call that asked for their work: when it gives up.

The gRPC layer builds a `CallContext` from the incoming call's deadline and
cancellation; sync modules and the coordinator use it so that a call that has
failed for its client leaves nothing behind.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class CallContext:
    """deadline: time.monotonic() seconds after which the caller has given up, or None.
    cancelled: set when the caller cancels (or the call ends)."""

    deadline: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def with_timeout(cls, seconds: float | None) -> CallContext:
        return cls(None if seconds is None else time.monotonic() + seconds)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def expired(self, margin: float = 0.0) -> bool:
        """Whether the caller has given up (cancelled, or past its deadline), or will
        within `margin` seconds."""
        if self.cancelled.is_set():
            return True
        return self.deadline is not None and time.monotonic() + margin >= self.deadline
