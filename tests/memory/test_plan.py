"""qlora/memory/plan.py: the planner, the largest batch, and the trainer's preflight."""

from __future__ import annotations

import sys

import pytest

from qlora.config import build_config
from qlora.errors import QloraError
from qlora.memory import GiB, config_for_size, estimate, largest_batch, plan, preflight
from qlora.memory.estimate import SHARD_GATHERED_LAYERS

from .helpers import PAPER, train_config as _cfg


def test_fp32_lora_33b_needs_paging_on_24gb():
    """qlora keeps LoRA weights in fp32: 33B then fits 24 GiB only by paging optimizer state out."""
    settings = {**PAPER, "lora_dtype": "float32"}
    assert estimate(config_for_size("33B"), **settings).total > 24 * GiB
    best = next(o for o in plan(config_for_size("33B"), 24 * GiB, **settings) if o.optimizer == "paged_adamw"
                and o.gradient_checkpointing)
    assert best.fits and best.optimizer_memory_budget is not None
    paged = {**settings, "batch_size": best.batch_size, "lora_r": best.lora_r,
             "optimizer_memory_budget": best.optimizer_memory_budget}
    assert estimate(config_for_size("33B"), **paged).total <= 24 * GiB



# ---- planner ----


def test_largest_batch_is_the_edge():
    cfg, budget = config_for_size("7B"), 12 * GiB
    b = largest_batch(cfg, budget, gradient_checkpointing=True)
    assert b > 1
    assert estimate(cfg, batch_size=b, gradient_checkpointing=True).total <= budget
    assert estimate(cfg, batch_size=b + 1, gradient_checkpointing=True).total > budget
    assert largest_batch(cfg, 1 * GiB) == 0


def test_plan_options_fit_the_budget():
    cfg, budget = config_for_size("13B"), 16 * GiB
    options = plan(cfg, budget, seq_len=512, device="cuda")
    assert len(options) == 8 and options[0].fits
    for o in options:
        kw = dict(seq_len=512, device="cuda", optimizer=o.optimizer, gradient_checkpointing=o.gradient_checkpointing)
        if not o.fits:
            assert estimate(cfg, **kw, batch_size=1, lora_r=8).total > budget
            continue
        kw.update(lora_r=o.lora_r, optimizer_memory_budget=o.optimizer_memory_budget)
        assert estimate(cfg, **kw, batch_size=o.batch_size).total <= budget
        if o.batch_size < 64 and o.optimizer_memory_budget is None and o.lora_r >= 64:
            assert estimate(cfg, **kw, batch_size=2 * o.batch_size).total > budget  # the largest power of two


# ---- preflight ----



def test_preflight_passes_and_refuses():
    cfg = _cfg(gradient_checkpointing=True, optimizer="adamw")
    b = preflight(cfg, available_bytes=64 * GiB)
    assert b.total <= 64 * GiB
    budget = 8 * GiB
    fits = largest_batch(config_for_size("7B"), budget, max_batch=7, gradient_checkpointing=True,
                         optimizer="adamw", seq_len=512)
    assert 0 < fits < 8
    with pytest.raises(QloraError) as e:
        preflight(cfg, config_for_size("7B"), available_bytes=budget)
    msg = str(e.value)
    assert "\n" not in msg and "8.00 GiB available" in msg and "--force" in msg
    assert f"largest batch size that fits is {fits} (--batch-size {fits}" in msg
    assert preflight(_cfg(gradient_checkpointing=True, optimizer="adamw", force=True), available_bytes=budget)


def test_preflight_suggests_checkpointing_or_smaller_settings():
    with pytest.raises(QloraError, match="0 without checkpointing, [1-9][0-9]* with --gradient-checkpointing"):
        preflight(_cfg(optimizer="adamw"), available_bytes=8 * GiB)
    with pytest.raises(QloraError, match="fits is 0: try a shorter --max-seq-len, a smaller --lora-r, an 8-bit "
                                         "optimizer or a smaller --optimizer-memory-budget; pass --force"):
        preflight(_cfg(gradient_checkpointing=True), available_bytes=5.5 * GiB)


def test_preflight_pages_like_the_optimizer(capsys):
    """Without a budget a paged optimizer keeps half of what is free after loading resident."""
    avail = 6 * GiB
    b = preflight(_cfg(gradient_checkpointing=True, batch_size=1, force=True), available_bytes=avail)
    loaded = b.framework_overhead + b.weights_4bit + b.weights_16bit + b.lora_weights
    assert b.optimizer_states == (avail - loaded) // 2 and b.optimizer_paged_out > 0
    assert "warning: estimated peak memory" in capsys.readouterr().err  # --force: warned, not refused


@pytest.mark.parametrize("compute_dtype, per_param", [("bfloat16", 6), ("float32", 8)])
def test_preflight_default_model_reads_gguf(compute_dtype, per_param):
    """Loading a GGUF file holds it dequantized to fp32 and the model in the compute dtype."""
    b = preflight(build_config({"device": "cpu", "compute_dtype": compute_dtype}), available_bytes=2**50)
    assert b.model.startswith("SmolLM2") and 130e6 < b.n_params < 140e6  # the embedded SmolLM2
    assert b.source_format == "gguf" and b.load_peak == b.framework_overhead + per_param * b.n_params


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float32"])
def test_preflight_counts_loading(compute_dtype):
    """A GGUF file is dequantized whole before quantizing: loading can need more than training."""
    cfg = build_config({"device": "cpu", "batch_size": 1, "max_seq_len": 32, "compute_dtype": compute_dtype})
    b = preflight(cfg, available_bytes=2**50)
    assert b.total < b.load_peak == b.peak
    with pytest.raises(QloraError, match=r"loading SmolLM2.* needs about 1\.\d\d GiB \(GGUF files are dequantized"):
        preflight(cfg, available_bytes=(b.total + b.load_peak) // 2)
    streamed = estimate(config_for_size("7B"))
    assert streamed.source_format == "" and streamed.load_peak < streamed.total


def test_shard_base_estimate_is_one_ranks_share(monkeypatch):
    """--shard-base: a rank holds 1/N of the decoder layers' 4-bit bytes plus two whole layers; the
    rest of the estimate is unchanged. The ranks on one machine split its available memory."""
    model = config_for_size("7B")
    kw = dict(lora_r=64, batch_size=1, seq_len=32, gradient_checkpointing=True)
    one, two = estimate(model, **kw), estimate(model, shards=2, **kw)
    layers = model["num_hidden_layers"]
    per_layer = one.weights_4bit // layers  # 7B: every quantized weight is in a decoder layer
    assert one.weights_4bit == per_layer * layers
    assert two.weights_4bit == -(-per_layer * layers // 2) + SHARD_GATHERED_LAYERS * per_layer
    assert one.total - two.total == one.weights_4bit - two.weights_4bit
    assert one.load_peak - two.load_peak == one.weights_4bit - two.weights_4bit
    with pytest.raises(QloraError, match="shards must be > 0"):
        estimate(model, shards=0)

    cfg = _cfg(gradient_checkpointing=True, batch_size=1, max_seq_len=32, optimizer="adamw")
    need = preflight(cfg, available_bytes=64 * GiB).peak
    monkeypatch.setattr(sys.modules["qlora.memory.plan"], "memory_available", lambda device="cpu": int(need * 1.5))
    assert preflight(cfg).peak == need
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine: each gets 0.75 of `need`
    with pytest.raises(QloraError, match="exceeds"):
        preflight(cfg)
