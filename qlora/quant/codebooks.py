"""Codebooks: the one copy of every quantization table in qlora (fp32, exact).

4-bit tables have 16 entries indexed by the 4-bit code; 8-bit dynamic maps have 256 entries
indexed by the byte. Values follow bitsandbytes bit for bit so packed weights are interchangeable.
"""

from __future__ import annotations

import functools

import torch

from .optimal import BOF4_TABLES, OPTIMAL_TYPES

# NF4 (QLoRA paper, section 3): 16 levels at normal quantiles, exact zero, normalized to [-1, 1].
# Written once as data; `derive_nf4()` rebuilds it from the normal quantiles and tests compare.
NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 E2M1 in bitsandbytes' bit order (code & 0b1000 is the sign), divided by the max (12).
# Index 8 holds +0.0, not -0.0: bitsandbytes builds it from the integer -0.
_FP4_E2M1_RAW = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

# FP4 E3M0: sign bit + 3 exponent bits, no mantissa; exponent field 0 is zero, e -> 2^(e-7).
# Index 8 holds +0.0, as in FP4 above: with -0.0 there, the quantizer (nearest value, ties to the
# lower code) sent tiny positive values to code 8, so they came back as -0.0 and re-quantized to
# code 0 (+0.0) - a dequantize/quantize round trip that changed bits.
_FP4_E3M0_RAW = tuple(
    s * 2.0 ** (e - 7) if e else 0.0 for s in (1.0, -1.0) for e in range(8)
)

# Symmetric Int4 as bitsandbytes' get_4bit_type("int4"): code i -> (7 - i)/7, then -(i - 8)/7.
_INT4_RAW = (7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7)

NF4_OFFSET = 0.9677083  # outermost quantile used by the NF4 construction (paper, eq. 4)

QUANT_TYPES = ("nf4", "fp4", "fp4_e3m0", "int4", *OPTIMAL_TYPES)
# Types whose block scale is the signed largest-magnitude value (it maps to +1), not the absmax
SIGNED_SCALE_TYPES = ("bof4s",)


@functools.cache
def _code4_cpu(quant_type: str, blocksize: int) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4, dtype=torch.float32)
    if quant_type in OPTIMAL_TYPES:  # derived per block size: the normalised density depends on it
        table = BOF4_TABLES[quant_type].get(blocksize)
        if table is None:
            sizes = sorted(BOF4_TABLES[quant_type])
            raise ValueError(f"{quant_type} has tables for block sizes {sizes}, not {blocksize}")
        return torch.tensor(table, dtype=torch.float32)
    raw = {"fp4": _FP4_E2M1_RAW, "fp4_e3m0": _FP4_E3M0_RAW, "int4": _INT4_RAW}.get(quant_type)
    if raw is None:
        raise ValueError(f"unknown quant_type {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")
    data = torch.tensor(raw, dtype=torch.float32)
    return data.div_(data.abs().max())


def code4(quant_type: str, device: torch.device | str = "cpu", blocksize: int = 64) -> torch.Tensor:
    """The 16-entry fp32 table of a 4-bit data type (index = 4-bit code) for blocks of `blocksize`
    (only bof4/bof4s depend on it). A fresh copy: a caller that edits its tensor in place (state
    dicts are mutable) must not change the format."""
    return _code4_cpu(quant_type, blocksize if quant_type in OPTIMAL_TYPES else 0).to(device, copy=True)


def derive_nf4(offset: float = NF4_OFFSET) -> torch.Tensor:
    """NF4 from first principles (paper section 3): 8 positive and 7 negative normal quantiles
    between `offset` and 0.5, plus an exact zero, normalized by the largest value.

    Mirrors the published construction step by step (quantile grid in fp32, inverse normal CDF in
    fp64, table in fp32) so the result equals `NF4` bit for bit."""
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float()
    values = values.sort().values
    return values / values.max()


@functools.cache
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    # Dettmers 2015 "8-bit approximations": a sign bit, a unary-coded decimal exponent and a
    # linear fraction whose width shrinks as the exponent grows. Same float ops as bitsandbytes.
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else (
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(signed: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry 8-bit dynamic map (sorted). Signed: Double Quantization and Adam's first
    moment; unsigned: Adam's second moment."""
    return _dynamic_map_cpu(signed).to(device, copy=True)  # a fresh copy, as code4()
