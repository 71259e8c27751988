"""glibc malloc tuning for a process that moves large tensors.

By default glibc serves every allocation over 128 KiB-32 MiB with a fresh
mmap and returns it on free, so each request's buffers page-fault anew (about
3 us per 4 KiB page, 0.8 ms per MiB). Raising the mmap and trim thresholds
keeps freed memory in the heap for the next request. Tensors larger than the
threshold still get their own mapping and go back to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

#: Allocations up to this size are served from the (reused) heap.
MMAP_THRESHOLD = 256 << 20


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def release_free_memory() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim, all arenas).

    The thresholds above keep freed request buffers for reuse; after calls were
    cancelled for idleness that memory should not stay resident.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def tune_malloc() -> bool:
    """Apply the thresholds (glibc only); return whether they took effect."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    ok = all(
        mallopt(option, value) == 1
        for option, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD),
            (_M_TOP_PAD, 64 << 20),
        )
    )
    if not ok:
        log.warning("mallopt refused the malloc thresholds; large calls will page-fault more")
    return ok
