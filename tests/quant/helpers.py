"""Shared by the quantization tests: bit-pattern views and the value families inputs come from."""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.uint8: torch.uint8}

# normal weights, heavy tails (Cauchy: a few outliers set each block's scale), values near the
# bottom of the dtype's range (many subnormal inputs), subnormal block absmaxes (1/absmax
# overflows to inf), and values near the top of the range.
FAMILIES = ("normal", "heavy", "tiny", "subnormal", "huge")


def block_scales(q) -> torch.Tensor:
    """The fp32 scale of each block, Double Quantization undone: what the codes are multiplied by."""
    from qlora.quant import kernels

    if q.nested is None:
        return q.absmax
    nested_absmax, nested_code, offset, nested_blocksize = q.nested
    return kernels.dequantize_8bit(q.absmax, nested_absmax, nested_code, nested_blocksize) + offset


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


# ---- bitsandbytes' canonical semantics: the same on every CPU ----
#
# bitsandbytes 0.50 gives each op a "default" kernel written in PyTorch (its reference semantics,
# registered under CompositeExplicitAutograd) and, for some ops, a native CPU kernel that overrides
# it. Of the ops these tests reach, only dequantize_4bit's native CPU kernel depends on the
# instruction set: libbitsandbytes_cpu picks, at run time, an AVX-512 kernel or a scalar one, and
# each differs from the default in its own way (tests/quant/test_bnb_native.py measures how).
# quantize_4bit has no CPU kernel (its default runs on every CPU), and the 8-bit quantize_blockwise /
# dequantize_blockwise (Double Quantization's scales) have one scalar C++ code path with no ISA
# dispatch; those are compared as bitsandbytes runs them.


def bnb_default_op(name: str):
    """bitsandbytes' default (pure PyTorch) kernel of torch.ops.bitsandbytes.<name>, bypassing a
    native CPU kernel. Call it inside bnb_canonical() to keep torch.compile out of it."""
    op = getattr(torch.ops.bitsandbytes, name).default
    return functools.partial(op._op_dk, torch._C.DispatchKey.CompositeExplicitAutograd)


@contextlib.contextmanager
def bnb_canonical():
    """Within this block, bitsandbytes' dequantize_4bit on a CPU tensor runs its default kernel (the
    PyTorch definition) instead of the native kernel chosen by the CPU's instruction set, so that
    F.dequantize_4bit, bnb.nn.Linear4bit and models loaded with BitsAndBytesConfig give the same
    bits on every CPU. The default kernel runs eagerly: bitsandbytes wraps it in torch.compile,
    which would recompile for every new shape and dtype (seconds each) for the same values."""
    import bitsandbytes.backends.default.ops as default_ops

    compute = default_ops._dequantize_4bit_compute
    lib = torch.library.Library("bitsandbytes", "IMPL")
    try:
        with warnings.catch_warnings():  # "Overriding a previously registered kernel": intended
            warnings.simplefilter("ignore")
            lib.impl("dequantize_4bit", bnb_default_op("dequantize_4bit"), "CPU")
        default_ops._dequantize_4bit_compute = getattr(compute, "__wrapped__", compute)
        yield
    finally:
        default_ops._dequantize_4bit_compute = compute
        lib._destroy()  # the native kernel is the CPU kernel again


def bnb_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes.functional.dequantize_4bit with bitsandbytes' canonical (default-kernel) semantics."""
    import bitsandbytes.functional as F

    with bnb_canonical():
        return F.dequantize_4bit(packed, state)
