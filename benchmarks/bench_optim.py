"""Optimizer step time and state memory: fp32 vs 8-bit, resident vs paged, against torch and bitsandbytes.

Parameters: LoRA r=64 on every linear layer of SmolLM2-135M (30 layers, hidden 576, intermediate
1536, 9 query / 3 key-value heads of 64), built directly as tensors - no model load.
Paged runs use budgets of 100%, 50% and 10% of the state; 100% fits, so nothing is paged.

    python benchmarks/bench_optim.py [--steps 5] [--rank 64] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from qlora.optim import build_optimizer

LAYERS, HIDDEN, INTER, KV = 30, 576, 1536, 3 * 64
MODULES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
           "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}


def lora_params(rank: int) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for layer in range(LAYERS):
        for mod, (fan_in, fan_out) in MODULES.items():
            for ab, shape in (("lora_A", (rank, fan_in)), ("lora_B", (fan_out, rank))):
                p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.01)
                p.grad = torch.randn(shape, generator=gen) * 1e-3  # fixed: we time the optimizer only
                out.append((f"model.layers.{layer}.{mod}.{ab}.weight", p))
    return out


def qlora_opt(params, kind, budget=None, offload=None):
    opt = build_optimizer(params, kind, lr=1e-4, memory_budget=budget, offload_dir=offload)

    def stats():
        s = opt.stats()
        return s["state_bytes"], s["peak_resident_bytes"], s["bytes_in"], s["bytes_out"], s["stall_s"]
    return opt, stats, opt.close  # close() also waits for the pager thread: its CPU time is counted


def peer_opt(opt):
    def stats():
        nbytes = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items()
                     if k not in ("step", "qmap1", "qmap2"))  # counters and bnb's shared code tables
        return nbytes, nbytes, 0, 0, 0.0
    return opt, stats, lambda: None


def measure(make, steps: int) -> dict:
    """Wall time per step, and CPU time per step (all threads: the pager's copies included), which
    a busy shared machine distorts much less than wall time."""
    opt, stats, close = make()
    opt.step()  # warm-up: allocates state, pages it out once
    walls = []
    cpu0 = time.process_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        walls.append(time.perf_counter() - t0)
    state, peak, b_in, b_out, stall = stats()
    close()
    n = steps + 1
    return {"wall": min(walls), "wall_med": statistics.median(walls), "cpu": (time.process_time() - cpu0) / steps,
            "state": state, "peak": peak, "in": b_in / n, "out": b_out / n, "stall": stall / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from machine import header

    print(header())
    params = lora_params(args.rank)
    raw = [p for _, p in params]
    n = sum(p.numel() for p in raw)
    print(f"LoRA r={args.rank} on SmolLM2-135M: {len(params)} tensors, {n / 1e6:.2f}M params; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}")
    tmp = tempfile.mkdtemp(prefix="bench-optim-")
    rows = {"torch.optim.AdamW (fp32, foreach=False)":
            measure(lambda: peer_opt(torch.optim.AdamW(raw, lr=1e-4, foreach=False)), args.steps)}
    for bits in ("", "_8bit"):
        rows[f"qlora adamw{bits}"] = base = measure(lambda: qlora_opt(params, "adamw" + bits), args.steps)
        for frac in (1.0, 0.5, 0.1):
            budget = int(base["state"] * frac)
            rows[f"qlora paged_adamw{bits}, budget {frac:.0%}"] = measure(
                lambda: qlora_opt(params, "paged_adamw" + bits, budget, tmp), args.steps)
    try:
        import bitsandbytes as bnb

        rows["bitsandbytes AdamW8bit (CPU)"] = measure(lambda: peer_opt(bnb.optim.AdamW8bit(raw, lr=1e-4)), args.steps)
    except ImportError:
        print("(bitsandbytes not installed: no 8-bit peer row)")
    os.rmdir(tmp)
    print(f"load avg after: {os.getloadavg()[0]:.1f}")
    report(rows)


def report(rows: dict[str, dict]) -> None:
    base = {"": rows["qlora adamw"], "8bit": rows["qlora adamw_8bit"]}
    print("\n| optimizer | CPU per step (ms) | CPU vs unpaged | wall min / median (ms) | state (MB) "
          "| peak held (MB) | paged in / out per step (MB) | stall per step (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        ref = base["8bit" if "8bit" in name else ""]
        print(f"| {name} | {r['cpu'] * 1e3:.0f} | {r['cpu'] / ref['cpu']:.2f}x | {r['wall'] * 1e3:.0f} / "
              f"{r['wall_med'] * 1e3:.0f} | {r['state'] / 1e6:.1f} | {r['peak'] / 1e6:.1f} | "
              f"{r['in'] / 1e6:.0f} / {r['out'] / 1e6:.0f} | {r['stall'] * 1e3:.0f} |")


if __name__ == "__main__":
    main()
