"""DPO training throughput and peak memory: qlora vs TRL's DPOTrainer + PEFT + bitsandbytes.

Same model (SmolLM2-135M-Instruct, NF4 + DQ base, LoRA r 64, α 16 on all linear layers), same
pairs (the preference demo's: qlora.demo_preference.make_pairs), batch 4 pairs, β 0.1, sigmoid
loss, fp32 compute, the reference = the base with the adapter disabled in both. Each contender
runs in its own subprocess (peak RSS is per process); the figure is pairs per second over the
whole training call (its first step included, in both). TRL is a benchmark reference
only, never a qlora dependency (`pip install --no-deps trl`).

    python benchmarks/bench_dpo.py [--steps 6] [--only qlora|trl]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import ALPHA, CACHE, R, model_dir  # noqa: E402

PAIRS, BATCH, BETA, LR, MAX_LEN = 256, 4, 0.1, 5e-4, 160


def pairs() -> list[dict]:
    from qlora import demo_task
    from qlora.demo_preference import make_pairs

    rows, _ = demo_task.make_demo_task(n_train=PAIRS, n_test=0, seed=0)
    return make_pairs(rows, 0)


def run_qlora(steps: int) -> dict:
    from qlora.config import build_config
    from qlora.train import fit, setup

    out = CACHE / "dpo-qlora"
    cfg = build_config(dict(model=model_dir(), data=str(out / "pairs.jsonl"), objective="dpo", beta=BETA, lr=LR,
                            output_dir=str(out), max_steps=steps, batch_size=BATCH, lora_r=R, lora_alpha=ALPHA,
                            max_seq_len=MAX_LEN, val_fraction=0.0, logging_steps=1, save_steps=0, eval_steps=0,
                            optimizer="adamw", compute_dtype="float32", warmup_ratio=0.0))
    run = setup(cfg, rows=(pairs(), "preference"))
    t = time.perf_counter()
    fit(run, progress=False)
    total = time.perf_counter() - t
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return _result(total, steps, recs[-1]["loss"])


def run_trl(steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir(), quantization_config=bnb, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir())
    args = DPOConfig(output_dir=str(CACHE / "dpo-trl"), per_device_train_batch_size=BATCH, max_steps=steps,
                     learning_rate=LR, beta=BETA, loss_type="sigmoid", max_length=MAX_LEN, logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=True, bf16=False, lr_scheduler_type="constant",
                     max_grad_norm=0.3, optim="adamw_torch")
    lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    # TRL reads a pair as conversational when its prompt is a message list, and then wants the answers as
    # messages too: the same pairs, each answer wrapped as one assistant message
    rows = [dict(p, chosen=[{"role": "assistant", "content": p["chosen"]}],
                 rejected=[{"role": "assistant", "content": p["rejected"]}]) for p in pairs()]
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora)
    t = time.perf_counter()
    trainer.train()
    loss = next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)
    return _result(time.perf_counter() - t, steps, loss)


def _result(total: float, steps: int, loss) -> dict:
    return {"steps": steps, "train_s": round(total, 2), "pairs_per_s": round(steps * BATCH / total, 3),
            "last_loss": loss,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--only", choices=("qlora", "trl"))
    ap.add_argument("--child", choices=("qlora", "trl"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps((run_qlora if a.child == "qlora" else run_trl)(a.steps)))
        return
    from machine import header

    print(header("float32"))
    for name in [a.only] if a.only else ["qlora", "trl"]:
        r = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(a.steps)], capture_output=True,
                           text=True)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        print(f"{name}: " + (line[7:] if line else f"failed (rc {r.returncode}): {r.stderr.strip()[-600:]}"))


if __name__ == "__main__":
    main()
