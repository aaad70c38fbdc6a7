"""The one place that picks an implementation for each quantized op.

`blockwise.py` is the definition; a fast kernel may replace an op here only if it is tested bit
for bit against the reference (tests/quant/test_kernels.py). Set QLORA_REFERENCE_KERNELS=1 to force
the reference everywhere (debugging, and the parity tests themselves).
"""

from __future__ import annotations

import torch

from . import blockwise as ref


def quantize_4bit(w: torch.Tensor, quant_type: str, blocksize: int):
    return ref.quantize_4bit_ref(w, quant_type, blocksize)


def dequantize_4bit(packed, absmax, code, blocksize, shape, dtype) -> torch.Tensor:
    return ref.dequantize_4bit_ref(packed, absmax, code, blocksize, shape, dtype)


def quantize_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    return ref.quantize_8bit_ref(x, code, blocksize)


def dequantize_8bit(q, absmax, code, blocksize) -> torch.Tensor:
    return ref.dequantize_8bit_ref(q, absmax, code, blocksize)
