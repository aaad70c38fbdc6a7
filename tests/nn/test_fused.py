"""Fused RMSNorm and SwiGLU (nn/fused.py, quant/csrc/fused_cpu.cpp) against transformers' modules.

Stated tolerance: the compiled kernels sum squares in their own order and use their own exp, so an
output may sit one bf16 rounding away from transformers' — at most 0.1% of elements, each within
one bf16 ulp of the value (2^-7 relative). The torch reference forward is transformers' exact ops.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qlora.nn import fused
from qlora.quant import fast

BF16_ULP = 2.0**-7  # relative spacing of bf16 values (8 significant bits)


def _close(a: torch.Tensor, b: torch.Tensor, max_fraction: float = 1e-3) -> None:
    a, b = a.float(), b.float()
    differ = a != b
    assert differ.float().mean().item() <= max_fraction, f"{int(differ.sum())} of {a.numel()} elements differ"
    assert ((a - b).abs() <= BF16_ULP * torch.maximum(a.abs(), b.abs()) + 1e-30)[differ].all()


def _norm_case(d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hf = LlamaRMSNorm(d, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(d, generator=g) + 0.5)
    hf.weight.requires_grad_(False)
    x = (torch.randn(3, 67, d, generator=g) * 3).to(torch.bfloat16)
    dy = torch.randn(3, 67, d, generator=g).to(torch.bfloat16)
    return hf, x, dy


def _norm_run(module, x, dy):
    x = x.clone().requires_grad_()
    y = module(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y, dx


@pytest.mark.parametrize("d", [576, 100])  # 100: a scalar tail after the 16-lane body
@pytest.mark.parametrize("reference", [False, True])
def test_rms_norm_matches_transformers(d, reference, monkeypatch):
    if not reference and fast.kernels() is None:
        pytest.skip("compiled CPU kernels unavailable (no C++ compiler)")
    if reference:
        monkeypatch.setenv("QLORA_REFERENCE_KERNELS", "1")
    hf, x, dy = _norm_case(d)
    y_ref, dx_ref = _norm_run(hf, x, dy)
    y, dx = _norm_run(fused.RMSNorm(hf.weight, hf.variance_epsilon), x, dy)
    if reference:
        assert torch.equal(y, y_ref)  # the same ops
    else:
        _close(y, y_ref)
    _close(dx, dx_ref, max_fraction=5e-3)  # fp32 sums in another order before the last rounding


def test_rms_norm_kernel_builds_agree(k):
    hf, x, dy = _norm_case(200, seed=1)
    y_ref, dx_ref = _norm_run(hf, x, dy)
    y, rstd = k.train.rms_norm_forward(x.reshape(-1, 200), hf.weight, hf.variance_epsilon)
    _close(y.view_as(y_ref), y_ref)
    dx = k.train.rms_norm_backward(dy.reshape(-1, 200), x.reshape(-1, 200), hf.weight, rstd)
    _close(dx.view_as(dx_ref), dx_ref, max_fraction=5e-3)
    torch.testing.assert_close(rstd, torch.rsqrt(x.float().pow(2).mean(-1) + 1e-5).reshape(-1), rtol=1e-6, atol=0)


def test_swiglu_and_cross_entropy_kernel_builds_agree(k):
    g = torch.Generator().manual_seed(3)
    gate, up, dh = (torch.randn(5000, generator=g).bfloat16() for _ in range(3))
    h_ref = F.silu(gate) * up
    a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
    dg_ref, du_ref = torch.autograd.grad(F.silu(a) * b, (a, b), dh)
    _close(k.train.swiglu_forward(gate, up), h_ref)
    dg, du = k.train.swiglu_backward(dh, gate, up)
    _close(dg, dg_ref)
    _close(du, du_ref)
    z = (torch.randn(6, 1000, generator=g) * 5).bfloat16()  # 1000: a scalar tail after 62 x 16 lanes
    y = torch.randint(0, 1000, (6,), generator=g)
    expected = F.cross_entropy(z.float(), y, reduction="none")
    grad_ref = (torch.softmax(z.float(), -1) - F.one_hot(y, 1000)).bfloat16()
    zz = z.clone()
    torch.testing.assert_close(k.train.cross_entropy_rows(zz, y, True), expected, rtol=1e-6, atol=1e-5)
    _close(zz, grad_ref, max_fraction=5e-3)


def test_fp32_kernels_match_torch_ops(k):
    """fp32 (the compute dtype without native bf16): no bf16 rounding between ops; the kernels' own sum
    order and exp leave a few fp32 ulps against transformers' ops."""
    g = torch.Generator().manual_seed(4)
    hf = LlamaRMSNorm(100, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(100, generator=g) + 0.5)
    x, dy = torch.randn(3, 67, 100, generator=g) * 3, torch.randn(3, 67, 100, generator=g)
    a = x.clone().requires_grad_()
    y_ref = hf(a)
    (dx_ref,) = torch.autograd.grad(y_ref, a, dy)
    y, rstd = k.train.rms_norm_forward(x.reshape(-1, 100), hf.weight.detach(), 1e-5)
    dx = k.train.rms_norm_backward(dy.reshape(-1, 100), x.reshape(-1, 100), hf.weight.detach(), rstd)
    assert y.dtype == dx.dtype == torch.float32
    torch.testing.assert_close(y.view_as(y_ref), y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx.view_as(dx_ref), dx_ref, rtol=1e-4, atol=1e-5)  # a mean of products
    gate, up, dh = torch.randn(5000, generator=g) * 4, torch.randn(5000, generator=g), torch.randn(5000, generator=g)
    a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
    h_ref = F.silu(a) * b
    dg_ref, du_ref = torch.autograd.grad(h_ref, (a, b), dh)
    torch.testing.assert_close(k.train.swiglu_forward(gate, up), h_ref, rtol=1e-5, atol=1e-6)
    dg, du = k.train.swiglu_backward(dh, gate, up)
    torch.testing.assert_close(dg, dg_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(du, du_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("n", [1536 * 20, 1000])
def test_swiglu_matches_silu_times_up(reference, n, monkeypatch):
    if reference:
        monkeypatch.setenv("QLORA_REFERENCE_KERNELS", "1")
    g = torch.Generator().manual_seed(2)
    gate = (torch.randn(n, generator=g) * 4).to(torch.bfloat16)
    gate[:3] = torch.tensor([0.0, -90.0, 90.0])  # exp over- and underflow
    up, dh = torch.randn(n, generator=g).to(torch.bfloat16), torch.randn(n, generator=g).to(torch.bfloat16)
    outs = []
    for fn in (lambda a, b: F.silu(a) * b, fused.swiglu):
        a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
        h = fn(a, b)
        outs.append((h, *torch.autograd.grad(h, (a, b), dh)))
    for mine, theirs in zip(outs[1], outs[0]):
        if reference:
            assert torch.equal(mine, theirs)
        else:
            _close(mine, theirs)


def test_swiglu_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="gate"):
        fused.swiglu(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(5, dtype=torch.bfloat16))


def test_trainable_norm_weight_gets_a_gradient():
    hf, x, dy = _norm_case(64)
    w = torch.nn.Parameter(hf.weight.detach().clone())
    y = fused.RMSNorm(w, 1e-5)(x)
    y.backward(dy)
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert torch.equal(y, fused.rms_norm_reference(x, w, 1e-5))


def test_fuse_swaps_llama_norms_and_mlps_keeping_parameters(tiny_dirs):
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.bfloat16)
    keys = {k: v.clone() for k, v in net.state_dict().items()}
    ids = torch.randint(0, net.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = net(ids).logits.float()
    layers = net.config.num_hidden_layers
    assert fused.fuse(net) == 2 * layers + 1 + layers
    assert type(net.model.norm) is fused.RMSNorm and type(net.model.layers[0].mlp) is fused.GatedMLP
    after_sd = net.state_dict()
    assert after_sd.keys() == keys.keys() and all(torch.equal(after_sd[k], v) for k, v in keys.items())
    with torch.no_grad():
        after = net(ids).logits.float()
    torch.testing.assert_close(after, before, atol=0.05 * before.abs().max().item(), rtol=0)


def test_fuse_leaves_gemma_alone(tiny_dirs):
    from transformers import AutoModelForCausalLM

    if "gemma3" not in tiny_dirs:
        pytest.skip("no tiny gemma3 architecture in tests/tiny.py")
    net = AutoModelForCausalLM.from_pretrained(tiny_dirs["gemma3"], dtype=torch.bfloat16)
    assert fused.fuse(net) == 0  # Gemma's norm scales by 1 + w and its MLP is GELU-gated


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gated_lora_down_projection_equals_the_composition(dropout):
    """LoRALinear.forward_gated over a 4-bit base (one function that keeps gate and up, not their
    product) gives down(swiglu(gate, up))'s output and gradients bit for bit."""
    from qlora.nn import Linear4bit, LoRALinear

    g = torch.Generator().manual_seed(7)
    down = LoRALinear(Linear4bit.from_linear(torch.nn.Linear(96, 32, bias=False).to(torch.bfloat16),
                                             compute_dtype=torch.bfloat16), r=8, dropout=dropout)
    with torch.no_grad():
        down.lora_B.weight.normal_(0, 0.1, generator=g)
    down.train()
    gate0, up0 = (torch.randn(3, 40, 96, generator=g).bfloat16() for _ in range(2))
    dy = torch.randn(3, 40, 32, generator=g).bfloat16()
    results = []
    for fn in (lambda a, b: down(fused.swiglu(a, b)), down.forward_gated):
        gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
        torch.manual_seed(11)  # the same dropout seed
        y = fn(gate, up)
        grads = torch.autograd.grad(y, (gate, up, down.lora_A.weight, down.lora_B.weight), dy)
        results.append((y, *grads))
    assert type(y.grad_fn).__name__ == "_GatedLoRA4bitBackward"  # the fused path ran
    for mine, composed in zip(results[1], results[0]):
        assert torch.equal(mine, composed)


# ---- saved_activations = bfloat16: forward as computed, backward from bf16 copies ----


def _rounding_saved(shape: tuple) -> torch.autograd.graph.saved_tensors_hooks:
    """Autograd keeps fp32 tensors of `shape` rounded to bf16 (and back): the default path's
    backward then reads what keep_saved_in's modules keep."""
    def pack(t):
        return t.bfloat16().float() if t.dtype == torch.float32 and tuple(t.shape) == shape else t
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _kept_dtypes(shape: tuple, seen: list) -> torch.autograd.graph.saved_tensors_hooks:
    """Appends to `seen` the dtype of every tensor of `shape` autograd keeps."""
    return torch.autograd.graph.saved_tensors_hooks(
        lambda t: seen.append(t.dtype) or t if tuple(t.shape) == shape else t, lambda t: t)


@pytest.mark.parametrize("reference", [False, True])
def test_norm_kept_in_bf16_rounds_its_saved_input_only(reference, monkeypatch):
    """fp32 compute: the output is the default's bit for bit, dx is the default's with the saved
    input rounded to bf16, and the kept input is bf16."""
    if reference:
        monkeypatch.setattr(fused, "_kernels", lambda *t: None)
    hf, x, dy = _norm_case(576)
    x, dy = x.float().view(-1, 576) * 1.0009765625, dy.float().view(-1, 576)  # fp32 values off the bf16 grid
    default, kept = fused.RMSNorm(hf.weight.float(), 1e-5), fused.RMSNorm(hf.weight.float(), 1e-5)
    assert fused.keep_saved_in(kept, torch.bfloat16) == 1
    seen = []
    with _kept_dtypes(tuple(x.shape), seen):
        y, dx = _norm_run(kept, x, dy)
    assert seen == [torch.bfloat16]
    y0, dx0 = _norm_run(default, x, dy)
    with _rounding_saved(tuple(x.shape)):
        y1, dx1 = _norm_run(default, x, dy)
    assert torch.equal(y, y0) and torch.equal(dx, dx1)
    assert not torch.equal(dx, dx0)  # the rounding is felt
    torch.testing.assert_close(dx, dx0, rtol=0.02, atol=0.02 * dx0.abs().max().item())


def test_bf16_kept_activations_leave_bf16_compute_alone():
    hf, x, dy = _norm_case(100)
    default, kept = fused.RMSNorm(hf.weight, 1e-5), fused.RMSNorm(hf.weight, 1e-5)
    fused.keep_saved_in(kept, torch.bfloat16)
    for a, b in zip(_norm_run(kept, x, dy), _norm_run(default, x, dy)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("adapted", [True, False])  # the gated 4-bit LoRA function, or swiglu then the layer
def test_mlp_kept_in_bf16_rounds_gate_and_up_only(adapted):
    """GatedMLP with fp32 compute: output bit for bit the default's; gradients those of the default
    with gate and up rounded to bf16 where autograd keeps them."""
    from qlora.nn import Linear4bit, LoRALinear

    g = torch.Generator().manual_seed(3)

    def linear(i, o):
        base = Linear4bit.from_linear(torch.nn.Linear(i, o, bias=False), compute_dtype=torch.float32)
        if not adapted:
            return base
        layer = LoRALinear(base, r=8, dropout=0.1)
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.1, generator=g)
        return layer

    mlp = fused.GatedMLP(linear(64, 96), linear(64, 96), linear(96, 64)).train()
    x, dy = torch.randn(2, 40, 64, generator=g), torch.randn(2, 40, 64, generator=g)
    params = [p for p in mlp.parameters() if p.requires_grad]

    def run():
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)  # the same dropout seeds
        y = mlp(xi)
        return (y, *torch.autograd.grad(y, (xi, *params), dy))

    default = run()
    with _rounding_saved((2, 40, 96)):
        rounded = run()
    fused.keep_saved_in(mlp, torch.bfloat16)
    seen = []
    with _kept_dtypes((2, 40, 96), seen):
        kept = run()
    assert seen == [torch.bfloat16, torch.bfloat16]  # gate and up, nothing else of that shape
    assert all(torch.equal(a, b) for a, b in zip(kept, rounded))
    assert torch.equal(kept[0], default[0]) and not torch.equal(kept[1], default[1])


# ---- 4-bit LoRA layers reading a norm's output keep the norm's input instead (norm_source) ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reference", [False, True])
def test_lora_after_a_norm_keeps_the_norms_input_not_its_output(dtype, reference, monkeypatch):
    """q/k/v over a fused norm: the layers keep the norm's input (which the norm keeps anyway) and
    form its output again in backward. Output and every gradient are bit for bit those of keeping
    the output; the output's storage is no longer among what autograd keeps."""
    from qlora.nn import Linear4bit, LoRALinear

    if reference:
        monkeypatch.setattr(fused, "_kernels", lambda *t: None)
    g = torch.Generator().manual_seed(4)
    norm = fused.RMSNorm(torch.nn.Parameter((torch.rand(64, generator=g) + 0.5).to(dtype), requires_grad=False), 1e-5)
    layers = []
    for out in (64, 32, 32):
        base = Linear4bit.from_linear(torch.nn.Linear(64, out, bias=out == 64), compute_dtype=dtype)
        layers.append(LoRALinear(base, r=8, dropout=0.1).train())
        with torch.no_grad():
            layers[-1].lora_B.weight.normal_(0, 0.1, generator=g)
    params = [p for m in layers for p in m.parameters() if p.requires_grad]
    x = (torch.randn(2, 40, 64, generator=g) * 2).to(dtype)
    dys = [torch.randn(2, 40, m.out_features, generator=g).to(dtype) for m in layers]

    rows = fused._rms_norm_rows
    passes = []
    monkeypatch.setattr(fused, "_rms_norm_rows", lambda *a: passes.append(1) or rows(*a))

    def run():
        saved = set()
        passes.clear()
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)  # the same dropout seeds
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.add(t.untyped_storage().data_ptr()) or t,
                                                      lambda t: t):
            h = norm(xi)
            ys = [m(h) for m in layers]
        grads = torch.autograd.grad(ys, (xi, *params), dys)
        assert not fused._last  # let go by the end of backward
        return ys, grads, h.untyped_storage().data_ptr() in saved, len(passes)

    ys, grads, output_kept, norm_passes = run()
    monkeypatch.setattr(fused, "norm_source", lambda t: None)  # the layers keep the norm's output
    ys0, grads0, output_kept0, norm_passes0 = run()
    assert not output_kept and output_kept0
    assert (norm_passes, norm_passes0) == (2, 1)  # formed again once for the three layers
    assert all(torch.equal(a, b) for a, b in zip([*ys, *grads], [*ys0, *grads0]))


def test_lora_after_a_bf16_kept_norm_reads_its_output_formed_from_the_rounded_input():
    """fp32 compute with keep_saved_in(bf16): backward forms the norm's output again from the bf16
    copy, so dA is that of the output recomputed from the rounded input; dB (from A's saved product)
    is the default's bit for bit."""
    from qlora.nn import Linear4bit, LoRALinear

    g = torch.Generator().manual_seed(6)
    norm = fused.RMSNorm(torch.nn.Parameter(torch.rand(64, generator=g) + 0.5, requires_grad=False), 1e-5)
    layer = LoRALinear(Linear4bit.from_linear(torch.nn.Linear(64, 48, bias=False), compute_dtype=torch.float32),
                       r=8).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1, generator=g)
    x = torch.randn(80, 64, generator=g) * 1.0009765625  # off the bf16 grid
    dy = torch.randn(80, 48, generator=g)

    def grads(inp):
        return torch.autograd.grad(layer(norm(inp)), (layer.lora_A.weight, layer.lora_B.weight), dy)

    da0, db0 = grads(x)
    fused.keep_saved_in(norm, torch.bfloat16)
    da, db = grads(x)
    fused.keep_saved_in(norm, None)
    h_rounded = norm(x.bfloat16().float())  # what backward reads in place of norm(x)
    gxa = (dy @ layer.lora_B.weight) * layer.scaling
    assert torch.equal(db, db0) and not torch.equal(da, da0)
    torch.testing.assert_close(da, gxa.t() @ h_rounded, rtol=1e-5, atol=1e-6)
