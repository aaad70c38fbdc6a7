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

For a while it was 1 MiB with fp32 compute (`auto` on CPUs without native bf16): tensors are twice
as big, and at SmolLM2's sizes most fell between 1 and 4 MiB (batch 2 x 256: 1.2 MB per hidden state, 3.1 MB
per MLP half; 1.3-3.5 MB per fp32 weight while a GGUF loads), so on the heap. glibc kept the freed
space without reusing it: after loading 283-296 MiB of the heap was free, at the second step's peak
470-580 MiB, and peak RSS reached 1725-1991 MiB (estimate 1516). At 1 MiB: 2-24 MiB free after
loading, 42-66 MiB at the peak, 1339-1400 MiB peak RSS, for 0.3-0.5 s more system time (1.0M instead
of 0.05-0.2M minor faults) per fp32 step of 41-56 s CPU time here.

That fragmentation came from the fp32 temporaries of RMSNorm and SwiGLU as torch ops and from
fresh dropout/SwiGLU outputs per layer. With fp32 kernels for both (quant/csrc/fused_cpu.cpp) and
those outputs in scratch buffers (nn.linear4bit.scratch), 4 MiB holds again for fp32 too (Zen 4,
AVX2 build with torch capped to AVX2, SmolLM2 fp32): batch 2 x 256 peak RSS 1513 MiB against an
estimate of 1486 (1383 at 1 MiB); batch 4 x 256 (bench_train.py) 185 tokens/s and 2087 MB at 4 MiB
against 150 tokens/s and 1841 MB at 1 MiB (5.8M page faults and 16 s system time in the run, 1.5M
and 5 s at 4 MiB). With 1 MiB for bf16 on AVX-512: 240 tokens/s, 1280 MB; at 4 MiB 289, 1463 MB.

So the training step avoids making and dropping tensors above 4 MiB where it can: at fp32 the
(tokens x intermediate) tensors of the MLP's backward are 6 MB at batch 4 x 256, and forming dL/dx
in place and writing SwiGLU's gradients into backward's own copies (nn.lora) took the step from
239k to 56k minor faults and +5.5 % tokens/s (AVX2 emulated, bf16 copies kept).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD = 4 * 2**20  # fixed (see the module docstring for the measurements behind it)


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
