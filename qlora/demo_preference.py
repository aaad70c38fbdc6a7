"""The built-in preference demo (`qlora train --objective dpo|orpo` with no --data): pairs from the
SFT demo's extraction task, the correct compact JSON against what the base model itself tends to
write (the record pretty-printed, after a "JSON:" preamble or in a fence, sometimes with a field
wrong) or a plausible wrong record (one field off), so the base starts on the wrong side of most
pairs and improvement is checkable two ways on held-out rows: pair accuracy (the model gives the
correct answer the higher log-probability) and exact match of its greedy answer, before and after.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from . import demo_task
from .config import build_config
from .data import preference
from .demo import exact_match_accuracy, write_rows
from .objectives import sequence_logps, split_pairs
from .train import fit, peak_rss_mb, setup

# Where the user gave none: sized for a 2-core AVX2 CPU (fp32), ~10-15 min for the whole demo: each
# step runs two sequences per pair (and DPO a reference forward besides), and pair accuracy plus
# exact match are scored twice on 100 held-out rows. A LoRA learning rate, not full finetuning's 5e-7.
DEMO_DEFAULTS = dict(
    output_dir="runs/demo-preference", max_steps=30, batch_size=4, lr=5e-4, max_seq_len=160, max_source_len=128,
    max_target_len=64, val_fraction=0.02, eval_steps=30, save_steps=30, logging_steps=5,
)
N_TRAIN, N_TEST = 1000, 100


def field_error(record: dict, rng: random.Random) -> dict:
    """The record with one field plausibly wrong (what an extraction model gets wrong)."""
    record = dict(record)
    kind = rng.choice(("age", "year", "city", "name"))
    if kind == "age":
        record["age"] += rng.choice((-3, -2, -1, 1, 2, 3))
    elif kind == "year":
        record["year"] += rng.choice((-2, -1, 1, 2))
    elif kind == "city":
        record["city"] = rng.choice([c for c in demo_task.CITIES if c != record["city"]])
    else:
        record["name"] = record["name"].split()[0]
    return record


# The base model's own answer styles: SmolLM2-135M-Instruct writes 'JSON:\n{\n  "name": ...' (or a
# fenced block), which it scores far above the compact line, so a pair against one of these starts
# on the wrong side and training must move it (a one-field error alone was already won before training).
VERBOSE = (
    lambda r: "JSON:\n" + json.dumps(r, ensure_ascii=False, indent=2),
    lambda r: json.dumps(r, ensure_ascii=False, indent=2),
    lambda r: "```json\n" + json.dumps(r, ensure_ascii=False, indent=2) + "\n```",
)


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A rejected answer for the compact correct `answer`: the record in a verbose style the base model
    prefers (three pairs in four; half of those with a field wrong as well), or compact with one field wrong."""
    record = json.loads(answer)
    kind = rng.randrange(4)
    if kind == 3:
        return json.dumps(field_error(record, rng), ensure_ascii=False, separators=(",", ":"))
    return VERBOSE[rng.randrange(len(VERBOSE))](field_error(record, rng) if rng.random() < 0.5 else record)


def make_pairs(rows: list[dict], seed: int) -> list[dict]:
    """Chat-format demo rows -> preference rows: prompt (system + user), chosen (the answer), rejected."""
    rng = random.Random(seed)
    return [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1]["content"],
             "rejected": wrong_answer(r["messages"][-1]["content"], rng)} for r in rows]


@torch.no_grad()
def pair_accuracy(model, tokenizer, pairs: list[dict], batch_size: int = 8) -> float:
    """Share of pairs whose chosen answer gets the higher summed log-probability."""
    examples, _ = preference.build_pairs(pairs, tokenizer, 128, 64, 160, source="held-out pairs")
    examples.sort(key=preference.length)  # batches of similar length: less padding to run through the model
    was_training, wins = model.training, 0
    model.eval()
    for start in range(0, len(examples), batch_size):
        batch = preference.collate_pairs(examples[start : start + batch_size], tokenizer.pad_token_id)
        chosen, rejected = split_pairs(sequence_logps(model, {k: v.to(model.device) for k, v in batch.items()})[0])
        wins += int((chosen > rejected).sum())
    model.train(was_training)
    return wins / len(examples)


def run_demo(user_values: dict) -> dict:
    cfg = build_config({**DEMO_DEFAULTS, **user_values}, source="arguments")
    out = Path(cfg.output_dir)
    train_rows, test_rows = demo_task.make_demo_task(n_train=N_TRAIN, n_test=N_TEST, seed=cfg.seed)
    train_pairs, test_pairs = make_pairs(train_rows, cfg.seed), make_pairs(test_rows, cfg.seed + 1)
    cfg.data = str(out / "demo_data" / "train.jsonl")  # written once setup has validated the run
    t0 = time.perf_counter()
    run = setup(cfg, rows=(train_pairs, "preference"))
    write_rows(out / "demo_data", {"train": train_pairs, "test": test_pairs})
    scores = {}
    for when in ("before", "after"):
        if when == "after":
            t1 = time.perf_counter()
            summary = fit(run)
            train_s = time.perf_counter() - t1
        scores[f"pair_accuracy_{when}"] = pair_accuracy(run.model, run.tokenizer, test_pairs)
        scores[f"exact_match_{when}"], results = exact_match_accuracy(run.model, run.tokenizer, test_rows)
        print(f"held-out {when} {cfg.objective}: pair accuracy {scores[f'pair_accuracy_{when}']:.1%}, "
              f"exact match {scores[f'exact_match_{when}']:.1%} ({len(test_rows)} rows)")
    report = dict(summary, objective=cfg.objective, **scores, train_seconds=round(train_s, 1),
                  total_seconds=round(time.perf_counter() - t0, 1), peak_rss_mb=round(peak_rss_mb(), 1),
                  examples=results[:5])
    (out / "demo_results.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
