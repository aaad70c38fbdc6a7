"""Merge and export: reloaded outputs reproduce the adapter-on-dequantized-base model.

Tolerances (max |logit difference| against that model computed in fp32, tiny models, logits ~1):
  merge --dtype fp32 -> transformers          1e-5   (measured ~2e-7: only summation order differs)
  merge --dtype bf16 -> transformers          0.05   (bf16 rounding of weights and activations; live bf16 is as far)
  GGUF f16  -> transformers' GGUF reader      5e-3   (f16 weights: 11-bit mantissa; measured ~3e-4)
  GGUF q8_0 -> transformers' GGUF reader      5e-2   (8-bit blocks of 32; measured ~7e-3)
  bnb export -> transformers + bitsandbytes   dequantized weights bit-identical
"""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from qlora.cli import main
from qlora.errors import QloraError
from qlora.export import export, merge
from qlora.export.files import ShardWriter
from qlora.generate import GenerationSettings, generate, load_model
from qlora.nn import Linear4bit
from qlora.nn.surgery import quant_of
from qlora.quant import dequantize, quantize
from tiny import save_tiny, save_tiny_adapter
from quant.helpers import bnb_canonical  # tests/quant/helpers.py

TEXT = "The quick brown fox jumps over the lazy dog. <|im_start|>user\nhé<|im_end|>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_adapter(tmp_path_factory.mktemp("export"))


def logits(model, tok, text=TEXT):
    with torch.no_grad():
        return model(torch.tensor([tok(text)["input_ids"]])).logits.float()


@pytest.fixture(scope="module")
def reference(tiny):
    """The adapter on the dequantized 4-bit base, computed in fp32."""
    model, tok = load_model(tiny[0], [tiny[1]], compute_dtype=torch.float32)
    return logits(model, tok), tok


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])
def test_merge_fp32_reloads_with_equal_logits(tmp_path, arch):
    model_dir, adapter = save_tiny_adapter(tmp_path, arch)
    live, tok = load_model(model_dir, [adapter], compute_dtype=torch.float32)
    merge(model_dir, [adapter], str(tmp_path / "merged"), "fp32")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert torch.allclose(logits(reloaded, tok), logits(live, tok), rtol=0, atol=1e-5)


def test_merge_bf16_sharded(tiny, reference, tmp_path):
    out = tmp_path / "merged"
    merge(tiny[0], [tiny[1]], str(out), "bf16", max_shard_bytes=20_000)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "tokenizer.json" in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert reloaded.dtype == torch.bfloat16
    ref, tok = reference
    assert (logits(reloaded, tok) - ref).abs().max() < 0.05
    assert AutoTokenizer.from_pretrained(str(out))(TEXT)["input_ids"] == tok(TEXT)["input_ids"]


def test_inference_never_alters_the_packed_weights(tiny):
    model, tok = load_model(tiny[0], [tiny[1]])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    before = {n: (m.weight.data.clone(), m.weight.absmax.clone()) for n, m in layers.items()}
    generate(model, tok, "hello", GenerationSettings(max_new_tokens=4))
    logits(model, tok)
    for n, m in layers.items():
        assert torch.equal(m.weight.data, before[n][0]) and torch.equal(m.weight.absmax, before[n][1]), n


def test_merge_refuses_an_altered_layout(tiny, tmp_path):
    model, tok = load_model(tiny[0], [tiny[1]])
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    q = layer.weight  # a view of the layer's parameters: changes take effect when assigned back
    q.data = q.data.reshape(-1, 2)  # what a repacking would do to the shape
    layer.weight = q
    from qlora.export.merged import write_merged

    with pytest.raises(RuntimeError, match="layout"):
        write_merged(model, tok, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []  # nothing half-written left behind


def test_requantized_merge_reports_the_error(tiny, tmp_path):
    out = tmp_path / "rq"
    summary = merge(tiny[0], [tiny[1]], str(out), "fp32", quantize="nf4")
    report = summary["requantization"]
    assert report == json.loads((out / "requantization_report.json").read_text())
    assert report["layers_requantized"] == 14 and report["eval_tokens"] > 100
    assert report["max_abs_logit_delta"] > report["mean_abs_logit_delta"] > 0  # re-quantizing moves outputs
    assert report["adapter_mean_abs_logit_effect"] > 0 and report["perplexity_base"] != report["perplexity_merged"]
    assert report["perplexity_delta"] == pytest.approx(report["perplexity_requantized"] - report["perplexity_merged"],
                                                       abs=1e-3)
    # the stored codes are exactly quantize(dequant(base) + s·BA) of the fp32 merge
    live, _ = load_model(tiny[0], [tiny[1]], compute_dtype=torch.float32)
    merged = live.model.layers[0].self_attn.q_proj.merge(torch.float32).weight
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    assert torch.equal(stored["model.layers.0.self_attn.q_proj.weight"], quantize(merged, "nf4", 64, True).data)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


def test_bnb_export_loads_in_transformers_with_identical_weights(tiny, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    export(tiny[0], [], str(tmp_path / "bnb"), "bnb")
    ours, tok = load_model(tiny[0], compute_dtype=torch.bfloat16)  # as export quantizes (dtype="bf16"), on any CPU
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bnb"))
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 14
    with bnb_canonical():  # bitsandbytes' PyTorch dequantize, not its native CPU kernel (which varies by ISA)
        for name, layer in layers.items():
            param = theirs.get_submodule(name).weight
            assert isinstance(theirs.get_submodule(name), bnb.nn.Linear4bit)
            w = bnb.functional.dequantize_4bit(param.data, param.quant_state)
            assert torch.equal(w, dequantize(layer.weight, w.dtype)), name
        theirs_logits = logits(theirs, tok)
    assert (theirs_logits - logits(ours, tok)).abs().max() < 0.05  # bf16 compute on both sides


@pytest.mark.parametrize("quant_type", ["int4", "bof4", "bof4s"])
def test_bnb_export_refuses_formats_bitsandbytes_lacks(tmp_path, quant_type):
    model_dir = save_tiny(str(tmp_path / "m"))
    with pytest.raises(QloraError, match=f"bitsandbytes stores only nf4 and fp4, not {quant_type}; .*GGUF instead$"):
        export(model_dir, [], str(tmp_path / "out"), "bnb", quant_type=quant_type)
    assert sorted(os.listdir(tmp_path)) == ["m"]


@pytest.mark.parametrize("quant_type", ["bof4", "bof4s"])
def test_merge_and_gguf_of_an_optimal_codebook_base(tiny, tmp_path, quant_type):
    """bitsandbytes cannot hold bof4, but the 16-bit merge and GGUF (which dequantize) can."""
    live, tok = load_model(tiny[0], [tiny[1]], quant_type=quant_type, compute_dtype=torch.float32)
    assert quant_of(live).quant_type == quant_type
    merge(tiny[0], [tiny[1]], str(tmp_path / "merged"), "fp32", quant_type=quant_type)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    want = logits(live, tok)
    assert torch.allclose(logits(reloaded, tok), want, rtol=0, atol=1e-5)
    nf4, _ = load_model(tiny[0], [tiny[1]], compute_dtype=torch.float32)
    assert (logits(nf4, tok) - want).abs().max() > 1e-4  # a different base indeed
    path = tmp_path / "m.gguf"
    export(tiny[0], [tiny[1]], str(path), "gguf-f16", quant_type=quant_type)
    gguf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32,
                                                quantization_config=GgufConfig(dequantize=True))
    assert (logits(gguf, tok) - want).abs().max() < 5e-3


@pytest.mark.parametrize("fmt,tol", [("f16", 5e-3), ("q8_0", 5e-2)])
def test_gguf_reloads_through_transformers(tiny, reference, tmp_path, fmt, tol):
    path = tmp_path / f"model.{fmt}.gguf"
    export(tiny[0], [tiny[1]], str(path), f"gguf-{fmt}")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32,
                                                    quantization_config=GgufConfig(dequantize=True))
    ref, tok = reference
    assert (logits(reloaded, tok) - ref).abs().max() < tol
    gguf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert gguf_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert gguf_tok.chat_template == tok.chat_template and gguf_tok.eos_token == tok.eos_token


def test_gguf_refuses_unsupported_architectures(tmp_path):
    model_dir = save_tiny(str(tmp_path / "gpt2"), "gpt2")
    with pytest.raises(QloraError, match="GGUF export supports"):
        export(model_dir, [], str(tmp_path / "out.gguf"), "gguf-f16")


def test_peft_export_loads_in_peft(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "peft"
    assert export(tiny[0], [tiny[1]], str(out), "peft")["layers"] == 14
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny[0]
    base = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(out))
    ours, tok = load_model(tiny[0], [str(out)], quant_type="bf16", compute_dtype=torch.float32)
    assert torch.allclose(logits(theirs, tok), logits(ours, tok), rtol=0, atol=1e-5)


def test_failed_write_leaves_nothing_and_existing_outputs_are_kept(tiny, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QloraError, match="already exists"):
        merge(tiny[0], [tiny[1]], str(out))
    calls = []

    def fail_late(self, name, tensor):
        calls.append(name)
        if len(calls) > 5:
            raise OSError("disk full")

    monkeypatch.setattr(ShardWriter, "add", fail_late)
    with pytest.raises(OSError, match="disk full"):
        merge(tiny[0], [tiny[1]], str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["merged"] and os.listdir(out) == ["keep.txt"]
    monkeypatch.undo()
    merge(tiny[0], [tiny[1]], str(out), overwrite=True)
    assert "keep.txt" not in os.listdir(out) and sorted(os.listdir(tmp_path)) == ["merged"]


def test_merge_and_export_commands(tiny, tmp_path, capsys):
    assert main(["merge", "--model", tiny[0], "--adapter", tiny[1], "--output", str(tmp_path / "m"),
                 "--dtype", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "transformers"
    assert Path(tmp_path / "m" / "model.safetensors").is_file()
    assert main(["export", "--format", "peft", "--model", tiny[0], "--output", str(tmp_path / "p")]) == 2
    assert "exactly one --adapter" in capsys.readouterr().err
    assert main(["merge", "--model", tiny[0], "--adapter", str(tmp_path / "nope"),
                 "--output", str(tmp_path / "x")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
