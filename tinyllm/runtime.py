"""Process-level settings that make CPU training faster: the C allocator's thresholds.

A training step allocates and frees the same activation and gradient buffers every step.
glibc's malloc serves blocks above its mmap threshold (128 KiB at start, adapting upwards)
with fresh `mmap` pages and returns them to the kernel on `free`, and it trims the top of
its heap once more than its trim threshold is free. Either way the next step's buffers come
back as new pages that the kernel must fault in and zero: on the micro model (nanoGPT's CPU
shape) that is ~2,600 page faults and ~10 MB zeroed per step, 5-10% of the step
(benchmarks/README.md). Fixing the thresholds keeps those blocks in the heap for reuse.

Only glibc on Linux is touched, and only when the user has not chosen an allocator already
(MALLOC_*_ environment variables, or jemalloc/tcmalloc preloaded). The price is that freed
memory (up to the trim threshold) stays with the process instead of going back to the OS.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit (HEAP_MAX / 2)
TRIM_THRESHOLD = 1024 * 1024 * 1024

_state: dict[str, str] = {}


def allocator_status() -> str:
    """What tune_cpu_allocator did in this process ('not called' before it ran)."""
    return _state.get("status", "not called")


def tune_cpu_allocator(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Keep freed large blocks in glibc's heap for reuse; True when the settings took effect.

    Idempotent. Does nothing (and says why in allocator_status()) off Linux/glibc, or when
    MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_/MALLOC_TOP_PAD_ are set, or when LD_PRELOAD
    names another allocator (jemalloc, tcmalloc, mimalloc).
    """
    if _state.get("tuned"):
        return True
    reason = _skip_reason()
    if reason:
        _state["status"] = f"default ({reason})"
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError) as e:  # pragma: no cover - glibc without libc.so.6
        _state["status"] = f"default (no mallopt: {e})"
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = ok and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    _state["status"] = (
        f"tuned (glibc mmap threshold {mmap_threshold >> 20} MiB, trim threshold "
        f"{trim_threshold >> 20} MiB)"
        if ok
        else "default (mallopt refused the values)"
    )
    if ok:
        _state["tuned"] = "yes"
    return ok


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"not Linux: {sys.platform}"
    libc, _ = platform.libc_ver()
    if libc != "glibc":
        return f"C library is {libc or 'unknown'}, not glibc"
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        if var in os.environ:
            return f"{var} is set"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return f"{name} is preloaded"
    return None
