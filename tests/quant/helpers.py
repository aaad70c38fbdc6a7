"""Shared by the quantization tests: bit-pattern views and the value families inputs come from."""

from __future__ import annotations

import torch

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.uint8: torch.uint8}

# normal weights, heavy tails (Cauchy: a few outliers set each block's scale), values near the
# bottom of the dtype's range (many subnormal inputs), subnormal block absmaxes (1/absmax
# overflows to inf), and values near the top of the range.
FAMILIES = ("normal", "heavy", "tiny", "subnormal", "huge")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Same-width integer view, so that equality is bit equality (+0.0 != -0.0)."""
    return t.contiguous().view(_INT_VIEW[t.dtype])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    diff = bits(a) != bits(b)
    if bool(diff.any()):
        first = int(diff.reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int(diff.sum())} of {a.numel()} differ, first at flat index {first}")


def sample(shape, dtype: torch.dtype, family: str, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    fi = torch.finfo(dtype)
    if family == "heavy":
        x = x / torch.randn(shape, generator=gen, dtype=torch.float64).abs().clamp(min=1e-6)
    elif family == "tiny":
        x = x * fi.tiny * 4
    elif family == "subnormal":
        x = x * fi.tiny / 64
    elif family == "huge":  # 1e30 keeps the fp32 mean of many block absmaxes finite (Double Quantization)
        x = x * min(fi.max / 8, 1e30)
    elif family != "normal":
        raise ValueError(family)
    return x.clamp(-fi.max, fi.max).to(dtype)
