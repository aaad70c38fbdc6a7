"""Blockwise absmax quantization: the plain-PyTorch reference that defines qlora's formats.

4-bit (paper section 2, eq. 1): flatten row-major, split into blocks, scale each block by the fp32
reciprocal of its absmax, pick the nearest code (ties to the lower code: strict `>` against fp32
midpoints), pack two codes per byte, first element in the high nibble.

8-bit (Double Quantization of the block scales, 8-bit optimizer states): the same scaling, with
the nearest code found through a 65,536-bin lookup table exactly as bitsandbytes' CPU kernel does,
so that nested scales and optimizer states are byte-identical to bitsandbytes.

Every fast kernel in qlora is tested bit for bit against the functions in this file.
"""

from __future__ import annotations

import functools

import torch

from .codebooks import SIGNED_SCALE_TYPES, code4

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TINY = 1e-38  # bitsandbytes clamps a zero absmax to this before taking the reciprocal


def check_input(w: torch.Tensor, blocksize: int) -> None:
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"cannot quantize a {w.dtype} tensor: use float32, float16 or bfloat16")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not supported; choose one of {BLOCKSIZES}")


def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Per-block max |x| in fp32; raises ValueError on NaN/Inf (they would poison a whole block)."""
    n = flat.numel()
    nblocks = -(-n // blocksize)
    full = (n // blocksize) * blocksize
    absmax = torch.empty(nblocks, dtype=torch.float32, device=flat.device)
    if full:
        absmax[: n // blocksize] = flat[:full].view(-1, blocksize).abs().amax(dim=1).float()
    if full < n:
        absmax[-1] = flat[full:].abs().amax().float()
    if not bool(torch.isfinite(absmax).all()):
        bad = int((~torch.isfinite(absmax)).nonzero()[0, 0])
        raise ValueError(
            f"tensor contains NaN or Inf (first in block {bad}, elements {bad * blocksize}.."
            f"{min(n, (bad + 1) * blocksize) - 1}); fix the weights before quantizing"
        )
    return absmax


@functools.cache
def _bounds_and_order(quant_type: str, device: torch.device, blocksize: int = 64):
    code = code4(quant_type, device, blocksize)
    order = torch.argsort(code, stable=True)  # NF4 is sorted; FP4/Int4 need a remap
    sorted_code = code[order]
    return (sorted_code[:-1] + sorted_code[1:]) / 2, order.to(torch.uint8)


def _scale(flat32: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x * (1/absmax) per block, clamped to [-1, 1]. The ragged last block divides instead of
    multiplying and keeps its clamped absmax, as bitsandbytes does (it changes the last ulp)."""
    n = flat32.numel()
    nfull = n // blocksize
    full = nfull * blocksize
    parts = []
    if nfull:
        inv = 1.0 / absmax[:nfull].clamp(min=_TINY)
        parts.append((flat32[:full].view(nfull, blocksize) * inv[:, None]).reshape(-1))
    if full < n:
        absmax[-1] = absmax[-1].clamp(min=_TINY)
        parts.append(flat32[full:] / absmax[-1])
    scaled = parts[0] if len(parts) == 1 else torch.cat(parts)
    return scaled.clamp_(-1, 1)


def quantize_4bit_ref(w: torch.Tensor, quant_type: str, blocksize: int):
    """Reference 4-bit quantizer. Returns (packed uint8 [(n+1)//2, 1], absmax fp32 [blocks]).
    Signed-scale types (bof4s) store absmax · sign of the block's largest-magnitude value."""
    check_input(w, blocksize)
    if quant_type in SIGNED_SCALE_TYPES:
        return signed_scale_quantize(w, blocksize, lambda v: _quantize_absmax(v, quant_type, blocksize))
    return _quantize_absmax(w, quant_type, blocksize)


def _quantize_absmax(w: torch.Tensor, quant_type: str, blocksize: int):
    flat = w.reshape(-1)
    absmax = block_absmax(flat, blocksize)
    scaled = _scale(flat.float(), absmax, blocksize)
    if scaled.numel() % 2:  # the spare low nibble holds the code of 0.0 (0x7 for NF4)
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    bounds, order = _bounds_and_order(quant_type, w.device, blocksize)
    q = order[torch.bucketize(scaled, bounds)]
    return pack_nibbles(q), absmax


def block_signs(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 [blocks]: the sign of each block's largest-magnitude value (the first one on a tie;
    +1 for a block whose scale is the floor _TINY: its values are all zeros or below 1e-38, and with no
    zero level in bof4s they dequantize to tiny values of either sign, which must re-quantize the same)."""
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat.float(), (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    top = padded.gather(1, padded.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    return torch.where(top < -_TINY, -1.0, 1.0)


def signed_scale_quantize(w: torch.Tensor, blocksize: int, quantize_flipped):
    """Signed absmax (bof4s): flip every block whose largest-magnitude value is negative, quantize
    with the plain absmax (the maximum lands on +1), put the sign into the scale. Exact: negation
    commutes with x · (1/absmax) and with the clamp, so the codes equal those of x / (signed scale)."""
    flat = w.reshape(-1)
    signs = block_signs(flat, blocksize)
    per_elem = signs.repeat_interleave(blocksize)[: flat.numel()].to(w.dtype)
    packed, absmax = quantize_flipped((flat * per_elem).reshape(w.shape))
    return packed, absmax * signs


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes (2m,) -> packed (m, 1); element 2i in the high nibble."""
    q = q.view(-1, 2)
    return ((q[:, 0] << 4) | q[:, 1]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """packed (ceil(n/2), 1) -> uint8 codes (n,)."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n]


def dequantize_4bit_ref(packed, absmax, code, blocksize, shape, dtype) -> torch.Tensor:
    """code[q] * absmax[block] in fp32, then cast to `dtype` (round to nearest even)."""
    n = 1
    for s in shape:
        n *= s
    values = code[unpack_nibbles(packed, n).long()]
    return _apply_scales(values, absmax, blocksize).to(dtype).reshape(shape)


def _apply_scales(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = values.numel()
    nfull = n // blocksize
    full = nfull * blocksize
    out = torch.empty_like(values)
    if nfull:
        out[:full] = (values[:full].view(nfull, blocksize) * absmax[:nfull, None]).reshape(-1)
    if full < n:
        out[full:] = values[full:] * absmax[nfull]
    return out


# ---- 8-bit (Double Quantization, optimizer states) ----

_LUT_SIZE = 65536


@functools.cache
def _lut8(code_key: tuple, device: torch.device) -> torch.Tensor:
    # Bin i covers the value -1 + 2i/65535; each bin stores the index of the nearest code
    # (a value exactly on a midpoint stays with the lower code), as bitsandbytes' CPU kernel.
    code = torch.tensor(code_key, dtype=torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_LUT_SIZE, dtype=torch.float32)
    val = -1.0 + (2.0 * i) / (_LUT_SIZE - 1)
    lut = torch.searchsorted(midpoints, val, side="left")
    return lut.to(torch.uint8).to(device)


def lut8(code: torch.Tensor) -> torch.Tensor:
    return _lut8(tuple(code.cpu().tolist()), code.device)


def quantize_8bit_ref(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Blockwise 8-bit quantization with a sorted 256-entry code (bitsandbytes CPU semantics).
    Returns (q uint8 same shape as x, absmax fp32 [blocks]); an all-zero block codes to 0."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    absmax = block_absmax(flat, blocksize)
    nblocks = absmax.numel()
    padded = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    v = (padded * inv[:, None]).clamp_(-1.0, 1.0)
    # A subnormal absmax makes 1/absmax inf and 0 * inf NaN: bitsandbytes' CPU kernel then
    # gives bin 0 (code 0), so NaN maps to bin 0 here (casting NaN to int is undefined).
    idx = ((v + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).nan_to_num_(0.0).to(torch.int32)
    q = lut8(code)[idx.long()]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n].reshape(x.shape), absmax


def dequantize_8bit_ref(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
    """code[q] * absmax[block] in fp32, same shape as q."""
    values = code[q.reshape(-1).long()]
    return _apply_scales(values, absmax, blocksize).reshape(q.shape)
