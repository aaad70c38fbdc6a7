"""The AVX2 kernels equal the portable scalar kernels byte for byte, for every kernel that sums or
uses exp: the 4-bit matmul, the decode GEMVs (4-bit with LoRA, bf16, the int8 head screen), decode
attention, exp, RMSNorm, SwiGLU, cross-entropy rows and a whole llama decode step.

Both are built from the same code over csrc/simd16.h, whose scalar version defines the order of
every sum (16 lanes, fused where the AVX-512 kernels fuse, _mm512_reduce_add_ps's tree); the AVX2
version must reproduce it exactly. Shapes are ragged on purpose (d, v, n, k, T not multiples of 16)
and inputs include NaN, Inf and subnormals. (Quantization, dequantization and dropout are checked
bit for bit against the PyTorch reference in every build: test_kernels.py, tests/nn/test_dropout.py.)

"Byte for byte" with one exception: two NaNs are equal whatever their sign and payload. x86
creates 0xffc00000 for 0 * inf and keeps one operand's NaN when two meet, and the compiler is free
to swap the operands of an add or an FMA; IEEE 754 does not fix those bits either.

The "native" build is compared too where it is not AVX-512 (an AVX-512 build has its own kernels,
checked against references within tolerance in test_llama_ops.py, test_gemm.py, tests/nn).
"""

from __future__ import annotations

import pytest
import torch

from qlora import quant
from qlora.quant.fast.llama_structs import DecodeLinears, block_keys, int8_screen

from conftest import kernel_build  # tests/conftest.py (tests/ is on sys.path: rootdir-style imports)
from . import probes
from .helpers import bits


@pytest.fixture(scope="module")
def portable():
    return kernel_build("portable")


@pytest.fixture(scope="module", params=["avx2", "native"])
def simd(request):
    built = kernel_build(request.param)
    if built.isa.startswith("avx512"):
        pytest.skip(f"the native build is {built.isa}: its own kernels, compared within tolerance elsewhere")
    if built.isa == "scalar":
        pytest.skip("the native build is the scalar one here")
    return built


def same(a, b, what: str = "") -> None:
    """Equal bits, or both NaN (see the module docstring)."""
    if isinstance(a, (int, float)):
        a, b = torch.tensor([a]), torch.tensor([b])
    assert a.dtype == b.dtype and a.shape == b.shape, what
    differ = bits(a) != bits(b)
    if a.is_floating_point():
        differ &= ~(a.isnan() & b.isnan())
    if bool(differ.any()):
        i = int(differ.reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int(differ.sum())} of {a.numel()} differ, first at {i}: "
                             f"{a.reshape(-1)[i].item()!r} vs {b.reshape(-1)[i].item()!r}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _specials(t: torch.Tensor, gen: torch.Generator, count: int = 6) -> torch.Tensor:
    """t with a few NaN, +-Inf, subnormal and signed-zero values at random places."""
    flat = t.reshape(-1)
    values = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40, -0.0, 3e-39], dtype=torch.float32)
    for i in torch.randint(0, flat.numel(), (count,), generator=gen).tolist():
        flat[i] = values[i % len(values)].to(t.dtype)
    return t


# ---- the 4-bit matmul and the decode products ---------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
def test_gemm_4bit(simd, portable, double_quant):
    for i, (n_out, k, bs, rows) in enumerate([(37, 320, 64, 1), (16, 192, 64, 3), (5, 128, 128, 8),
                                              (50, 256, 32, 13), (9, 96, 32, 2)]):
        g = _gen(i)
        q = quant.quantize(torch.randn(n_out, k, generator=g) * 0.05, "nf4", bs, double_quant)
        x = torch.randn(rows, k, generator=g) * 3
        if i % 2:
            _specials(x, g)
        args = (q.data, q.absmax, q.code, bs, (n_out, k), q.nested)
        same(simd.quant.gemm_4bit(x, *args), portable.quant.gemm_4bit(x, *args),
             f"gemm_4bit {n_out}x{k} bs={bs} rows={rows}")


def _linear_spec(n, k, bs, r, g, bias=True, double_quant=True):
    q = quant.quantize(torch.randn(n, k, generator=g) * 0.05, "nf4", bs, double_quant)
    spec = dict(packed=q.data, absmax=q.absmax, code=q.code, blocksize=bs, shape=(n, k), nested=q.nested,
                bias=torch.randn(n, generator=g) if bias else None)
    if r:
        spec.update(lora_a=torch.randn(r, k, generator=g) * 0.05, lora_b=torch.randn(n, r, generator=g) * 0.05,
                    scaling=0.5)
    return spec


@pytest.mark.parametrize("lanes", [1, 2])
def test_decode_linear(simd, portable, lanes):
    """The 4-bit GEMV with LoRA A and B, one lane and two (products >= 64k weights are split)."""
    cases = [(40, 384, 64, 8), (1000, 576, 64, 8), (17, 192, 64, 5), (130, 512, 128, 1), (33, 640, 64, 0),
             (300, 256, 256, 3)]
    try:
        for build in (simd, portable):
            build.llama.decode_threads(lanes)
        for i, (n, k, bs, r) in enumerate(cases):
            g = _gen(10 + i)
            specs = DecodeLinears([_linear_spec(n, k, bs, r, g, bias=i % 2 == 0, double_quant=i % 3 != 2)])
            for x in (torch.randn(k, generator=g).bfloat16(), _specials(torch.randn(k, generator=g).bfloat16(), g)):
                same(simd.llama.decode_linears(specs, x, torch.empty(n)),
                     portable.llama.decode_linears(specs, x, torch.empty(n)),
                     f"decode_linear n={n} k={k} bs={bs} r={r}")
    finally:
        from qlora.quant.fast.llama import default_decode_threads

        for build in (simd, portable):
            build.llama.decode_threads(default_decode_threads())


@pytest.mark.parametrize("n,k", [(1000, 576), (37, 100), (5, 32), (3, 7), (70, 79), (300, 128), (2, 1)])
def test_gemv_bf16(simd, portable, n, k):
    g = _gen(n * k)
    w, x = torch.randn(n, k, generator=g).bfloat16(), torch.randn(k, generator=g).bfloat16()
    for special in (False, True):
        if special:
            _specials(w, g), _specials(x, g, 2)
        for rounded in (False, True):
            same(probes.gemv_bf16(simd, w, x, round_bf16=rounded), probes.gemv_bf16(portable, w, x, round_bf16=rounded),
                 f"gemv_bf16 {n}x{k} round={rounded} specials={special}")


@pytest.mark.parametrize("n,k", [(3000, 576), (500, 100), (77, 64), (40, 200)])
def test_argmax_head_screen(simd, portable, n, k):
    g = _gen(n + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    w[n // 2] = w[3]  # a tie
    screen = int8_screen(w)
    for seed in range(6):
        x = torch.randn(k, generator=_gen(seed)).bfloat16()
        assert simd.llama.argmax_gemv_bf16(w, screen, x) == portable.llama.argmax_gemv_bf16(w, screen, x), (n, k, seed)


@pytest.mark.parametrize("heads,kv_heads,dim,length", [(9, 3, 64, 37), (4, 4, 16, 1), (8, 2, 24, 200),
                                                       (2, 1, 8, 16), (4, 2, 128, 45), (3, 1, 80, 33),
                                                       (6, 3, 7, 19), (8, 2, 64, 200)])
def test_decode_attention(simd, portable, heads, kv_heads, dim, length):
    """Every value path: D = 64 and 128 (accumulators in registers), 16 and 80 (a run-time count),
    24, 8 and 7 (not a multiple of 16: one element at a time); lengths ragged against 16."""
    g = _gen(heads * dim + length)
    capacity = -(-(length + 5) // 16) * 16
    q = torch.randn(heads, dim, generator=g) * 2
    keys = torch.randn(kv_heads, capacity, dim, generator=g).bfloat16()
    values = torch.randn(kv_heads, capacity, dim, generator=g).bfloat16()
    blocked = block_keys(keys)
    for scale in (dim ** -0.5, 8.0):  # 8: large scores, exp's underflow
        out = [b.llama.decode_attention(q, blocked, values, length, scale, torch.empty(heads, dim)) for b in (simd,
                                                                                                              portable)]
        same(*out, f"attention h={heads} kv={kv_heads} d={dim} T={length} scale={scale}")


@pytest.mark.parametrize("n", [1, 15, 16, 17, 100, 4099])
def test_exp(simd, portable, n):
    g = _gen(n)
    x = torch.rand(n, generator=g) * 210 - 115  # past both clamps: inf, 0 and subnormal results
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 88.72, 88.73, -87.3,
                             -103.9, -104.1, 1e-30, -1e-40, 0.5 * 0.6931471805599453, 89.0, -104.0])
    x[: min(n, len(specials))] = specials[: min(n, len(specials))]
    same(probes.exp_(simd, x.clone()), probes.exp_(portable, x.clone()), f"exp n={n}")


# ---- training ops -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,d", [(201, 576), (5, 100), (7, 7), (3, 16), (4, 33), (2, 1)])
def test_rms_norm(simd, portable, rows, d, dtype):
    g = _gen(rows * d)
    x = (torch.randn(rows, d, generator=g) * 3).to(dtype)
    x[0, : min(d, 3)] = torch.tensor([1e-39, -2e-39, 3e-40])[: min(d, 3)].to(dtype)  # subnormals
    if rows > 2:
        x[1] *= 1e30  # a row whose squares overflow: rstd 0
    w = (torch.rand(d, generator=g) + 0.5).to(dtype)
    dy = torch.randn(rows, d, generator=g).to(dtype)
    (y1, r1), (y2, r2) = (b.train.rms_norm_forward(x, w, 1e-5) for b in (simd, portable))
    same(y1, y2, f"rms_norm y {rows}x{d}")
    same(r1, r2, f"rms_norm rstd {rows}x{d}")
    same(simd.train.rms_norm_backward(dy, x, w, r2), portable.train.rms_norm_backward(dy, x, w, r2),
         f"rms_norm dx {rows}x{d}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [5000, 17, 1, 53, 16, (1 << 14) + 7])
def test_swiglu(simd, portable, n, dtype):
    g = _gen(n)
    gate = (torch.randn(n, generator=g) * 4).to(dtype)
    gate[: min(n, 6)] = torch.tensor([0.0, -90.0, 90.0, -0.0, 1e-39, 200.0])[: min(n, 6)].to(dtype)
    up, dh = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    if n > 40:
        _specials(up, g, 3), _specials(gate, g, 3)
    same(simd.train.swiglu_forward(gate, up), portable.train.swiglu_forward(gate, up), f"swiglu h n={n}")
    (dg1, du1), (dg2, du2) = (b.train.swiglu_backward(dh, gate, up) for b in (simd, portable))
    same(dg1, dg2, f"swiglu dg n={n}")
    same(du1, du2, f"swiglu du n={n}")


@pytest.mark.parametrize("rows,v", [(6, 1000), (3, 16), (4, 7), (5, 49), (2, 49152 + 3)])
def test_cross_entropy_rows(simd, portable, rows, v):
    g = _gen(rows + v)
    z = (torch.randn(rows, v, generator=g) * 5).bfloat16()
    z[0, v // 2] = 60.0  # one dominant logit: exp of the others underflows
    if rows > 3:
        z[1, 0], z[2, v - 1] = -float("inf"), float("nan")
    targets = torch.randint(0, v, (rows,), generator=g)
    for grad in (False, True):
        z1, z2 = z.clone(), z.clone()
        same(simd.train.cross_entropy_rows(z1, targets, grad), portable.train.cross_entropy_rows(z2, targets, grad),
             f"cross_entropy loss {rows}x{v} grad={grad}")
        same(z1, z2, f"cross_entropy grad {rows}x{v}")


# ---- a whole decode step ------------------------------------------------------------------------


def test_llama_decode_step(simd, portable, tmp_path):
    """qlora/decoder.py's compiled step (norms, 4-bit projections with LoRA, rotary, attention, SiLU,
    the output head and its greedy screen) gives the same logits and tokens in both builds."""
    from qlora import decoder, hf
    from qlora.adapters import save_adapter
    from qlora.generate import load_model
    from qlora.nn.surgery import lora_layers
    from tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2, generator=_gen(p.numel()))
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    net, _ = hf.load(str(tmp_path / "model"), lora=dict(r=4, alpha=8, dropout=0.0))
    for layer in lora_layers(net).values():
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=_gen(1)) * 0.05
    save_adapter(net, str(tmp_path / "adapter"), str(tmp_path / "model"))
    lm, _ = load_model(str(tmp_path / "model"), [str(tmp_path / "adapter")])
    decoders = [decoder.decoder(lm, 40), decoder.decoder(lm, 40)]
    if decoders[0] is None:
        pytest.skip("decoder.py does not take this model here")
    decoders[0].kernels, decoders[1].kernels = simd, portable
    tokens = [1, 5, 9, 2, 7] + [3] * 20
    for i, token in enumerate(tokens):
        if i % 3 == 2:
            assert decoders[0].greedy(token) == decoders[1].greedy(token), f"greedy step {i}"
        else:
            same(decoders[0].step(token).clone(), decoders[1].step(token).clone(), f"logits step {i}")
