"""Property tests: for any finite input, the dequantized error per element is at most half the
largest codebook gap times the block's absmax; shapes and dtypes survive; quantizing the fp32
dequantized tensor again reproduces the same scales and values.

Inputs avoid block absmaxes below 2.9e-39: there 1/absmax overflows fp32 and, exactly as in
bitsandbytes, the block's codes go to the extremes of the codebook (covered by the parity tests).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qlora
from qlora.quant import QUANT_TYPES, code4

from .helpers import assert_bits_equal, block_scales

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)

magnitudes = st.one_of(st.just(0.0), st.floats(1e-30, 1e30), st.floats(1e-3, 1e3))
values = st.builds(lambda sign, m: sign * m, st.sampled_from([1.0, -1.0]), magnitudes)


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    data = draw(st.lists(values, min_size=1, max_size=700))
    rows = draw(st.sampled_from([d for d in (1, 2, 3, 5, 7) if len(data) % d == 0]))
    fmax = torch.finfo(dtype).max
    return torch.tensor(data, dtype=torch.float64).clamp(-fmax, fmax).reshape(rows, -1).to(dtype)


def _largest_error(quant_type: str, blocksize: int) -> float:
    """Half the largest gap between levels, or the distance from -1 to the lowest level where the
    table stops short of it (bof4s: the block maximum always lands on +1, so values stop above -1)."""
    code = code4(quant_type, "cpu", blocksize).sort().values
    return max(float((code[1:] - code[:-1]).max()) / 2, float(code[0]) + 1)


def _block_view(t: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = t.reshape(-1).double()
    pad = -flat.numel() % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)


@SETTINGS
@given(w=tensors(), quant_type=st.sampled_from(QUANT_TYPES), blocksize=st.sampled_from([32, 64, 128, 4096]),
       double_quant=st.booleans())
def test_error_is_at_most_half_the_largest_gap(w, quant_type, blocksize, double_quant):
    q = qlora.quantize(w, quant_type, blocksize, double_quant)
    x = _block_view(w, blocksize)
    err = (_block_view(qlora.dequantize(q, torch.float32), blocksize) - x).abs()
    absmax = x.abs().amax(dim=1, keepdim=True)
    stored = block_scales(q).double()[:, None].abs()  # = absmax up to DQ's error (bof4s: signed)
    # scaling and the final product each round once in fp32 (2^-23 relative, with margin)
    bound = _largest_error(quant_type, blocksize) * absmax + (stored - absmax).abs() + (absmax + stored) * 2.0**-21
    assert bool((err <= bound).all()), f"worst excess {float((err - bound).max()):.3g}"


@SETTINGS
@given(w=tensors(), quant_type=st.sampled_from(QUANT_TYPES), double_quant=st.booleans(),
       out_dtype=st.sampled_from(DTYPES))
def test_shape_and_dtype_are_preserved(w, quant_type, double_quant, out_dtype):
    q = qlora.quantize(w, quant_type, 64, double_quant)
    assert qlora.dequantize(q).shape == w.shape and qlora.dequantize(q).dtype == w.dtype
    assert qlora.dequantize(q, out_dtype).dtype == out_dtype
    assert q.data.shape == ((w.numel() + 1) // 2, 1) and q.data.dtype == torch.uint8
    assert q.absmax.numel() == math.ceil(w.numel() / 64)


@SETTINGS
@given(w=tensors(), quant_type=st.sampled_from(QUANT_TYPES), blocksize=st.sampled_from([32, 64, 256]))
@example(w=torch.tensor([[1.0, 128.0]]), quant_type="fp4_e3m0", blocksize=32)  # once failed: see below
@example(w=torch.tensor([[0.0]]), quant_type="bof4s", blocksize=32)  # no zero level: zeros -> +-1e-38 * level
def test_requantizing_the_dequantized_tensor_is_a_fixed_point(w, quant_type, blocksize):
    q = qlora.quantize(w, quant_type, blocksize, double_quant=False)
    w1 = qlora.dequantize(q, torch.float32)
    q2 = qlora.quantize(w1, quant_type, blocksize, double_quant=False)
    assert_bits_equal(q2.absmax, q.absmax, "absmax")
    # values, not codes: fp4/int4/fp4_e3m0 hold two codes for zero, and a value just above 0
    # takes the upper one while 0.0 itself takes the lower one
    assert_bits_equal(qlora.dequantize(q2, torch.float32), w1, "dequantized")


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_tiny_positive_value_round_trips_as_plus_zero_in_fp4_e3m0(dtype):
    """[1, 128] in fp4_e3m0: 1/128 lies on the midpoint between 0 and 2^-6, and goes to code 8, a
    zero code. That code used to hold -0.0, which re-quantizes to code 0 (+0.0): the second
    dequantization differed in its sign bit. Both zero codes now dequantize to +0.0."""
    w = torch.tensor([[1.0, 128.0]], dtype=dtype)
    q = qlora.quantize(w, "fp4_e3m0", 32, double_quant=False)
    w1 = qlora.dequantize(q, torch.float32)
    assert q.data.flatten().tolist() == [0x87]  # codes 8 (zero) and 7 (+1.0), as before the fix
    assert_bits_equal(w1, torch.tensor([[0.0, 128.0]]), "dequantized")
    w2 = qlora.dequantize(qlora.quantize(w1, "fp4_e3m0", 32, double_quant=False), torch.float32)
    assert_bits_equal(w2, w1, "re-quantized")
