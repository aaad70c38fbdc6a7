"""qlora/memory/measure.py and allocator.py: measured peaks, and the estimate against a whole run's peak RSS."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from qlora.config import build_config
from qlora.memory import measure_peak_rss, preflight
from qlora.memory.allocator import return_freed_memory


def test_measure_peak_rss():
    small = measure_peak_rss([sys.executable, "-c", "pass"])
    big = measure_peak_rss([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    assert 250 * 2**20 < big - small < 350 * 2**20
    with pytest.raises(RuntimeError, match="exited with 3"):
        measure_peak_rss([sys.executable, "-c", "raise SystemExit(3)"])


# The trainer in a child process, with glibc told to return freed tensors (allocator.py).
_TRAIN = textwrap.dedent("""
    import sys
    from qlora.memory.allocator import return_freed_memory
    return_freed_memory()
    from qlora.cli import main
    sys.exit(main(["train", *sys.argv[1:]]))
""")


def _train_peak_vs_estimate(tmp_path, model: str | None, steps: int, **flags) -> tuple[int, int]:
    data = tmp_path / "long.jsonl"
    words = "the quick brown fox jumps over a lazy dog while estimates hold".split()
    data.write_text("".join(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(900))}) + "\n"
                            for i in range(16)))
    keys = dict(data=str(data), data_format="text", max_steps=steps, val_fraction=0, eval_steps=0, save_steps=0,
                output_dir=str(tmp_path / "run"), device="cpu", **flags)
    if model:
        keys["model"] = model
    script = tmp_path / "train.py"
    script.write_text(_TRAIN)
    args = [a for k, v in keys.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    peak = measure_peak_rss([sys.executable, str(script), *args])
    return peak, preflight(build_config(keys), available_bytes=2**50).peak


def _mid_model(path) -> str:
    import transformers as tf

    from tiny import tiny_tokenizer

    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=260, bos_token_id=257, eos_token_id=258,
                         pad_token_id=259, tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lora_dtype", ["float32", "bfloat16"])
def test_estimate_within_25_percent_of_measured_training_rss(tmp_path, lora_dtype, compute_dtype):
    """The whole run's peak RSS (loading, the step, the final checkpoint and adapter save)."""
    peak, est = _train_peak_vs_estimate(tmp_path, _mid_model(tmp_path / "mid"), 1, batch_size=8, max_seq_len=256,
                                        lora_dtype=lora_dtype, compute_dtype=compute_dtype)
    assert 0.75 < peak / est < 1.25, (peak, est)


@pytest.mark.slow
def test_estimate_within_25_percent_for_the_default_model(tmp_path):
    """fp32 compute, `auto`'s choice without native bf16: the training step is the run's peak here
    (a bf16 run of this size is the mid model's above; bf16 matmuls are slow where fp32 is chosen)."""
    peak, est = _train_peak_vs_estimate(tmp_path, None, 2, batch_size=2, max_seq_len=256, compute_dtype="float32")
    assert 0.75 < peak / est < 1.25, (peak, est)


def test_return_freed_memory_is_harmless():
    assert return_freed_memory() in (True, False)
