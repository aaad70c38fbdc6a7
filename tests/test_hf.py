import json

import pytest
import torch

from qlora import hf
from qlora.adapters import adapter_state_dict, load_adapter, save_adapter
from qlora.errors import QloraError
from qlora.nn import Linear4bit, LoRALinear
from qlora.nn.surgery import add_lora, linear_names, lora_layers
from tiny import ARCHS


def _ids(tok, text="The quick brown fox"):
    return torch.tensor([tok(text)["input_ids"]])


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_load_matches_transformers_and_quantizes_all_but_head(tiny_dirs, arch):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], dtype=torch.bfloat16)
    plain, tok = hf.load(tiny_dirs[arch], quant_type="bf16")
    assert torch.equal(ref(_ids(tok)).logits, plain(_ids(tok)).logits)
    model, _ = hf.load(tiny_dirs[arch])
    n_linear = len(linear_names(ref))
    q = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(q) == n_linear > 0
    assert not isinstance(model.get_output_embeddings(), Linear4bit)
    # embeddings/head stay in the compute dtype: no fp32 upcast of the big matrices
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    # quantized weights equal quantizing the reference weights directly
    name = linear_names(ref)[0]
    ref_w = ref.get_submodule(name).weight.detach()
    ref_w = ref_w.t() if arch == "gpt2" else ref_w
    import qlora

    expected = qlora.dequantize(qlora.quantize(ref_w.contiguous()), torch.bfloat16)
    assert torch.equal(model.get_submodule(name).dequantized_weight(torch.bfloat16), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_add_lora_all_linear_and_step0_equals_base(tiny_dirs, arch):
    model, tok = hf.load(tiny_dirs[arch])
    before = model(_ids(tok)).logits
    names = add_lora(model, r=4, alpha=8, dropout=0.0)
    assert len(names) == len(linear_names(model)) - 0 or len(names) > 0
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert torch.equal(model(_ids(tok)).logits, before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_attention_only_targets(tiny_llama):
    model, _ = hf.load(tiny_llama)
    names = add_lora(model, r=2, targets="attention")
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_adapter_round_trip_and_peft_key_names(tiny_llama, tmp_path):
    model, tok = hf.load(tiny_llama, lora=dict(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    save_adapter(model, str(tmp_path), "tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    from safetensors.torch import load_file

    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys[0] == "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    fresh, _ = hf.load(tiny_llama, adapters=[str(tmp_path)])
    torch.testing.assert_close(fresh(_ids(tok)).logits, model(_ids(tok)).logits, rtol=0, atol=0)


@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])  # saved in the dtype it trains in
def test_peft_loads_our_adapter_and_we_load_peft(tiny_llama, tmp_path, lora_dtype):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model, tok = hf.load(tiny_llama, lora=dict(r=4, alpha=8, dropout=0.0, dtype=lora_dtype))
    torch.manual_seed(0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    save_adapter(model, str(tmp_path / "ours"), tiny_llama)
    # PEFT on the dequantized base (bf16 Linear layers holding our dequantized weights)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    for name in linear_names(base):
        base.get_submodule(name).weight.data = model.get_submodule(name).base.dequantized_weight(torch.bfloat16)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours"))
    ids = _ids(tok)
    torch.testing.assert_close(pm(ids).logits.float(), model(ids).logits.float(), rtol=0.02, atol=0.02)
    # and a PEFT-written adapter loads into qlora
    pm.save_pretrained(str(tmp_path / "theirs"))
    again, _ = hf.load(tiny_llama, adapters=[str(tmp_path / "theirs")])
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_adapter_errors(tiny_llama, tiny_dirs, tmp_path):
    model, _ = hf.load(tiny_dirs["qwen2"], lora=dict(r=4))
    save_adapter(model, str(tmp_path / "a"))
    other, _ = hf.load(tiny_llama)
    sd = adapter_state_dict(model)
    # same arch names, different r is fine; now a shape mismatch: change hidden via a gpt2 model
    gpt2, _ = hf.load(tiny_dirs["gpt2"])
    with pytest.raises(QloraError, match="does not have"):
        load_adapter(gpt2, str(tmp_path / "a"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(QloraError, match="adapter_model.safetensors: corrupted"):
        load_adapter(other, str(tmp_path / "bad"))
    assert sd


def test_resolve_errors(tmp_path):
    with pytest.raises(QloraError, match="no such model"):
        hf.resolve(str(tmp_path / "nope"))
    (tmp_path / "w.bin").write_bytes(b"x")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(QloraError, match="never unpickles"):
        hf._has_safetensors(str(tmp_path))
    f = tmp_path / "model.txt"
    f.write_text("x")
    with pytest.raises(QloraError, match=".gguf"):
        hf.resolve(str(f))


def test_core_packages_do_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "import qlora, qlora.quant, qlora.nn, qlora.optim\n"
            "assert 'transformers' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True)
