"""DPO with a given adapter as the reference (--reference-adapter): the policy starts from it, a frozen
copy of its factors is the reference, the saved adapter is the whole policy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora import adapters, hf
from qlora.config import build_config
from qlora.data import preference
from qlora.errors import QloraError
from qlora.nn.lora import LoRALinear, disabled, reference
from qlora.objectives import sequence_logps
from qlora.train import fit, setup

PAIRS = [{"prompt": f"Repeat {i * 7 % 100}:", "chosen": f" {i * 7 % 100}", "rejected": f" {(i * 7 + 3) % 100}"}
         for i in range(24)]


@pytest.fixture(scope="module")
def sft_adapter(tiny_llama, tmp_path_factory):
    """An 'SFT' adapter (r 4, α 8, random A and B) over the NF4 base the DPO runs quantize."""
    model, _ = hf.load(tiny_llama, compute_dtype=torch.float32, lora=dict(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("sft")
    adapters.save_adapter(model, str(path), tiny_llama)
    return str(path)


def _cfg(tmp_path: Path, model: str, adapter: str, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    base = dict(model=model, data=str(data), output_dir=str(tmp_path / "out"), objective="dpo", max_steps=3,
                batch_size=4, logging_steps=1, save_steps=0, eval_steps=0, val_fraction=0.0, warmup_ratio=0.0,
                threads=1, optimizer="adamw", lr=5e-3, lora_dropout=0.0, reference_adapter=adapter,
                compute_dtype="float32")  # the comparisons below load in fp32; auto is bf16 on AVX512-BF16
    return build_config({**base, **kw})


def _logps(model, batch, context=None):
    with torch.no_grad():
        if context is None:
            return sequence_logps(model, batch)[0]
        with context(model):
            return sequence_logps(model, batch)[0]


def _batch(run):
    return preference.collate_pairs(run.train_set[:4], run.tokenizer.pad_token_id)


def test_policy_and_reference_start_as_the_adapter_then_only_the_policy_moves(tiny_llama, sft_adapter, tmp_path,
                                                                              capsys):
    run = setup(_cfg(tmp_path, tiny_llama, sft_adapter))
    assert (run.cfg.lora_r, run.cfg.lora_alpha) == (4, 8.0)  # the adapter's settings, not the defaults (64, 16)
    assert "LoRA settings from the adapter: lora_r 64 -> 4, lora_alpha 16.0 -> 8.0" in capsys.readouterr().err
    batch = _batch(run)
    loaded, _ = hf.load(tiny_llama, compute_dtype=torch.float32, adapters=[sft_adapter])
    expected = _logps(loaded, batch)
    assert not torch.equal(expected, _logps(run.model, batch, disabled))  # the adapter changes the model
    assert torch.equal(_logps(run.model, batch), expected)  # the policy at step 0
    assert torch.equal(_logps(run.model, batch, reference), expected)  # the reference
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * sum(isinstance(m, LoRALinear) for m in run.model.modules())  # A and B only

    out = fit(run, progress=False)
    recs = [json.loads(ln) for ln in (Path(out["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: log 2 per pair
    assert recs[-1]["reward_margin"] != 0  # the policy has left the reference
    run.model.eval()
    assert torch.equal(_logps(run.model, batch, reference), expected)  # the reference stays the adapter
    policy = _logps(run.model, batch)
    assert not torch.equal(policy, expected)  # while the policy moved

    saved = load_file(str(Path(out["output_dir"]) / "adapter_model.safetensors"))
    assert saved.keys() == load_file(str(Path(sft_adapter) / "adapter_model.safetensors")).keys()  # no copy saved
    again, _ = hf.load(tiny_llama, compute_dtype=torch.float32, adapters=[out["output_dir"]])
    assert torch.equal(_logps(again, batch), policy)  # the saved adapter alone is the trained policy


def test_resume_with_a_reference_adapter_is_bitwise(tiny_llama, sft_adapter, tmp_path):
    full = fit(setup(_cfg(tmp_path / "full", tiny_llama, sft_adapter, max_steps=4, save_steps=2)), progress=False)
    fit(setup(_cfg(tmp_path / "part", tiny_llama, sft_adapter, max_steps=2, save_steps=2)), progress=False)
    resumed = fit(setup(_cfg(tmp_path / "part", tiny_llama, sft_adapter, max_steps=4, save_steps=2,
                             resume="latest")), progress=False)
    timing = ("tokens_per_s", "peak_rss_mb")
    recs = lambda d: [{k: v for k, v in json.loads(ln).items() if k not in timing}  # noqa: E731
                      for ln in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    assert recs(full["output_dir"]) == recs(resumed["output_dir"])
    a = load_file(str(Path(full["output_dir"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed["output_dir"]) / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpts = Path(resumed["output_dir"]) / "checkpoints"
    state = json.loads(next(ckpts.glob("step-*/trainer_state.json")).read_text())
    assert state["config"]["reference_adapter"] == sft_adapter


@pytest.mark.parametrize("values, match", [
    (dict(objective="orpo", reference_adapter="runs/sft"),
     "arguments: reference_adapter applies to objective dpo with lora_init gaussian only .got objective orpo"),
    (dict(objective="sft", reference_adapter="runs/sft"), "got objective sft"),
    (dict(objective="dpo", lora_init="pissa", reference_adapter="runs/sft"), "lora_init pissa"),
])
def test_reference_adapter_needs_dpo(values, match):
    with pytest.raises(QloraError, match=match):
        build_config(values, source="arguments")


def test_bad_reference_adapters_are_one_line_errors(tiny_llama, sft_adapter, tmp_path):
    with pytest.raises(QloraError, match="nowhere/adapter_config.json: missing"):
        setup(_cfg(tmp_path, tiny_llama, str(tmp_path / "nowhere")))
    with pytest.raises(QloraError, match=r"adapter trained on a nf4\+dq@64 base, this run quantizes fp4\+dq@64"):
        setup(_cfg(tmp_path, tiny_llama, sft_adapter, quant_type="fp4"))


def test_preflight_counts_the_frozen_copy():
    from qlora.memory.estimate import estimate
    from qlora.memory.plan import settings_for

    plain = settings_for(build_config({"objective": "dpo", "lora_r": 8}))
    given = settings_for(build_config({"objective": "dpo", "lora_r": 8, "reference_adapter": "a"}))
    assert (plain["reference_copy"], given["reference_copy"]) == (False, True)
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
    a, b = estimate(config, **plain), estimate(config, **given)
    assert b.lora_weights == 2 * a.lora_weights and b.lora_grads == a.lora_grads and b.total > a.total


def test_a_dora_adapter_keeps_its_magnitude_in_the_reference(tiny_llama, tmp_path):
    model, _ = hf.load(tiny_llama, compute_dtype=torch.float32, lora=dict(r=4, alpha=8, dropout=0.0, dora=True))
    torch.manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.05)
                m.lora_magnitude.mul_(1.1)
    adapters.save_adapter(model, str(tmp_path / "dora"), tiny_llama)
    run = setup(_cfg(tmp_path / "run", tiny_llama, str(tmp_path / "dora")))
    assert run.cfg.dora
    batch = _batch(run)
    loaded, _ = hf.load(tiny_llama, compute_dtype=torch.float32, adapters=[str(tmp_path / "dora")])
    expected = _logps(loaded, batch)
    assert torch.equal(_logps(run.model, batch), expected)
    assert torch.equal(_logps(run.model, batch, reference), expected)
    with torch.no_grad():  # what optimizer steps do: move every trainable factor, the magnitudes included
        trainable = [p for p in run.model.parameters() if p.requires_grad]
        assert any(p.dim() == 1 for p in trainable)  # DoRA's magnitudes train
        for p in trainable:
            p.mul_(0.9)
    assert not torch.equal(_logps(run.model, batch), expected)
    assert torch.equal(_logps(run.model, batch, reference), expected)
