"""Training throughput and peak memory: qlora vs PEFT + bitsandbytes, same config, same run.

Reference config (CPU performance issue): SmolLM2-135M, NF4 + DQ base, LoRA r 64, α 16 on all
linear layers, batch 4 × 256 tokens, no gradient checkpointing. qlora computes in --compute-dtype
(default auto: bf16 where the CPU multiplies bf16 natively, else fp32); the peer, PEFT +
bitsandbytes, runs in both fp32 and bf16 (its compute dtype is the user's choice), and the ratios
are taken against its faster row: each contender at its fastest setting on this machine. Each
contender runs in its own subprocess (peak RSS is per process). The roofline is measured in the
same run: torch's matmul GFLOP/s in qlora's compute dtype on the model's own shapes, divided into
the step's FLOPs per token. qlora keeps its saved activations as `qlora train` would
(--saved-activations, default auto: bf16 copies when auto picked fp32 compute). Last, qlora again
with gradient checkpointing on, and, when it computes in fp32, with the other saved-activations
setting (exact fp32, or bf16 kept).

    python benchmarks/bench_train.py [--steps 6] [--warmup 2] [--compute-dtype auto|bfloat16|float32]
                                     [--saved-activations auto|compute|bfloat16]
                                     [--only qlora|qlora_gc|qlora_exact|qlora_kept|peft_fp32|peft_bf16|roofline]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("QLORA_BENCH_CACHE", "/tmp/qlora-bench"))
BATCH, SEQ, R, ALPHA = 4, 256, 64, 16


def model_dir() -> str:
    """SmolLM2-135M-Instruct as a safetensors dir (dequantized once from the embedded GGUF)."""
    out = CACHE / "smollm2-135m"
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM

        from qlora import hf

        d, f = hf.resolve(None)
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, quantization_config=__import__(
            "transformers").GgufConfig(dequantize=True), dtype=torch.bfloat16)
        m.save_pretrained(out)
        hf.load_tokenizer(d, f).save_pretrained(out)
    return str(out)


def batch_ids(vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(10, vocab - 10, (BATCH, SEQ), generator=g)


def run_qlora(steps: int, warmup: int, dtype: str, checkpointing: bool = False, kept_bf16: bool = False) -> dict:
    import torch

    from qlora import hf
    from qlora.memory import return_freed_memory
    from qlora.nn import fused
    from qlora.nn.checkpointing import enable_gradient_checkpointing
    from qlora.optim import build_optimizer
    from qlora.train import loss_sum

    return_freed_memory()  # as `qlora train` does before loading
    model, _ = hf.load(model_dir(), compute_dtype=dtype, lora=dict(r=R, alpha=ALPHA, dropout=0.05))
    if checkpointing:  # as `qlora train --gradient-checkpointing` does
        enable_gradient_checkpointing(model)
    if kept_bf16:  # as `qlora train --saved-activations bfloat16` does
        fused.keep_saved_in(model, torch.bfloat16)
    model.train()
    ids = batch_ids(model.config.vocab_size)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    opt = build_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], "adamw", lr=2e-4)
    return _time_steps(lambda: _qlora_step(model, batch, opt, loss_sum), steps, warmup)


def _qlora_step(model, batch, opt, loss_sum):
    import torch

    s, n = loss_sum(model, batch)
    (s / n).backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
    opt.step()
    opt.zero_grad()


def run_peft(steps: int, warmup: int, dtype: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=getattr(torch, dtype))
    model = AutoModelForCausalLM.from_pretrained(model_dir(), quantization_config=bnb, dtype=getattr(torch, dtype))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # the usual QLoRA recipe
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    ids = batch_ids(model.config.vocab_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
        opt.step()
        opt.zero_grad()

    return _time_steps(step, steps, warmup)


def _time_steps(step, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t) / steps
    return {"step_s": dt, "tokens_per_s": BATCH * SEQ / dt,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def roofline(dtype: str) -> dict:
    """Matmul GFLOP/s in `dtype` on the model's shapes (forward and input-gradient GEMMs), and the
    FLOPs per token of one training step (forward + backward, frozen base, LoRA r on all linears)."""
    import torch
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir())
    h, i, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out) per layer
    T = BATCH * SEQ
    flops_gemm, secs = 0.0, 0.0
    for fan_in, fan_out in linears + [(h, V)]:
        x = torch.randn(T, fan_in, dtype=getattr(torch, dtype))
        w = torch.randn(fan_out, fan_in, dtype=getattr(torch, dtype))
        g = torch.randn(T, fan_out, dtype=getattr(torch, dtype))
        for _ in range(2):
            x @ w.t(), g @ w
        reps = 5
        t = time.perf_counter()
        for _ in range(reps):
            x @ w.t()
            g @ w
        dt = (time.perf_counter() - t) / reps
        flops = 2 * 2 * T * fan_in * fan_out
        weight = L if (fan_in, fan_out) != (h, V) else 1
        flops_gemm += flops * weight
        secs += dt * weight
    gflops = flops_gemm / secs / 1e9
    base = sum(a * b for a, b in linears) * L
    lora = sum(R * (a + b) for a, b in linears) * L
    attn = 4 * SEQ * h * L  # QK^T and AV, full (not causal-halved) per token
    per_token = 2 * base * 2 + 2 * h * V * 2 + 2 * lora * 3 + attn * 3  # fwd+bwd(input); LoRA also weight grads
    return {"matmul_gflops": gflops, "mflop_per_token": per_token / 1e6,
            "roofline_tokens_per_s": gflops * 1e9 / per_token}


def run(name: str, steps: int, warmup: int, dtype: str, saved: str) -> dict:
    if name == "roofline":
        return roofline(dtype)
    if name.startswith("peft_"):
        return run_peft(steps, warmup, {"peft_fp32": "float32", "peft_bf16": "bfloat16"}[name])
    saved = {"qlora_exact": "compute", "qlora_kept": "bfloat16"}.get(name, saved)
    return run_qlora(steps, warmup, dtype, checkpointing=name == "qlora_gc", kept_bf16=saved == "bfloat16")


LABELS = {"qlora": "qlora", "peft_fp32": "peft + bnb, fp32", "peft_bf16": "peft + bnb, bf16",
          "qlora_gc": "qlora, grad ckpt", "qlora_exact": "qlora, fp32 kept", "qlora_kept": "qlora, bf16 kept"}
ROWS = ("qlora", "peft_fp32", "peft_bf16", "qlora_gc", "qlora_exact", "qlora_kept")


def main() -> None:
    from machine import header

    from qlora.precision import CHOICES, resolve, resolve_saved

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compute-dtype", default="auto", choices=CHOICES, help="qlora's compute dtype (default: auto)")
    ap.add_argument("--saved-activations", default="auto", choices=("auto", "compute", "bfloat16"),
                    help="what qlora keeps for backward, as `qlora train --saved-activations` (default: auto)")
    ap.add_argument("--only", choices=[*ROWS, "roofline"])
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    dtype = resolve(a.compute_dtype, "cpu", announce=False)
    saved = resolve_saved(a.saved_activations, a.compute_dtype, dtype)
    if a.only:
        print(json.dumps(run(a.only, a.steps, a.warmup, dtype, saved)))
        return
    print(header(a.compute_dtype))
    model_dir()
    results = {}
    other = {"compute": "qlora_kept", "bfloat16": "qlora_exact"}[saved] if dtype == "float32" else None
    for name in ("roofline", *ROWS):
        if name in ("qlora_exact", "qlora_kept") and name != other:
            continue  # the row that keeps the other way (bf16 compute keeps bf16 activations already)
        r = subprocess.run([sys.executable, __file__, "--only", name, "--steps", str(a.steps), "--warmup",
                            str(a.warmup), "--compute-dtype", dtype, "--saved-activations", saved],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: failed\n{r.stderr[-1500:]}")
            continue
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
    report(results, dtype, saved)


def report(results: dict, dtype: str, saved: str) -> None:
    roof = results.get("roofline", {})
    print(f"config: SmolLM2-135M NF4+DQ, LoRA r{R} a{ALPHA} all linear, batch {BATCH}x{SEQ}, qlora in {dtype}, "
          f"saved activations {saved}, no grad ckpt, {os.cpu_count()} cores, load avg after {os.getloadavg()[0]:.1f}")
    if roof:
        print(f"{dtype} matmul on the model's shapes: {roof['matmul_gflops']:.0f} GFLOP/s; step cost "
              f"{roof['mflop_per_token']:.0f} MFLOP/token -> roofline {roof['roofline_tokens_per_s']:.0f} tokens/s")
    print(f"{'':20}{'tokens/s':>10}{'step s':>9}{'peak RSS MB':>13}")
    for name in ROWS:
        if name in results:
            r = results[name]
            print(f"{LABELS[name]:20}{r['tokens_per_s']:>10.1f}{r['step_s']:>9.2f}{r['peak_rss_mb']:>13.0f}")
    peers = [n for n in ("peft_fp32", "peft_bf16") if n in results]
    if "qlora" in results and peers:
        best = max(peers, key=lambda n: results[n]["tokens_per_s"])
        p = results[best]
        for name in ("qlora", "qlora_exact", "qlora_kept"):
            if name in results:
                q = results[name]
                print(f"{LABELS[name]} / peft+bnb at its fastest ({LABELS[best]}): "
                      f"throughput {q['tokens_per_s'] / p['tokens_per_s']:.2f}x, "
                      f"peak RSS {q['peak_rss_mb'] / p['peak_rss_mb']:.2f}x")
    if "qlora" in results and "qlora_gc" in results:
        print(f"gradient checkpointing: step time {results['qlora_gc']['step_s'] / results['qlora']['step_s']:.2f}x "
              f"the step without it")
    if "qlora" in results and roof:
        print(f"qlora at {results['qlora']['tokens_per_s'] / roof['roofline_tokens_per_s']:.0%} of the roofline")


if __name__ == "__main__":
    main()
