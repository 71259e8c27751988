"""Single-use backward handles, bounded in count and bytes, oldest evicted first."""

from __future__ import annotations

import secrets
import threading
import weakref
from collections import OrderedDict

from bnserver.errors import NotFound, ResourceExhausted
from bnserver.state.batchnorm import BatchNorm, SavedForBackward

#: How many spent handles are remembered to explain a NOT_FOUND.
_TOMBSTONES = 4096


class BackwardStore:
    """Holds `SavedForBackward` contexts under opaque handles until backward takes them.

    At most `max_handles` contexts and `max_bytes` bytes are held; adding one
    beyond either evicts the oldest. A handle is good for one backward.
    """

    def __init__(self, max_handles: int = 64, max_bytes: int = 2 << 30) -> None:
        self.max_handles = max_handles
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._live: OrderedDict[str, SavedForBackward] = OrderedDict()
        self._bytes = 0
        self._gone: OrderedDict[str, str] = OrderedDict()  # handle -> why it is gone
        self._deleted: weakref.WeakSet[BatchNorm] = weakref.WeakSet()

    def check_fits(self, nbytes: int) -> None:
        """Raise ResourceExhausted if one context of `nbytes` could never be held."""
        if nbytes > self.max_bytes:
            raise ResourceExhausted(
                f"keeping this input for backward needs {nbytes} bytes, over the backward "
                f"store limit of {self.max_bytes} bytes (--max-backward-bytes)"
            )

    def put(self, saved: SavedForBackward) -> str:
        """Store `saved` and return its new handle, evicting the oldest as needed."""
        self.check_fits(saved.nbytes)
        handle = secrets.token_hex(16)
        with self._lock:
            self._insert(handle, saved)
        return handle

    def _insert(self, handle: str, saved: SavedForBackward) -> None:
        """Hold `saved` under `handle`, evicting the oldest as needed (caller holds the lock)."""
        nbytes = saved.nbytes
        while self._live and (
            len(self._live) >= self.max_handles or self._bytes + nbytes > self.max_bytes
        ):
            old, ctx = self._live.popitem(last=False)
            self._bytes -= ctx.nbytes
            self._bury(
                old,
                f"evicted: the server keeps at most {self.max_handles} backward handles "
                f"and {self.max_bytes} bytes, oldest evicted first "
                f"(--max-backward-handles, --max-backward-bytes)",
            )
        self._live[handle] = saved
        self._bytes += nbytes

    def take(self, handle: str, module: BatchNorm) -> SavedForBackward:
        """Remove and return the context of `handle`, which must belong to `module`."""
        with self._lock:
            saved = self._live.get(handle)
            if saved is None:
                why = self._gone.get(handle, "unknown handle")
                raise NotFound(f"backward handle {handle[:64]!r} is not available: {why}")
            if saved.module is not module:
                raise NotFound(f"backward handle {handle[:64]!r} belongs to another module")
            del self._live[handle]
            self._bytes -= saved.nbytes
            self._bury(handle, "already used (a backward handle is good for one backward)")
        return saved

    def put_back(self, handle: str, saved: SavedForBackward) -> None:
        """Return a context taken by a backward that failed, under its old handle."""
        with self._lock:
            if saved.module in self._deleted:
                return  # its module was deleted meanwhile: the handle stays gone
            self._gone.pop(handle, None)
            self._insert(handle, saved)

    def drop_module(self, module: BatchNorm) -> None:
        """Forget every context of a deleted module."""
        with self._lock:
            self._deleted.add(module)
            for handle in [h for h, s in self._live.items() if s.module is module]:
                self._bytes -= self._live.pop(handle).nbytes
                self._bury(handle, "its module was deleted")

    def __len__(self) -> int:
        return len(self._live)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _bury(self, handle: str, why: str) -> None:
        self._gone[handle] = why
        while len(self._gone) > _TOMBSTONES:
            self._gone.popitem(last=False)
