"""matmul_4bit (csrc/gemm4_cpu.cpp qlora_gemm_4bit): x · Wᵀ straight from the 4-bit codes equals
x · dequantize(W, fp32)ᵀ up to fp32 summation order, in every build (conftest's k), with and
without Double Quantization, for every row count the kernel groups (8, 4, 2, 1), whatever torch's
thread count."""

from __future__ import annotations

import pytest
import torch

from qlora import quant
from qlora.nn import Linear4bit
from qlora.quant import kernels
from qlora.quant.state import NESTED_BLOCKSIZE


def _q(shape, quant_type="nf4", double_quant=True, blocksize=64):
    torch.manual_seed(0)
    q = quant.quantize(torch.randn(shape) * 0.05, quant_type, blocksize, double_quant)
    nested = (q.nested_absmax, q.nested_code, q.offset, NESTED_BLOCKSIZE) if double_quant else None
    return q, nested


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 13, 16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_matches_dequantize_then_matmul(k, rows, double_quant):
    q, nested = _q((96, 320), "nf4", double_quant)
    x = torch.randn(rows, 320)
    out = k.quant.gemm_4bit(x, q.data, q.absmax, q.code, q.blocksize, tuple(q.shape), nested)
    expected = x.double() @ quant.dequantize(q, torch.float32).double().t()
    assert out.shape == (rows, 96) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)


# bof4/bof4s: per-block-size tables, and bof4s' negative (signed) scales through the same kernel
@pytest.mark.parametrize("quant_type,blocksize",
                         [("fp4", 32), ("int4", 128), ("bof4", 64), ("bof4s", 32), ("bof4s", 128)])
def test_other_codebooks_and_blocksizes(k, quant_type, blocksize):
    q, nested = _q((40, 256), quant_type, True, blocksize)
    x = torch.randn(5, 256)
    out = k.quant.gemm_4bit(x, q.data, q.absmax, q.code, q.blocksize, tuple(q.shape), nested)
    expected = x.double() @ quant.dequantize(q, torch.float32).double().t()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)


def test_result_does_not_depend_on_thread_count(k):
    q, nested = _q((1024, 512))
    x = torch.randn(3, 512)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = k.quant.gemm_4bit(x, q.data, q.absmax, q.code, 64, tuple(q.shape), nested)
        torch.set_num_threads(2)
        two = k.quant.gemm_4bit(x, q.data, q.absmax, q.code, 64, tuple(q.shape), nested)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_layouts_it_cannot_take_fall_back(k, monkeypatch):
    q, nested = _q((8, 100), blocksize=64)  # blocks straddle rows
    x = torch.randn(2, 100)
    assert k.quant.gemm_4bit(x, q.data, q.absmax, q.code, 64, tuple(q.shape), nested) is None
    expected = x @ quant.dequantize(q, torch.float32).t()
    torch.testing.assert_close(kernels.matmul_4bit(x, q.data, q.absmax, q.code, 64, q.shape, nested), expected)


def test_linear4bit_decodes_through_it_without_grad():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    layer = Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)
    w32 = layer.dequantized_weight(torch.float32)
    x = torch.randn(1, 3, 256, dtype=torch.bfloat16)  # 3 tokens: the decode path
    with torch.no_grad():
        y = layer(x)
    expected = (x.float() @ w32.t() + layer.bias.float()).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.shape == (1, 3, 64)
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2)
    long = torch.randn(1, 40, 256, dtype=torch.bfloat16)  # prefill: dequantize + bf16 matmul, as in training
    with torch.no_grad():
        assert torch.equal(layer(long), torch.nn.functional.linear(long, layer.dequantized_weight(), layer.bias))
