"""Make CPU resident memory follow live tensors, so the estimate is the peak.

glibc serves allocations above its mmap threshold with mmap and returns them to the system on
free, but it raises that threshold (up to 32 MiB) each time such a block is freed. Activation
tensors of a few MiB then land on the heap, where freed space is kept and fragments. Measured here
on SmolLM2-135M: at batch 2 x 512 peak RSS reached 3.2 GiB in two steps against an estimate of
2.5 GiB with glibc's default. Fixing the threshold turns the dynamic adjustment off; the cost is an
mmap/munmap and fresh zeroed pages per tensor above it, i.e. page faults. With glibc's initial
128 KiB fixed, the demo's training step (batch 8 x ~80 tokens) took 938k minor faults and 2.1 s of
system time per step: 170 tokens/s and 1570 MB peak RSS, against 234 tokens/s and 1898 MB with
glibc's dynamic threshold. At 1 / 4 / 16 MiB fixed: 269 / 251 / 277 tokens/s, 1850 / 1873 / 1868 MB,
90k / 35k / 38k faults per step.

1 MiB, not 4: with fp32 compute (`auto` on CPUs without native bf16) tensors are twice as big, and
at SmolLM2's sizes most fell between 1 and 4 MiB (batch 2 x 256: 1.2 MB per hidden state, 3.1 MB
per MLP half; 1.3-3.5 MB per fp32 weight while a GGUF loads), so on the heap. glibc kept the freed
space without reusing it: after loading 283-296 MiB of the heap was free, at the second step's peak
470-580 MiB, and peak RSS reached 1725-1991 MiB (estimate 1516). At 1 MiB: 2-24 MiB free after
loading, 42-66 MiB at the peak, 1339-1400 MiB peak RSS, for 0.3-0.5 s more system time (1.0M instead
of 0.05-0.2M minor faults) per fp32 step of 41-56 s CPU time here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD = 2**20  # fixed (see the module docstring for the measurements behind it)


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
