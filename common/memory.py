"""Keep freed memory in the process: the CPU step's large activations are then reused, not faulted in again.

Why: glibc's malloc serves every allocation above its mmap threshold (128 KiB at first, adapting up
to 32 MiB) with a fresh mmap and gives it back to the kernel on free. A training step of the demo
model allocates and frees dozens of 4-17 MiB activations, so each step faulted in its memory
anew, page by page: 15 of the 95 CPU seconds of 120 demo steps were spent in the kernel, and the
step ran at 2.2 steps/s. With the threshold at its maximum and no trimming, the freed blocks stay in
the heap for the next step: 2 s in the kernel, 2.6 steps/s (BENCHMARKS.md, "Training step"). The
cost: the process keeps its peak heap instead of returning it between steps.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h) and the largest mmap threshold glibc accepts on 64-bit systems
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2**20
TRIM_THRESHOLD = 2**30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve blocks up to 32 MiB from the heap and not to trim it below 1 GiB.
    True where it took effect (Linux with glibc); elsewhere (macOS, musl) nothing changes. Once per
    process: later calls return the first one's answer."""
    global _applied
    if _applied is None:
        _applied = sys.platform.startswith("linux") and _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) \
            and _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return _applied


def _mallopt(parameter: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(parameter, value))
    except (OSError, AttributeError):        # no C library by that name, or one without mallopt (musl)
        return False
