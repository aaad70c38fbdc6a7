"""The built-in demo (`qlora train` with no arguments): generate a verifiable extraction task,
score the embedded model on held-out rows, QLoRA-finetune it, score again.

The model is loaded once: LoRA's B starts at zero, so the wrapped model at step 0 *is* the base
model and the "before" score is measured on exactly what training starts from.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import data, demo_task
from .config import build_config
from .generate import GenerationSettings, sample_many
from .train import fit, peak_rss_mb, setup

# Settings for the demo where the user gave none (the paper's defaults target 7B+ models and long
# runs; a 135M model on a 2-core CPU learns this task in minutes at a higher learning rate). 30 steps:
# the training loss is flat from ~step 20 (0.027 at 20, 0.026 at 25 on the AVX2 EPYC), and a CPU
# without native bf16 (fp32, ~10.5 s a step on 2 cores) then finishes the whole demo in ~10 min;
# one validation pass and one checkpoint, at the end.
DEMO_DEFAULTS = dict(
    output_dir="runs/demo", max_steps=30, batch_size=8, lr=1e-3, max_seq_len=160, max_source_len=128,
    max_target_len=64, val_fraction=0.02, eval_steps=30, save_steps=30, logging_steps=5,
)
N_TRAIN, N_TEST = 2000, 100


def exact_match_accuracy(model, tokenizer, rows: list[dict], fmt: str = "chat",
                         max_new_tokens: int = 40) -> tuple[float, list[dict]]:
    """Greedy-decode each held-out prompt (rendered exactly as in training) and compare, through
    generate.sample_many: prompts of one length are prefilled as one batch, then each answer runs
    through the compiled decode step where the model has one (on a CPU without native bf16 ~4x
    faster than transformers' batched generate over the 4-bit layers, which dequantizes every
    weight at every token). A row stops decoding as soon as its answer cannot match any more
    (demo_task.can_still_match; the base model's "JSON:\n{..." after one token): the same score as
    decoding every row to the limit."""
    was_training = model.training
    model.eval()
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    eos = {tokenizer.eos_token_id}
    prompts, refs = zip(*(data.prompt_and_reference(row, fmt, tokenizer) for row in rows)) if rows else ((), ())
    results: list[dict] = [{}] * len(rows)
    for i, tokens in sample_many(model, list(prompts), settings, max_new_tokens):
        answer, text, decided = [], "", False
        for token in tokens:
            if token in eos:
                break
            answer.append(token)
            text = tokenizer.decode(answer, skip_special_tokens=True)
            if not demo_task.can_still_match(text, refs[i]):
                decided = True
                break
        text = text.strip()
        results[i] = {"prediction": text, "reference": refs[i], "correct": demo_task.exact_match(text, refs[i]),
                      "stopped_early": decided}
    model.train(was_training)
    return sum(r["correct"] for r in results) / max(len(results), 1), results


def run_demo(user_values: dict) -> dict:
    cfg = build_config({**DEMO_DEFAULTS, **user_values}, source="arguments")
    out = Path(cfg.output_dir)
    train_rows, test_rows = demo_task.make_demo_task(n_train=N_TRAIN, n_test=N_TEST, seed=cfg.seed)
    data_dir = out / "demo_data"
    cfg.data = str(data_dir / "train.jsonl")  # the path checkpoints record; written once setup has validated the run
    t0 = time.perf_counter()
    run = setup(cfg, rows=(train_rows, "chat"))
    write_rows(data_dir, {"train": train_rows, "test": test_rows})
    before, _ = exact_match_accuracy(run.model, run.tokenizer, test_rows)
    print(f"held-out exact match before finetuning: {before:.1%} ({len(test_rows)} rows)")
    t1 = time.perf_counter()
    summary = fit(run)
    train_s = time.perf_counter() - t1
    after, results = exact_match_accuracy(run.model, run.tokenizer, test_rows)
    print(f"held-out exact match after finetuning:  {after:.1%}  (training {train_s / 60:.1f} min)")
    report = dict(summary, exact_match_before=before, exact_match_after=after, train_seconds=round(train_s, 1),
                  total_seconds=round(time.perf_counter() - t0, 1), peak_rss_mb=round(peak_rss_mb(), 1),
                  examples=results[:5])
    (out / "demo_results.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def write_rows(data_dir: Path, sets: dict[str, list[dict]]) -> None:
    """The demo's generated rows as NAME.jsonl under data_dir, for `qlora eval` and inspection."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in sets.items():
        with open(data_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
