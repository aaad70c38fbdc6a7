"""DoRA: PEFT's formula over a 4-bit base, exact start, merge, and round trips through PEFT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora import hf
from qlora.adapters import save_adapter
from qlora.nn import Linear4bit, LoRALinear
from qlora.nn.surgery import linear_names, lora_layers


def _layer(seed: int = 0, bias: bool = True, dropout: float = 0.0) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(40, 96, generator=g) * 0.1)
        if bias:
            dense.bias.copy_(torch.randn(40, generator=g))
    base = Linear4bit.from_linear(dense, "nf4", 64, True, compute_dtype=torch.float32)
    return LoRALinear(base, r=4, alpha=8, dropout=dropout, dora=True)


def _perturb(layer: LoRALinear, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
        layer.lora_magnitude.mul_(1 + 0.1 * torch.randn(layer.lora_magnitude.shape, generator=g))


def test_a_fresh_dora_layer_computes_the_base_output():
    layer = _layer()
    w = layer.base.dequantized_weight(torch.float32)
    assert torch.equal(layer.lora_magnitude.detach(), w.norm(dim=1))  # m = ‖W‖ per output row
    x = torch.randn(3, 5, 96)
    assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("bias", [True, False])
def test_output_is_the_dora_formula_over_the_dequantized_base(bias):
    layer = _layer(bias=bias)
    _perturb(layer)
    w = layer.base.dequantized_weight(torch.float32)
    v = w + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    want_w = layer.lora_magnitude[:, None] * v / v.norm(dim=1, keepdim=True)
    x = torch.randn(7, 96)
    want = x @ want_w.t() + (layer.base.bias if bias else 0)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    merged = layer.merge(torch.float32)
    torch.testing.assert_close(merged.weight, want_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_magnitude_a_and_b_and_follow_peft_with_dropout():
    layer = _layer(dropout=0.5)
    _perturb(layer)
    layer.train()
    x = torch.randn(4, 96)
    torch.manual_seed(3)
    y = layer(x)
    y.square().sum().backward()
    for p in (layer.lora_magnitude, layer.lora_A.weight, layer.lora_B.weight):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    # PEFT with dropout: base(x) + (m/‖V‖ - 1)·(x_d Wᵀ) + (m/‖V‖)·s·B A x_d, x_d the same dropped input
    from qlora.nn import dropout as seeded

    torch.manual_seed(3)
    xd = seeded.dropout(x, 0.5)
    w = layer.base.dequantized_weight(torch.float32)
    with torch.no_grad():
        v = w + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        scale = layer.lora_magnitude / v.norm(dim=1)
        lora = xd @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()
        want = layer.base(x) + (scale - 1) * (xd @ w.t()) + scale * lora * layer.scaling
    torch.testing.assert_close(y.detach(), want, rtol=1e-5, atol=1e-5)


def test_dora_over_a_stacked_adapter_is_refused():
    with pytest.raises(ValueError, match="DoRA needs a plain or 4-bit linear base"):
        LoRALinear(LoRALinear(nn.Linear(8, 8), r=2), r=2, dora=True)


def _ids(tok, text="The quick brown fox"):
    return torch.tensor([tok(text)["input_ids"]])


def test_peft_loads_our_dora_adapter_and_we_load_peft(tiny_llama, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model, tok = hf.load(tiny_llama, compute_dtype=torch.float32, lora=dict(r=4, alpha=8, dropout=0.0, dora=True))
    for i, layer in enumerate(lora_layers(model).values()):
        _perturb(layer, seed=i)
    save_adapter(model, str(tmp_path / "ours"), tiny_llama)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector" in keys
    # PEFT on the dequantized base (fp32 Linear layers holding our dequantized weights)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for name in linear_names(base):
        base.get_submodule(name).weight.data = model.get_submodule(name).base.dequantized_weight(torch.float32)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours"))
    assert pm.peft_config["default"].use_dora
    ids = _ids(tok)
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(pm(ids).logits, want, rtol=0, atol=1e-5)
        pm.save_pretrained(str(tmp_path / "theirs"))
        again, _ = hf.load(tiny_llama, compute_dtype=torch.float32, adapters=[str(tmp_path / "theirs")])
        assert all(layer.dora for layer in lora_layers(again).values())
        torch.testing.assert_close(again(ids).logits, want, rtol=0, atol=1e-6)
        # PEFT's own merge agrees with ours
        merged = pm.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, want, rtol=0, atol=1e-5)
