"""The one place that picks an implementation for each quantized op.

`blockwise.py` is the definition; a fast kernel may replace an op here only if it is tested bit
for bit against the reference (tests/quant/test_kernels.py). CPU tensors go to the compiled
SIMD kernels of fast/quantize.py (built on first use; the reference if they cannot be built); other
devices use the reference. Set QLORA_REFERENCE_KERNELS=1 to force the reference everywhere
(debugging, and the parity tests themselves).
"""

from __future__ import annotations

import os

import torch

from . import blockwise as ref
from . import fast

# (nested_absmax fp32, nested_code fp32[256], offset fp32 [1], nested_blocksize)
Nested = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]


def cpu_kernels(*tensors: torch.Tensor) -> fast.CpuKernels | None:
    if os.environ.get("QLORA_REFERENCE_KERNELS", "0") not in ("", "0"):
        return None
    if any(t.device.type != "cpu" for t in tensors):
        return None
    return fast.kernels()


def quantize_4bit(w: torch.Tensor, quant_type: str, blocksize: int):
    """-> (packed uint8 [(n+1)//2, 1], absmax fp32 [blocks])"""
    k = cpu_kernels(w)
    return k.quant.quantize_4bit(w, quant_type, blocksize) if k else ref.quantize_4bit_ref(w, quant_type, blocksize)


def dequantize_4bit(packed, absmax, code, blocksize, shape, dtype, nested: Nested | None = None) -> torch.Tensor:
    """code[q] * block scale, shaped `shape`, as `dtype`. With `nested`, `absmax` holds the
    Double-Quantized uint8 scales: scale = dequantize_8bit(absmax, nested_absmax, nested_code,
    nested_blocksize) + offset, decoded per block inside the kernel on CPU (no temporaries)."""
    k = cpu_kernels(packed, absmax) if dtype in ref.FLOAT_DTYPES else None
    if k:
        return k.quant.dequantize_4bit(packed, absmax, code, blocksize, shape, dtype, nested)
    return ref.dequantize_4bit_ref(packed, _scales(absmax, nested), code, blocksize, shape, dtype)


def dequantize_4bit_into(out: torch.Tensor, packed, absmax, code, blocksize, nested: Nested | None = None):
    """`dequantize_4bit` into a preallocated tensor (its shape and dtype are the result's), for
    layers that dequantize the same weight every step. Returns `out`."""
    k = cpu_kernels(out, packed, absmax) if out.dtype in ref.FLOAT_DTYPES and out.is_contiguous() else None
    if k:
        return k.quant.dequantize_4bit_into(out, packed, absmax, code, blocksize, nested)
    return out.copy_(ref.dequantize_4bit_ref(packed, _scales(absmax, nested), code, blocksize, out.shape, out.dtype))


def matmul_4bit(x: torch.Tensor, packed, absmax, code, blocksize, shape, nested: Nested | None = None) -> torch.Tensor:
    """x (m, k) · Wᵀ as fp32 (m, n_out), W = the 4-bit weight of `shape` in fp32 (code · scale, no
    16-bit rounding). The CPU kernel reads the codes once for all rows — the decode path for a
    handful of tokens; elsewhere, dequantize in fp32 and multiply."""
    k = cpu_kernels(x, packed, absmax)
    out = k.quant.gemm_4bit(x, packed, absmax, code, blocksize, tuple(shape), nested) if k else None
    if out is not None:
        return out
    w = dequantize_4bit(packed, absmax, code, blocksize, shape, torch.float32, nested)
    return x.float() @ w.t()


def _scales(absmax: torch.Tensor, nested: Nested | None) -> torch.Tensor:
    if nested is None:
        return absmax
    nested_absmax, nested_code, offset, nested_blocksize = nested
    return ref.dequantize_8bit_ref(absmax, nested_absmax, nested_code, nested_blocksize) + offset


def quantize_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """-> (q uint8 shaped like x, absmax fp32 [blocks]); bitsandbytes' CPU semantics."""
    k = cpu_kernels(x, code)
    return k.quant.quantize_8bit(x, code, blocksize) if k else ref.quantize_8bit_ref(x, code, blocksize)


def dequantize_8bit(q, absmax, code, blocksize) -> torch.Tensor:
    """-> fp32 shaped like q"""
    k = cpu_kernels(q, absmax, code)
    return k.quant.dequantize_8bit(q, absmax, code, blocksize) if k else ref.dequantize_8bit_ref(q, absmax, code,
                                                                                                 blocksize)
