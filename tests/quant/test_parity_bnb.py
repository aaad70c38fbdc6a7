"""Parity with bitsandbytes (0.50, CPU): identical packed bytes, block absmax, nested absmax,
offset and dequantized values for nf4 and fp4, with and without Double Quantization, for
fp32/fp16/bf16 and block sizes 64/128/256/4096, through our fast kernels and our reference.

Values compared per run: the grid is 48 configurations x 22,545 elements (shapes 1x1, 3x5,
1x4097, 48x256, 64x96, each from one of 5 value families in rotation) = 1.08 M, checked once per
kernel path (2.2 M), plus a 4096x4096 and a 1024x4096 matrix (21.0 M): 23.2 M values quantized
and dequantized, every byte, scale and output compared.

Where bitsandbytes disagrees with itself, and what we match:
- An all-zero block: bitsandbytes' CPU quantizer (the torch implementation in its default
  backend) scales by 1/1e-38 and stores the code of 0.0 (0x77 for nf4, 0x00 for fp4) with absmax
  0; its CUDA kernel writes 0x00 for nf4. We match the CPU bytes. Either way the block
  dequantizes to exact zeros.
- FP4's two zeros: code 8 (sign bit set) is +0.0 in bitsandbytes' table, built from the integer
  -0. The sorted table holds the two zeros with a midpoint of 0 between them, so a value that
  rounds to zero gets code 0 when <= 0 (-0.0 included) and code 8 when > 0: the sign bit is the
  opposite of the value's sign, and both decode to +0.0 in bitsandbytes' PyTorch definition, as
  here: FP4 never returns -0.0. Its CUDA kernel (per its source) and its scalar CPU kernel decode
  code 8 as 0.0 * -1 = -0.0 instead: the same value, another bit pattern.
- Dequantized values are compared with bitsandbytes' canonical dequantize_4bit, its PyTorch
  definition (the "default" kernel, helpers.bnb_canonical), never with its native CPU kernel,
  which libbitsandbytes_cpu chooses by instruction set at run time: an AVX-512 kernel that (a)
  applies the wrong absmax when a row is not a whole number of blocks and (b) for bf16 rounds
  subnormal fp32 products to zero, and a scalar kernel (every other CPU, and rows whose length is
  not a multiple of 16) that returns -0.0 for FP4 code 8. Those differences are measured, per
  CPU, by tests/quant/test_bnb_native.py.
- Bytes and scales are compared with what bitsandbytes produces, which is the same on every CPU:
  quantize_4bit has no native CPU kernel (its PyTorch definition runs; checked below), and the
  8-bit quantizer behind Double Quantization is one scalar C++ path, without ISA dispatch. That
  8-bit quantizer is not bitsandbytes' PyTorch quantize_blockwise: it searches a lookup table,
  and a value within ~3e-5 (of its block's absmax) of the midpoint between two codes can take the
  farther one. We match the C++ quantizer, which is what bitsandbytes stores on a CPU.
- A block whose absmax is below 2.9e-39 (the "subnormal" family): 1/absmax overflows to inf, so
  its values take the extreme codes (a zero gives NaN and code 15 in 4 bits, bin 0 in 8 bits).
  Odd, but it is what bitsandbytes does, and we match it.
- NaN or Inf: bitsandbytes quantizes them silently; we raise ValueError (tests/quant/test_state.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import qlora
from qlora.quant import kernels
from qlora.quant.codebooks import dynamic_map

from .helpers import FAMILIES, assert_bits_equal, bnb_dequantize_4bit, sample

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((1, 1), (3, 5), (1, 4097), (48, 256), (64, 96))
GRID = list(itertools.product(DTYPES, ("nf4", "fp4"), (64, 128, 256, 4096), (False, True)))
BIG = [((4096, 4096), torch.bfloat16, "nf4", 64, True, "normal"),
       ((1024, 4096), torch.float16, "fp4", 128, False, "heavy")]


@pytest.fixture(params=["fast", "reference"])
def kernel_path(request, monkeypatch):
    monkeypatch.setenv("QLORA_REFERENCE_KERNELS", "1" if request.param == "reference" else "0")
    return request.param


def check_against_bnb(x: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> None:
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    q = qlora.quantize(x, quant_type, blocksize, double_quant)
    what = f"{quant_type} bs={blocksize} dq={double_quant} {x.dtype}{tuple(x.shape)}"
    assert_bits_equal(q.data, packed, f"packed bytes, {what}")
    assert_bits_equal(q.absmax, state.absmax, f"absmax, {what}")
    if double_quant:
        assert_bits_equal(q.nested_absmax, state.state2.absmax, f"nested absmax, {what}")
        assert_bits_equal(q.offset.reshape(1), state.offset.reshape(1).float(), f"offset, {what}")
    assert_bits_equal(qlora.dequantize(q), bnb_dequantize_4bit(packed, state), f"dequantized, {what}")


@pytest.mark.parametrize("dtype,quant_type,blocksize,double_quant", GRID,
                         ids=[f"{str(d)[6:]}-{t}-{b}-{'dq' if q else 'nodq'}" for d, t, b, q in GRID])
def test_parity_grid(kernel_path, dtype, quant_type, blocksize, double_quant):
    i = GRID.index((dtype, quant_type, blocksize, double_quant))
    gen = torch.Generator().manual_seed(i)
    for j, shape in enumerate(SHAPES):  # the families rotate, so every (shape, family) pair occurs
        check_against_bnb(sample(shape, dtype, FAMILIES[(i + j) % len(FAMILIES)], gen), quant_type, blocksize,
                          double_quant)


@pytest.mark.parametrize("shape,dtype,quant_type,blocksize,double_quant,family", BIG,
                         ids=["nf4-bf16-dq-4096x4096", "fp4-fp16-1024x4096"])
def test_parity_large(shape, dtype, quant_type, blocksize, double_quant, family):
    gen = torch.Generator().manual_seed(4096)
    x = sample(shape, dtype, family, gen) * (0.02 if family == "normal" else 1)
    check_against_bnb(x, quant_type, blocksize, double_quant)


def test_bnb_quantize_4bit_is_its_pytorch_definition_on_every_cpu():
    """The premise of comparing bytes with F.quantize_4bit as it runs: no native CPU kernel.
    dequantize_4bit has one (chosen by ISA), hence bnb_canonical for the dequantized values."""
    has_cpu_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    assert not has_cpu_kernel("bitsandbytes::quantize_4bit", "CPU")
    assert has_cpu_kernel("bitsandbytes::dequantize_4bit", "CPU")


def test_parity_covers_ten_million_values():
    grid = len(GRID) * sum(a * b for a, b in SHAPES) * 2  # both kernel paths
    big = sum(s[0][0] * s[0][1] for s in BIG)
    assert grid + big >= 10**7


@pytest.mark.parametrize("quant_type,zero_byte", [("nf4", 0x77), ("fp4", 0x00)])
def test_all_zero_blocks(kernel_path, quant_type, zero_byte):
    x = torch.randn(3 * 64 + 10)
    x[64:128] = 0  # a full zero block
    x[192:] = 0  # the ragged last block (10 elements)
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    q = qlora.quantize(x, quant_type, 64, double_quant=False)
    assert_bits_equal(q.data, packed)
    assert_bits_equal(q.absmax, state.absmax)
    assert q.data[32:64].flatten().tolist() == [zero_byte] * 32
    assert q.absmax[1].item() == 0.0  # a full block keeps absmax 0 ...
    assert q.absmax[3].item() == torch.tensor(1e-38).item()  # ... the ragged one is clamped to 1e-38
    w = qlora.dequantize(q)
    assert bool((w[64:128].view(torch.int32) == 0).all()) and bool((w[192:].view(torch.int32) == 0).all())  # +0.0


def test_fp4_never_returns_negative_zero(kernel_path):
    x = torch.tensor([-0.0, -1e-4, 1e-4, 0.0, -0.003, 1.0] + [0.5] * 58)  # |x| < 0.0026 rounds to zero
    packed, _ = F.quantize_4bit(x, blocksize=64, quant_type="fp4")
    q = qlora.quantize(x, "fp4", 64, double_quant=False)
    assert_bits_equal(q.data, packed)
    assert q.data[:2, 0].tolist() == [0x00, 0x80]  # -0.0, -1e-4 -> code 0; 1e-4 -> code 8; 0.0 -> code 0
    w = qlora.dequantize(q)
    assert w[:4].view(torch.int32).tolist() == [0, 0, 0, 0]
    assert w[4].item() < 0  # -0.003 is nearer -0.0052 than 0


@pytest.mark.parametrize("signed,blocksize", [(True, 256), (True, 2048), (False, 256), (False, 4096)])
def test_8bit_blockwise_matches_bnb(kernel_path, signed, blocksize):
    gen = torch.Generator().manual_seed(blocksize + signed)
    x = torch.cat([sample((50_000,), torch.float32, "heavy", gen), torch.zeros(blocksize),
                   torch.randn(77, generator=gen)])
    x = x if signed else x.abs()
    code = dynamic_map(signed)
    q_bnb, state = F.quantize_blockwise(x, code=F.create_dynamic_map(signed=signed), blocksize=blocksize)
    q, absmax = kernels.quantize_8bit(x, code, blocksize)
    assert_bits_equal(q, q_bnb, "8-bit codes")
    assert_bits_equal(absmax, state.absmax, "8-bit absmax")
    assert_bits_equal(kernels.dequantize_8bit(q, absmax, code, blocksize), F.dequantize_blockwise(q_bnb, state))
