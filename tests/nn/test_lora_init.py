"""LoftQ and PiSSA: Q + s·BA approximates W from step 0, deterministically, layer by layer at load."""

from __future__ import annotations

import pytest
import torch

import qlora
from qlora import hf
from qlora.adapters import recorded_lora_init, save_adapter
from qlora.errors import QloraError
from qlora.export import export
from qlora.generate import load_model
from qlora.nn import Linear4bit, lora_init
from qlora.nn.surgery import add_lora, lora_layers

S = 2.0  # LoRA scaling α/r used below


def _fmt(quant_type="nf4"):
    return (lambda t: qlora.quantize(t, quant_type, 64, True)), (lambda q: qlora.dequantize(q, torch.float32))


def _weight(seed=0, shape=(96, 160)):
    # a few strong directions on top of noise, like trained weights
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(shape[0], 6, generator=g) @ torch.randn(6, shape[1], generator=g)
    return low * 0.3 + torch.randn(shape, generator=g) * 0.05


def _bits_equal(a, b):
    same_bytes = torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    return a.dtype == b.dtype and a.shape == b.shape and same_bytes


def test_loftq_reduces_the_error_every_iteration_and_is_bit_reproducible():
    w = _weight()
    quantize, dequantize = _fmt()
    errors = []
    q, a, b = lora_init.loftq(w, 8, S, quantize, dequantize, iters=5, errors=errors)
    plain = float((w - dequantize(quantize(w))).norm())
    assert errors[0] < plain  # one step is already QLoRA's quantization plus the SVD of its error
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] == pytest.approx(float((w - dequantize(q) - S * b @ a).norm()), rel=1e-6)
    q2, a2, b2 = lora_init.loftq(w, 8, S, quantize, dequantize, iters=5)
    for x, y in ((q.data, q2.data), (q.absmax, q2.absmax), (q.nested_absmax, q2.nested_absmax), (a, a2), (b, b2)):
        assert _bits_equal(x, y)


@pytest.mark.parametrize("shape", [(96, 160), (160, 96), (64, 64)])
def test_top_r_is_the_full_svds_best_rank_r_approximation(shape):
    # the Gram + Rayleigh-Ritz route gives the Eckart-Young approximation of a full SVD, on either
    # orientation: its error is the optimal one, and it is within a few fp32 ulps of the entries (<= 4)
    m = _weight(2, shape)
    a, b = lora_init._top_r(m, 8, S)
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    best = ((u[:, :8] * s[:8]) @ vh[:8]).float()
    torch.testing.assert_close(S * b @ a, best, rtol=0, atol=5e-5)
    assert float((m - S * b @ a).norm()) == pytest.approx(float(s[8:].norm()), rel=1e-6)
    s = s.float()
    torch.testing.assert_close(b.norm(dim=0) * a.norm(dim=1) * S, s[:8], rtol=1e-5, atol=0)  # σ split evenly
    torch.testing.assert_close(a @ a.T * S, torch.diag(s[:8]), rtol=0, atol=1e-4)  # orthogonal rows: √(σ/s) V_rᵀ


def test_top_r_of_a_rank_deficient_matrix_leaves_the_missing_directions_zero():
    m = torch.outer(torch.arange(1.0, 7.0), torch.arange(1.0, 11.0))  # rank 1
    a, b = lora_init._top_r(m, 3, 1.0)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(b @ a, m, rtol=0, atol=1e-4)
    assert float(a[1:].abs().max()) < 1e-2 and float(b[:, 1:].abs().max()) < 1e-2


@pytest.mark.parametrize("quant_type", ["nf4", "bof4s"])
def test_pissa_puts_the_top_directions_in_lora_and_quantizes_the_residual(quant_type):
    w = _weight(1)
    quantize, dequantize = _fmt(quant_type)
    q, a, b = lora_init.pissa(w, 6, S, quantize, dequantize)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(S * b @ a, (u[:, :6] * s[:6]) @ vh[:6], rtol=0, atol=1e-5)
    torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0), rtol=1e-5, atol=0)  # √(S/s) on each side
    residual = w - S * b @ a
    assert torch.equal(q.data, quantize(residual).data)  # the residual, quantized as it is
    # so Q + s·BA = W up to the residual's quantization error, which is far below W's own
    err = float((w - dequantize(q) - S * b @ a).norm())
    assert err == pytest.approx(float((residual - dequantize(quantize(residual))).norm()), rel=1e-5)
    assert err < 0.5 * float((w - dequantize(quantize(w))).norm())


@pytest.mark.parametrize("method", ["loftq", "pissa"])
def test_loaded_layer_by_layer_and_an_adapter_re_derives_its_base(tiny_llama, tmp_path, method):
    from transformers import AutoModelForCausalLM

    init = lora_init.spec(method, 4, 8.0, iters=2)
    model, tok = hf.load(tiny_llama, compute_dtype=torch.float32, lora_init=init)
    add_lora(model, r=4, alpha=8.0, dropout=0.0)
    plain, _ = hf.load(tiny_llama, compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for name, layer in lora_layers(model).items():
        assert float(layer.lora_B.weight.detach().abs().sum()) > 0  # not the B = 0 start
        w = ref.get_submodule(name).weight
        ours = (w - layer.merge(torch.float32).weight).norm()
        qlora_err = (w - plain.get_submodule(name).dequantized_weight(torch.float32)).norm()
        assert ours < qlora_err, name
    save_adapter(model, str(tmp_path / "a"), tiny_llama)
    again, _ = load_model(tiny_llama, [str(tmp_path / "a")], compute_dtype=torch.float32)
    assert recorded_lora_init([str(tmp_path / "a")]) == init and lora_init.of(again) == init
    for name, layer in lora_layers(again).items():
        assert torch.equal(layer.base.weight.data, lora_layers(model)[name].base.weight.data), name
    ids = torch.tensor([tok("The quick brown fox")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    with pytest.raises(QloraError, match=f"trained over a {method} base, which PEFT cannot rebuild"):
        export(tiny_llama, [str(tmp_path / "a")], str(tmp_path / "peft"), "peft")
    with pytest.raises(QloraError, match=f"trained over a {method} base, which llama.cpp cannot rebuild"):
        export(tiny_llama, [str(tmp_path / "a")], str(tmp_path / "a.gguf"), "gguf-lora")
    assert not (tmp_path / "peft").exists() and not (tmp_path / "a.gguf").exists()


def test_settings_that_do_not_fit_are_refused(tiny_llama):
    model, _ = hf.load(tiny_llama, compute_dtype=torch.float32, lora_init=lora_init.spec("pissa", 4, 8.0))
    with pytest.raises(QloraError, match="initialised for LoRA rank 4 and scaling 2, the adapter has rank 8"):
        add_lora(model, r=8, alpha=8.0)
    with pytest.raises(QloraError, match="needs a 4-bit base"):
        hf.load(tiny_llama, quant_type="bf16", lora_init=lora_init.spec("loftq", 4, 8.0))
    with pytest.raises(ValueError, match="unknown LoRA init 'svd'"):
        lora_init.spec("svd", 4, 8.0)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), Linear4bit)
