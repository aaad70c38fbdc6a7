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

So the threshold follows the compute dtype's element size: 4 MiB for 16-bit compute, 1 MiB for
fp32. With 1 MiB for bf16 too (AVX-512 + BF16 EPYC, `bench_train.py --only qlora`, batch 4 x 256):
240 tokens/s, 1280 MB peak RSS, 5.3M minor faults and 13 s system time in the run; at 4 MiB
289 tokens/s, 1463 MB, 0.7M faults, 2.3 s: the speed is worth more there than 180 MB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
# fixed, by the compute dtype's bytes per element (see the module docstring for the measurements)
MMAP_THRESHOLDS = {2: 4 * 2**20, 4: 2**20}


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def mmap_threshold(compute_dtype: str) -> int:
    """The fixed threshold for a run computing in `compute_dtype` (a concrete name: 'bfloat16', ...)."""
    from ..precision import torch_dtype

    return MMAP_THRESHOLDS[4 if torch_dtype(compute_dtype).itemsize >= 4 else 2]


def return_freed_memory(compute_dtype: str = "bfloat16") -> bool:
    """Fix glibc's mmap threshold for `compute_dtype` (see module docstring). False where there is
    no glibc (macOS, musl) and nothing changed. Call at startup, before the first large tensor."""
    threshold = mmap_threshold(compute_dtype)
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
