"""The gated MLP's backward writes into buffers it owns: SwiGLU's gradients in place of its own fp32
copies of gate and up (nn/lora.py), never into what autograd keeps."""

import pytest
import torch

from qlora.nn import fused


def _swiglu_backward_in_place_equals_fresh(dtype: torch.dtype) -> None:
    """out=(g, u): the gradients overwrite gate and up (the gated MLP's own copies in backward) with the
    same bits as fresh outputs; 1000 elements: 62 x 16 lanes and a scalar tail."""
    g = torch.Generator().manual_seed(6)
    gate, up, dh = ((torch.randn(1000, generator=g) * 3).to(dtype) for _ in range(3))
    dg, du = fused.swiglu_backward(dh, gate, up)
    a, b = gate.clone(), up.clone()
    dg2, du2 = fused.swiglu_backward(dh, a, b, out=(a, b))
    assert dg2.data_ptr() == a.data_ptr() and du2.data_ptr() == b.data_ptr()
    assert torch.equal(dg2, dg) and torch.equal(du2, du)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_backward_in_place_equals_fresh_outputs(k, dtype, monkeypatch):
    monkeypatch.setattr(fused, "_kernels", lambda *t: k)  # each build's kernels
    _swiglu_backward_in_place_equals_fresh(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_backward_in_place_equals_fresh_outputs_in_torch(dtype, monkeypatch):
    monkeypatch.setattr(fused, "_kernels", lambda *t: None)  # the torch ops
    _swiglu_backward_in_place_equals_fresh(dtype)


@pytest.mark.parametrize("saved", [torch.bfloat16, None])
def test_gated_mlp_backward_twice_gives_the_same_gradients(saved):
    """Backward writes the gate/up gradients into its own fp32 copies of kept bf16 tensors, never into
    what autograd keeps (fp32 gate and up themselves when nothing is kept in bf16): a second backward
    of the same graph (retain_graph) sees them unchanged."""
    from qlora.nn import Linear4bit, LoRALinear

    g = torch.Generator().manual_seed(8)

    def linear(i, o):
        return LoRALinear(Linear4bit.from_linear(torch.nn.Linear(i, o, bias=False), compute_dtype=torch.float32),
                          r=4, dropout=0.0)

    mlp = fused.GatedMLP(linear(32, 48), linear(32, 48), linear(48, 32)).train()
    for m in mlp.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, 0, 0.1, generator=g)
    fused.keep_saved_in(mlp, saved)
    x, dy = torch.randn(2, 24, 32, generator=g).requires_grad_(), torch.randn(2, 24, 32, generator=g)
    params = [p for p in mlp.parameters() if p.requires_grad]  # the LoRA factors
    y = mlp(x)
    first = torch.autograd.grad(y, (x, *params), dy, retain_graph=True)
    second = torch.autograd.grad(y, (x, *params), dy)
    assert len(first) == 7 and all(torch.equal(a, b) for a, b in zip(first, second))
    assert first[0].abs().sum() > 0
