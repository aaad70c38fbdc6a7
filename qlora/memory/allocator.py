"""Make CPU resident memory follow live tensors, so the estimate is the peak.

glibc serves allocations above its mmap threshold with mmap and returns them to the system on
free, but it raises that threshold (up to 32 MiB) each time such a block is freed. Activation
tensors of a few MiB then land on the heap, where freed space is kept and fragments. Measured here
on SmolLM2-135M: at batch 2 x 512 peak RSS reached 3.2 GiB in two steps against an estimate of
2.5 GiB with glibc's default; at batch 2 x 256, 1.81 then 2.07 GiB with a fixed 1 MiB threshold
(0.6 MiB activations stayed on the heap), and 1.63-1.66 GiB, stable over three steps, with
glibc's initial 128 KiB threshold fixed (estimate: 1.74 GiB). Fixing the threshold turns the
dynamic adjustment off; the cost is an mmap/munmap and fresh zeroed pages per large tensor,
small next to the matmuls that fill it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's own initial threshold, kept fixed


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (see module docstring). False where there is no glibc (macOS,
    musl) and nothing changed. Call once at startup, before the first large tensor."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
