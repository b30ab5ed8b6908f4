"""Resident memory of this process (MiB): the peak so far and the current size, for run summaries; and the glibc
allocator setting `load_model` makes when `NEUROSHIELD_MALLOC_THRESHOLD` asks for it (`return_freed_memory`)."""

from __future__ import annotations

import ctypes
import os
import resource
import sys

# glibc's mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

ALLOCATOR_ENV = "NEUROSHIELD_MALLOC_THRESHOLD"
"""Environment variable: the fixed glibc mmap / trim threshold in bytes that `return_freed_memory` sets (e.g.
1048576: blocks of 1 MiB or more, activations, KV caches, logits, get their own mapping, unmapped when freed); unset
or `0` leaves glibc's allocator as it is."""

DEFAULT_ALLOCATOR_THRESHOLD = 0
"""Off by default: a fixed 1 MiB threshold lowered SmolLM2's peaks by 9-33 % but made the statistics pass 1.5-1.6x and
generation 1.2-1.4x slower (every large block is a fresh mapping, faulted in page by page; benchmarks/RESULTS.md,
section 8)."""


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB), from getrusage (kilobytes on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def current_rss_mb() -> float | None:
    """Resident memory now (MiB), from /proc/self/statm; None where there is no /proc (not Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc (it has `mallopt` and `malloc_trim`), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    return libc


def allocator_threshold() -> int:
    """The threshold `return_freed_memory` sets: `NEUROSHIELD_MALLOC_THRESHOLD` (bytes; unset or 0 = none)."""
    raw = os.environ.get(ALLOCATOR_ENV, "").strip()
    if not raw:
        return DEFAULT_ALLOCATOR_THRESHOLD
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ALLOCATOR_ENV}={raw!r}: give a number of bytes (0 leaves the allocator as it is)") from None
    if value < 0:
        raise ValueError(f"{ALLOCATOR_ENV}={raw!r}: give a number of bytes >= 0")
    return value


def return_freed_memory(threshold: int | None = None) -> bool:
    """Make glibc hand blocks of `threshold` bytes or more back to the system when they are freed.

    glibc serves a block above its mmap threshold (128 KiB at start) with a mapping of its own, unmapped when the
    block is freed; but every such free raises the threshold to the block's size (up to 32 MiB, its "dynamic
    threshold"), and from then on a forward pass's activations, a training step's and a generation step's tensors
    come from the heap, whose freed memory the process keeps (measured on SmolLM2, bfloat16: the training loop's
    resident memory rose 1,055 MB for 720 MB of tensors and stayed ~970 MB up after it; generation 550 MB for
    298 MB). A fixed mmap threshold (and the trim threshold with it) turns that adjustment off, at a cost in time:
    each large block is then a fresh mapping (see `DEFAULT_ALLOCATOR_THRESHOLD`). Called by `load_model`;
    `threshold` None: `allocator_threshold()`; 0 changes nothing. Returns whether a setting was made: False where
    the C library is not glibc (macOS, Windows, musl) or the threshold is 0.
    """
    value = allocator_threshold() if threshold is None else threshold
    if value <= 0:
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, value)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, value))


__all__ = ["peak_rss_mb", "current_rss_mb", "return_freed_memory", "allocator_threshold", "ALLOCATOR_ENV",
           "DEFAULT_ALLOCATOR_THRESHOLD"]
