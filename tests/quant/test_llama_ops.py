"""The one-token decode kernels (csrc/decode_cpu.cpp, gemv*_cpu.cpp, attention_cpu.cpp) against float64
references, in every build (conftest's k):
a 4-bit linear with its LoRA branch equals x · dequantize(W, fp32)ᵀ + b + s·(x·Aᵀ)·Bᵀ with bf16 A
and B up to fp32 summation order; the bf16 GEMV and the one-row attention likewise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora import quant
from qlora.quant.fast.llama_structs import DecodeLinears, block_keys, int8_screen, unblock_keys

from . import probes
from .helpers import block_scales


def _linear(n, k, blocksize=64, double_quant=True, lora=True, bias=True, seed=0, quant_type="nf4"):
    g = torch.Generator().manual_seed(seed)
    q = quant.quantize(torch.randn(n, k, generator=g) * 0.05, quant_type, blocksize, double_quant)
    spec = dict(packed=q.data, absmax=q.absmax, code=q.code, blocksize=blocksize, shape=(n, k), nested=q.nested,
                bias=torch.randn(n, generator=g) if bias else None)
    if lora:
        spec.update(lora_a=torch.randn(8, k, generator=g) * 0.05, lora_b=torch.randn(n, 8, generator=g) * 0.05,
                    scaling=0.5)
    return q, spec


def _expected(q, spec, x):
    """float64: W in fp32 as dequantized, A and B rounded to bf16 (the kernel's copies)."""
    xd = x.double()
    y = quant.dequantize(q, torch.float32).double() @ xd
    if spec["bias"] is not None:
        y = y + spec["bias"].double()
    if "lora_a" in spec:
        a, b = (spec[key].bfloat16().double() for key in ("lora_a", "lora_b"))
        y = y + spec["scaling"] * (b @ (a @ xd))
    return y


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("lora,bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_linear_matches_dequantize_then_matmul(k, double_quant, lora, bias, blocksize):
    q, spec = _linear(40, 384, blocksize, double_quant, lora, bias)
    x = torch.randn(384).bfloat16()
    out = k.llama.decode_linears(DecodeLinears([spec]), x, torch.empty(40))
    torch.testing.assert_close(out.double(), _expected(q, spec, x), rtol=0, atol=5e-5)


@pytest.mark.parametrize("quant_type", ["bof4", "bof4s"])  # other tables; bof4s: signed block scales
@pytest.mark.parametrize("double_quant", [True, False])
def test_linear_with_an_optimal_codebook(k, quant_type, double_quant):
    q, spec = _linear(40, 384, 128, double_quant, quant_type=quant_type)
    assert bool((block_scales(q) < 0).any()) == (quant_type == "bof4s")
    x = torch.randn(384).bfloat16()
    out = k.llama.decode_linears(DecodeLinears([spec]), x, torch.empty(40))
    torch.testing.assert_close(out.double(), _expected(q, spec, x), rtol=0, atol=5e-5)


def test_linears_sharing_an_input_write_one_after_another(k):
    (q1, s1), (q2, s2), (q3, s3) = (_linear(n, 256, seed=i) for i, n in enumerate((64, 16, 48)))
    x = torch.randn(256).bfloat16()
    out = k.llama.decode_linears(DecodeLinears([s1, s2, s3]), x, torch.empty(128))
    expected = torch.cat([_expected(q, s, x) for q, s in ((q1, s1), (q2, s2), (q3, s3))])
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=5e-5)


def test_layouts_the_kernel_cannot_take_are_refused():
    q, spec = _linear(8, 96, blocksize=32)  # 32-weight blocks: the kernel steps 64 at a time
    assert not DecodeLinears.supports((8, 96), 32)
    with pytest.raises(ValueError, match="blocksize"):
        DecodeLinears([spec])
    _, a = _linear(8, 128)
    _, b = _linear(8, 256)
    with pytest.raises(ValueError, match="share their input"):
        DecodeLinears([a, b])


def test_bad_inputs_are_refused(k):
    _, spec = _linear(16, 128)
    specs = DecodeLinears([spec])
    with pytest.raises(ValueError, match="bfloat16"):
        k.llama.decode_linears(specs, torch.randn(128), torch.empty(16))
    with pytest.raises(ValueError, match="float32"):
        k.llama.decode_linears(specs, torch.randn(128).bfloat16(), torch.empty(8))


@pytest.mark.parametrize("n,dim", [(1000, 576), (37, 100), (5, 32)])  # dim 100: a masked tail
def test_bf16_gemv(k, n, dim):
    w, x = torch.randn(n, dim).bfloat16(), torch.randn(dim).bfloat16()
    out = probes.gemv_bf16(k, w, x)
    expected = w.double() @ x.double()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)
    rounded = probes.gemv_bf16(k, w, x, round_bf16=True)
    assert torch.equal(rounded, rounded.bfloat16().float())
    assert (rounded.double() - expected).abs().max() <= expected.abs().max() * 2 ** -8


@pytest.mark.parametrize("heads,kv_heads,dim,length", [(9, 3, 64, 37), (4, 4, 16, 1), (8, 2, 24, 200), (2, 1, 8, 16)])
def test_attention_of_one_row(k, heads, kv_heads, dim, length):
    capacity = -(-(length + 5) // 16) * 16
    q = torch.randn(heads, dim)
    keys, values = torch.randn(kv_heads, capacity, dim).bfloat16(), torch.randn(kv_heads, capacity, dim).bfloat16()
    out = k.llama.decode_attention(q, block_keys(keys), values, length, dim ** -0.5, torch.empty(heads, dim))
    expected = F.scaled_dot_product_attention(
        q.double().view(1, heads, 1, dim), keys[:, :length].double().unsqueeze(0),
        values[:, :length].double().unsqueeze(0), enable_gqa=True).view(heads, dim)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_key_blocks_round_trip():
    keys = torch.randn(3, 37, 8)
    blocked = block_keys(keys)
    assert blocked.shape == (3, 3, 8, 16) and blocked[:, 2, :, 5:].abs().sum() == 0
    assert blocked[1, 1, 4, 3] == keys[1, 16 + 3, 4]
    assert torch.equal(unblock_keys(blocked, 37), keys)


def test_int8_screen_bounds_the_row_error():
    w = torch.randn(300, 96).bfloat16()
    q, scale, err = int8_screen(w, rows=128)
    exact = (w.double() - scale.double()[:, None] * q.double()).norm(dim=1)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert bool((err.double() >= exact).all()) and bool((err.double() <= exact * 1.001 + 1e-12).all())


def test_greedy_head_is_the_argmax_of_the_rounded_logits(k):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5000, 96, generator=g).bfloat16()
    w[4000] = w[17]  # an exact tie: the lower index wins, as torch.argmax picks it
    w[2500] = (w[17].float() * (1 + 2 ** -8)).bfloat16()  # within a bf16 step of the tie
    screen = int8_screen(w)
    for seed in range(20):
        x = torch.randn(96, generator=torch.Generator().manual_seed(seed)).bfloat16()
        if seed % 4 == 0:
            x = (w[17].float() / w[17].float().norm() * 4).bfloat16()  # make row 17 (and its twins) win
        expected = int(probes.gemv_bf16(k, w, x, round_bf16=True).argmax())
        assert k.llama.argmax_gemv_bf16(w, screen, x) == expected


def test_two_lanes_equal_one_bit_for_bit(k):
    """Products of >= 64k weights are split by rows with a helper thread (decode_cpu.cpp): every
    output is one thread's sum in the same order, so the results are identical."""
    from qlora.quant.fast.llama import default_decode_threads

    _, spec = _linear(1000, 576, seed=3)  # split at row 496; the last LoRA block is partial
    linears = DecodeLinears([spec])
    w = torch.randn(3000, 576, generator=torch.Generator().manual_seed(4)).bfloat16()
    screen = int8_screen(w)
    g = torch.Generator().manual_seed(5)
    q, keys = torch.randn(8, 64, generator=g), torch.randn(2, 208, 64, generator=g).bfloat16()
    values = torch.randn(2, 208, 64, generator=g).bfloat16()  # 8 heads x 200 positions x 64: split by heads
    outs = []
    try:
        for lanes in (1, 2):
            k.llama.decode_threads(lanes)
            for seed in range(3):
                x = torch.randn(576, generator=torch.Generator().manual_seed(seed)).bfloat16()
                outs.append((k.llama.decode_linears(linears, x, torch.empty(1000)), probes.gemv_bf16(k, w, x),
                             k.llama.argmax_gemv_bf16(w, screen, x),
                             k.llama.decode_attention(q, block_keys(keys), values, 200, 0.125, torch.empty(8, 64))))
    finally:
        k.llama.decode_threads(default_decode_threads())
    for one, two in zip(outs[:3], outs[3:]):
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]) and one[2] == two[2]
        assert torch.equal(one[3], two[3])
