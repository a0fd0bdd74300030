"""Host memory kept for reuse between steps. glibc's malloc hands the freed top of its heap back
to the system once it passes a threshold, and the next step takes that memory back one page
fault per 4 KiB page. A training step frees most of what it allocated (activations, gradients)
at its end, so on CPU it pays those faults every step: on SmolLM2's shape about 24,000 per LoRA
step, 3-7% of its time in paired runs (docs/benchmarks.md). Keeping freed memory in the heap
spares them and costs no peak memory: the next step reuses it.

Applied once per process by the commands that run a model (training, generation, evaluation).
Left alone where the user chose an allocator: glibc's MALLOC_* or GLIBC_TUNABLES settings, or a
preloaded jemalloc / tcmalloc."""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks above this go to mmap (and back to the system when freed) whatever is set: glibc's
# largest mmap threshold on 64-bit. Every tensor below it is served from the heap.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, i.e. in practice never trim

USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                 "GLIBC_TUNABLES")

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; whether it now does (False off glibc,
    or where the user set the allocator up). Idempotent."""
    global _applied
    if _applied:
        return True
    if platform.libc_ver()[0] != "glibc" or any(os.environ.get(k) for k in USER_SETTINGS):
        return False
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc: not glibc's
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    # The mmap threshold first: setting either turns glibc's adaptive thresholds off.
    _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                          TRIM_THRESHOLD))
    return _applied
