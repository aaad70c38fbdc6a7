"""Bindings for quantization (users: quant/kernels.py, and the llama step's weight descriptions):
blockwise 4-bit and 8-bit quantize/dequantize, bit-identical to blockwise.py, and the 4-bit product
x · Wᵀ that reads the codes once for a few rows (csrc/quant4_cpu.cpp, quant8_cpu.cpp, gemm4_cpu.cpp).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from .. import blockwise as ref

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # enum Dtype in the .cpp
_HUGEPAGE_MIN_BYTES = 1 << 23  # 4 huge pages; smaller buffers usually come back from malloc's free lists


@functools.cache
def _code4_tables(quant_type: str, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    bounds, order = ref._bounds_and_order(quant_type, torch.device("cpu"), blocksize)
    # the SIMD kernel skips the clamp to [-1, 1], which is exact only while no bound reaches +-1
    if not bool(((bounds > -1) & (bounds < 1)).all()):
        raise ValueError(f"{quant_type}: codebook midpoints must lie strictly inside (-1, 1)")
    return bounds.contiguous(), order.contiguous()


@functools.cache
def _padded_lut8(code_key: tuple) -> torch.Tensor:
    # the AVX-512 kernel gathers 32 bits at byte offset idx, so the table needs 3 spare bytes
    lut = ref.lut8(torch.tensor(code_key, dtype=torch.float32))
    return torch.cat([lut, torch.zeros(4, dtype=torch.uint8)])


def _nonfinite(flat: torch.Tensor, blocksize: int) -> ValueError:
    """The reference's own error for a NaN/Inf (the kernel only reports that one exists)."""
    try:
        ref.block_absmax(flat, blocksize)
    except ValueError as e:
        return e
    return ValueError("tensor contains NaN or Inf; fix the values before quantizing")


def _scale_args(absmax: torch.Tensor, nested) -> tuple[tuple, float, int]:
    """The block-scale arguments of the 4-bit kernels: (absmax fp32, qabsmax, nested_absmax, code8)
    with the unused ones None, the DQ offset and the nested block size."""
    if nested is None:
        return (absmax.float().contiguous(), None, None, None), 0.0, 1
    nested_absmax, nested_code, offset, nested_bs = nested
    return ((None, absmax.contiguous(), nested_absmax.float().contiguous(), nested_code.float().contiguous()),
            float(offset), nested_bs)


class QuantizeOps:
    """The quantization entry points with the signatures of blockwise.py (CPU tensors only)."""

    def __init__(self, lib: ctypes.CDLL):
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        lib.qlora_advise_hugepages.argtypes = [p, i64]
        lib.qlora_quantize_4bit.argtypes = [p, i32, i64, i64, p, p, p, p, i32]
        lib.qlora_quantize_4bit.restype = i64
        lib.qlora_dequantize_4bit.argtypes = [p, p, p, p, p, f32, i64, p, i64, i64, p, i32, i32]
        lib.qlora_quantize_8bit.argtypes = [p, i64, i64, p, p, p, i32]
        lib.qlora_quantize_8bit.restype = i64
        lib.qlora_dequantize_8bit.argtypes = [p, p, p, i64, i64, p, i32]
        lib.qlora_gemm_4bit.argtypes = [p, i64, i64, p, p, p, p, p, f32, i64, p, i64, i64, p, i32]
        self._lib = lib

    def _empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """torch.empty for an output the kernel fills; 2 MiB pages when it spans several (a fresh
        32 MiB tensor took 35 ms of 4 KiB page faults here, 8 ms with 2 MiB pages)."""
        t = torch.empty(shape, dtype=dtype)
        nbytes = t.numel() * t.element_size()
        if nbytes >= _HUGEPAGE_MIN_BYTES:
            self._lib.qlora_advise_hugepages(t.data_ptr(), nbytes)
        return t

    def quantize_4bit(self, w: torch.Tensor, quant_type: str, blocksize: int):
        ref.check_input(w, blocksize)
        if quant_type in ref.SIGNED_SCALE_TYPES:  # the kernel quantizes the sign-flipped blocks
            return ref.signed_scale_quantize(w, blocksize, lambda v: self._quantize_absmax(v, quant_type, blocksize))
        return self._quantize_absmax(w, quant_type, blocksize)

    def _quantize_absmax(self, w: torch.Tensor, quant_type: str, blocksize: int):
        x = w.detach().contiguous().reshape(-1)
        n, nblocks = x.numel(), -(-x.numel() // blocksize)
        bounds, order = _code4_tables(quant_type, blocksize)
        packed = self._empty(((n + 1) // 2, 1), torch.uint8)
        absmax = torch.empty(nblocks, dtype=torch.float32)
        bad = self._lib.qlora_quantize_4bit(x.data_ptr(), _DTYPE_CODES[x.dtype], n, blocksize, bounds.data_ptr(),
                                            order.data_ptr(), packed.data_ptr(), absmax.data_ptr(),
                                            torch.get_num_threads())
        if bad < nblocks:
            raise _nonfinite(x, blocksize)
        return packed, absmax

    def dequantize_4bit(self, packed, absmax, code, blocksize, shape, dtype, nested=None) -> torch.Tensor:
        return self.dequantize_4bit_into(self._empty(shape, dtype), packed, absmax, code, blocksize, nested)

    def dequantize_4bit_into(self, out, packed, absmax, code, blocksize, nested=None) -> torch.Tensor:
        """Write code[q] * block scale into `out` (contiguous fp32/fp16/bf16, one element per
        code) in one pass. `nested` = (nested_absmax, nested_code, offset, nested_blocksize) when
        `absmax` holds double-quantized uint8 scales: they are decoded per block on the fly."""
        n = out.numel()
        nblocks = -(-n // blocksize)
        if out.dtype not in _DTYPE_CODES or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32/float16/bfloat16 tensor, got {out.dtype}")
        if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
            raise ValueError(f"expected {(n + 1) // 2} packed uint8 bytes for {n} elements, "
                             f"got {packed.numel()} {packed.dtype}")
        if absmax.numel() != nblocks or code.numel() != 16:
            raise ValueError(f"expected {nblocks} block scales and a 16-entry codebook, "
                             f"got {absmax.numel()} and {code.numel()}")
        packed, code = packed.contiguous(), code.float().contiguous()
        if nested is not None:
            nested_absmax, nested_code, _, nested_bs = nested
            nested_blocks = -(-nblocks // nested_bs)
            if absmax.dtype != torch.uint8 or nested_absmax.numel() != nested_blocks or nested_code.numel() != 256:
                raise ValueError(f"double-quantized scales: expected {nblocks} uint8 codes, {nested_blocks} "
                                 f"nested scales and a 256-entry nested code, got {absmax.numel()} {absmax.dtype}, "
                                 f"{nested_absmax.numel()} and {nested_code.numel()}")
        scales, offset, nested_bs = _scale_args(absmax, nested)  # keeps converted copies alive for the call
        self._lib.qlora_dequantize_4bit(packed.data_ptr(), *(None if t is None else t.data_ptr() for t in scales),
                                        offset, nested_bs, code.data_ptr(), n, blocksize, out.data_ptr(),
                                        _DTYPE_CODES[out.dtype], torch.get_num_threads())
        return out

    def quantize_8bit(self, x: torch.Tensor, code: torch.Tensor, blocksize: int):
        if blocksize < 1:
            raise ValueError(f"blocksize must be positive, got {blocksize}")
        flat = x.detach().reshape(-1).float().contiguous()
        n, nblocks = flat.numel(), -(-flat.numel() // blocksize)
        lut = _padded_lut8(tuple(code.tolist()))
        q = self._empty(x.shape, torch.uint8)
        absmax = torch.empty(nblocks, dtype=torch.float32)
        bad = self._lib.qlora_quantize_8bit(flat.data_ptr(), n, blocksize, lut.data_ptr(), q.data_ptr(),
                                            absmax.data_ptr(), torch.get_num_threads())
        if bad < nblocks:
            raise _nonfinite(flat, blocksize)
        return q, absmax

    def dequantize_8bit(self, q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
        n = q.numel()
        if q.dtype != torch.uint8 or absmax.numel() != -(-n // blocksize) or code.numel() != 256:
            raise ValueError(f"expected uint8 codes, {-(-n // blocksize)} block scales and a 256-entry code, "
                             f"got {q.dtype}, {absmax.numel()} and {code.numel()}")
        q, absmax, code = q.contiguous(), absmax.float().contiguous(), code.float().contiguous()
        out = self._empty(q.shape, torch.float32)
        self._lib.qlora_dequantize_8bit(q.data_ptr(), absmax.data_ptr(), code.data_ptr(), n, blocksize,
                                        out.data_ptr(), torch.get_num_threads())
        return out

    def gemm_4bit(self, x, packed, absmax, code, blocksize, shape, nested=None) -> torch.Tensor | None:
        """x (m, k) · Wᵀ in fp32 for a 4-bit W of `shape` (n_out, k), reading the codes once for all m
        rows (decoding). None when the layout does not allow it (k % blocksize or blocksize % 16)."""
        n_out, k = shape
        if x.dim() != 2 or x.shape[1] != k or k % blocksize or blocksize % 16:
            return None
        x = x.float().contiguous()
        code = code.float().contiguous()
        scales, offset, nested_bs = _scale_args(absmax, nested)
        out = torch.empty(x.shape[0], n_out, dtype=torch.float32)
        self._lib.qlora_gemm_4bit(x.data_ptr(), x.shape[0], k, packed.contiguous().data_ptr(),
                                  *(None if t is None else t.data_ptr() for t in scales), offset, nested_bs,
                                  code.data_ptr(), n_out, blocksize, out.data_ptr(), torch.get_num_threads())
        return out
