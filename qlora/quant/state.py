"""QuantizedTensor: a 4-bit weight with its scales, and its bitsandbytes state-dict layout.

Double Quantization (paper section 3): the fp32 block absmaxes c2 are themselves quantized,
    offset = mean(c2);  (c2 - offset) -> 8-bit signed dynamic map in blocks of 256 (fp32 scale c1)
    c2[b] = code8[q[b]] * c1[b // 256] + offset
which takes the scale overhead from 32/64 = 0.5 to 8/64 + 32/(64*256) ~= 0.127 bits per parameter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from . import kernels
from .blockwise import FLOAT_DTYPES, check_input
from .codebooks import QUANT_TYPES, code4, dynamic_map
from .spec import DEFAULT

NESTED_BLOCKSIZE = 256


@dataclass
class QuantizedTensor:
    """Everything needed to rebuild a tensor from its 4-bit codes."""

    data: torch.Tensor  # packed uint8 codes, shape ((n + 1) // 2, 1), first element in high nibble
    absmax: torch.Tensor  # fp32 [blocks]; uint8 [blocks] when double-quantized
    shape: torch.Size
    dtype: torch.dtype  # dtype of the original tensor
    quant_type: str
    blocksize: int
    code: torch.Tensor  # fp32 [16]
    offset: torch.Tensor | None = None  # fp32 [1], DQ only
    nested_absmax: torch.Tensor | None = None  # fp32 [ceil(blocks / 256)], DQ only
    nested_code: torch.Tensor | None = None  # fp32 [256], DQ only

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def nested(self):
        """(nested_absmax, nested_code, offset, NESTED_BLOCKSIZE) under Double Quantization, else
        None: the `nested` argument of the kernels' 4-bit ops."""
        return (self.nested_absmax, self.nested_code, self.offset, NESTED_BLOCKSIZE) if self.double_quant else None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def to(self, device) -> "QuantizedTensor":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedTensor(
            move(self.data), move(self.absmax), self.shape, self.dtype, self.quant_type, self.blocksize,
            move(self.code), move(self.offset), move(self.nested_absmax), move(self.nested_code),
        )

    def nbytes(self) -> int:
        tensors = (self.data, self.absmax, self.offset, self.nested_absmax)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantize(w: torch.Tensor, quant_type: str = DEFAULT.quant_type, blocksize: int = DEFAULT.blocksize,
             double_quant: bool = DEFAULT.double_quant) -> QuantizedTensor:
    """Quantize any float tensor to 4 bits (bitsandbytes-identical bytes for nf4/fp4)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")
    check_input(w, blocksize)
    data, absmax = kernels.quantize_4bit(w.detach(), quant_type, blocksize)
    q = QuantizedTensor(data, absmax, w.shape, w.dtype, quant_type, blocksize, code4(quant_type, w.device, blocksize))
    if double_quant:
        q.offset = absmax.mean().reshape(1)
        if not bool(torch.isfinite(q.offset)):  # fp32 sum of block absmaxes overflowed
            mean = absmax.double().mean().item()
            raise ValueError(f"double quantization overflows float32: the block absmaxes average {mean:.3g}; "
                             "quantize with double_quant=False or rescale the tensor")
        q.nested_code = dynamic_map(signed=True, device=w.device)
        q.absmax, q.nested_absmax = kernels.quantize_8bit(absmax - q.offset, q.nested_code, NESTED_BLOCKSIZE)
    return q


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild the tensor: code[q] * absmax in fp32, cast to `dtype` (default: the original)."""
    dtype = dtype or q.dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"cannot dequantize to {dtype}: use float32, float16 or bfloat16")
    # Double-quantized scales are decoded inside the kernel, block by block (no fp32 temporaries)
    return kernels.dequantize_4bit(q.data, q.absmax, q.code, q.blocksize, q.shape, dtype, q.nested)


def bits_per_parameter(q: QuantizedTensor) -> float:
    """Stored bits per element: codes + block scales (+ nested scales and offset under DQ).
    The 16/256-entry codebooks are format constants and not counted."""
    return q.nbytes() * 8 / q.numel


# ---- bitsandbytes state-dict layout ----


def to_state_dict(q: QuantizedTensor, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The keys and bytes bitsandbytes' Linear4bit writes (`quant_state.bitsandbytes__<type>`
    carries the non-tensor fields as a JSON blob in a uint8 tensor, keys in bitsandbytes' order)."""
    sd = {prefix: q.data, f"{prefix}.absmax": q.absmax, f"{prefix}.quant_map": q.code}
    meta = {
        "quant_type": q.quant_type,
        "blocksize": q.blocksize,
        "dtype": str(q.dtype).removeprefix("torch."),
        "shape": list(q.shape),
    }
    if q.double_quant:
        sd[f"{prefix}.nested_absmax"] = q.nested_absmax
        sd[f"{prefix}.nested_quant_map"] = q.nested_code.clone()
        meta.update(
            nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=q.offset.item()
        )
    blob = json.dumps(meta).encode("utf-8")
    sd[f"{prefix}.quant_state.bitsandbytes__{q.quant_type}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return sd


def from_state_dict(sd: dict[str, torch.Tensor], prefix: str = "weight") -> QuantizedTensor:
    """Inverse of `to_state_dict`; also reads state dicts written by bitsandbytes/transformers."""
    marker = f"{prefix}.quant_state.bitsandbytes__"
    keys = [k for k in sd if k.startswith(marker)]
    if len(keys) != 1:
        raise ValueError(f"expected exactly one '{marker}<type>' key in the state dict, found {len(keys)}")
    try:
        meta = json.loads(bytes(sd[keys[0]].cpu().numpy().astype("uint8")).decode("utf-8"))
        quant_type, blocksize = meta["quant_type"], int(meta["blocksize"])
        dtype = getattr(torch, meta["dtype"])
        shape = torch.Size(meta["shape"])
        data, absmax, code = sd[prefix], sd[f"{prefix}.absmax"], sd[f"{prefix}.quant_map"]
    except (KeyError, ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"malformed 4-bit state for '{prefix}': {type(e).__name__}: {e}") from None
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"'{keys[0]}': unknown quant_type {quant_type!r}")
    n = shape.numel()
    if data.dtype != torch.uint8 or data.numel() != (n + 1) // 2:
        raise ValueError(f"'{prefix}': expected {(n + 1) // 2} packed uint8 bytes for shape {list(shape)}, "
                         f"got {data.numel()} {data.dtype}")
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(f"'{prefix}.absmax': expected {-(-n // blocksize)} block scales, got {absmax.numel()}")
    q = QuantizedTensor(data.reshape(-1, 1), absmax, shape, dtype, quant_type, blocksize, code.float())
    if f"{prefix}.nested_absmax" in sd:
        q.nested_absmax = sd[f"{prefix}.nested_absmax"].float()
        q.nested_code = sd[f"{prefix}.nested_quant_map"].float()
        q.offset = torch.tensor([float(meta["nested_offset"])], dtype=torch.float32, device=absmax.device)
    return q
