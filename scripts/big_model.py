"""QLoRA on LLaMA-7B / 33B-shaped models on this (CPU, 24 GB) machine: the paper's "33B on one 24 GB
device", measured. Real weights this size cannot be downloaded here, so the script writes a LLaMA
checkpoint of the paper's shapes with random weights, then runs `qlora train` on it for a few steps
(batch 1, short sequences, gradient checkpointing, paged AdamW with a RAM budget, streaming 4-bit
load) and prints the measured peak RSS, load and step times beside `qlora memory`'s prediction.

    python scripts/big_model.py --size 7B
    python scripts/big_model.py --size 33B --lora-r 16 --steps 2 --dir /tmp/qlora-big
    python scripts/big_model.py --size 7B --nproc 2 --shard-base   # FSDP2: each rank holds half the layers

The checkpoint: bf16 safetensors shards (<= --shard-gb each) written tensor by tensor, so the
generator holds one random pool, never a shard or the model. Matrices are N(0, 0.02²); each one is
a window at a random offset into a pool of 2^27 N(0, 0.02²) values (drawing 32.5B fresh normals
would take most of an hour on 2 cores, and neither the 4-bit load nor a training step depends on
the values' independence). Norm weights are 1. The byte-level tokenizer of tests/tiny.py (ids < 260)
is saved alongside; the model keeps LLaMA's 32000-entry vocabulary. The checkpoint and the run's
output are deleted at the end unless --keep.

Peak RSS is the training process's own (os.wait4's ru_maxrss; this parent stays far smaller, so
the value it passes to its child on fork does not mask it); with --nproc, the largest rank's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GB, GiB = 10**9, 2**30
VOCAB = 32000
SIZES = {  # LLaMA-1 (Touvron et al. 2023, table 2)
    "7B": dict(hidden=4096, layers=32, intermediate=11008, heads=32),
    "33B": dict(hidden=6656, layers=60, intermediate=17920, heads=52),
}
POOL = 1 << 27  # values in the random pool (256 MB in bf16)


def llama_shapes(hidden: int, layers: int, intermediate: int, **_) -> list[tuple[str, tuple[int, ...]]]:
    """LLaMA's checkpoint tensors in file order (untied head, no biases)."""
    shapes = [("model.embed_tokens.weight", (VOCAB, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (intermediate, hidden)),
                   (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate)), (p + "input_layernorm.weight", (hidden,)),
                   (p + "post_attention_layernorm.weight", (hidden,))]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (VOCAB, hidden))]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _shard_plan(shapes, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, size = [[]], 0
    for name, shape in shapes:
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_checkpoint(out: Path, size: str, shard_bytes: int, seed: int = 0) -> int:
    """Write config.json, tokenizer and bf16 shards + index; returns the bytes of weights written."""
    import torch
    from transformers import LlamaConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/tiny.py, a test fixture
    from tiny import tiny_tokenizer

    spec = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=VOCAB, hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"],
                max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    g = torch.Generator().manual_seed(seed)
    pool = torch.empty(POOL, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g).view(torch.int16).numpy()
    ones = torch.ones(spec["hidden"], dtype=torch.bfloat16).view(torch.int16).numpy()
    plan = _shard_plan(llama_shapes(**spec), shard_bytes)
    weight_map, total = {}, 0
    for k, tensors in enumerate(plan):
        name = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape in tensors:
            header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * _numel(shape)]}
            offset += 2 * _numel(shape)
            weight_map[key] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        with open(out / name, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for key, shape in tensors:
                n = _numel(shape)
                if len(shape) == 1:
                    f.write(ones[:n].tobytes())
                    continue
                start = int(torch.randint(0, POOL, (1,), generator=g))
                while n:  # the window wraps around the pool
                    take = min(n, POOL - start)
                    f.write(memoryview(pool[start : start + take]))
                    n, start = n - take, 0
        total += offset
        print(f"  wrote {name} ({offset / GB:.2f} GB)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def write_data(path: Path, rows: int = 64) -> None:
    """Plain-text rows longer than any --seq-len, so every example is cut to exactly seq-len tokens."""
    words = "the quick brown fox jumps over the lazy dog while five boxing wizards jump quickly".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(80))}) + "\n")


def estimate(model_dir: Path, a) -> dict:
    """`qlora memory`'s prediction (bytes) for the same settings: a training step, and the load."""
    cmd = [sys.executable, "-m", "qlora", "memory", "--model", str(model_dir), "--json", "--lora-r", str(a.lora_r),
           "--batch-size", "1", "--seq-len", str(a.seq_len), "--gradient-checkpointing", "--optimizer", "paged_adamw",
           "--optimizer-memory-budget", a.optimizer_budget, "--shards", str(a.nproc if a.shard_base else 1)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    b = json.loads(out)["breakdown"]
    return {"step": int(b["total"]), "load": int(b.get("load_peak", 0))}


def _status(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ":")), 0)
    except OSError:
        return 0


def _largest_rss(pid: int) -> int:
    """VmRSS of the largest process among pid and its descendants (the ranks under --nproc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    todo, best = [pid], 0
    while todo:
        p = todo.pop()
        best = max(best, _status(p, "VmRSS"))
        todo += children.get(p, [])
    return best


def run_training(cmd: list[str], log: Path, metrics: Path) -> dict:
    """Run `qlora train`; time the load (start -> the trainer's `data:` line, printed once the
    model is loaded and wrapped) and each step (arrival of its metrics line); peak RSS from wait4."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        load_s, rss_after_load, marks = None, 0, []
        while True:
            got, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if got:
                break
            now = time.perf_counter() - t0
            if load_s is None and "data: " in log.read_text(errors="replace"):
                load_s, rss_after_load = now, _largest_rss(proc.pid)
            if metrics.exists():
                lines = [ln for ln in metrics.read_text().splitlines() if '"loss"' in ln]
                marks += [now] * (len(lines) - len(marks))
            time.sleep(0.25)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"qlora train failed (exit {os.waitstatus_to_exitcode(status)}); last lines of {log}:\n"
                 + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    steps = [b - a for a, b in zip([load_s, *marks], marks)]
    records = [json.loads(ln) for ln in metrics.read_text().splitlines() if '"loss"' in ln]
    return dict(peak_rss=usage.ru_maxrss * 1024, load_s=load_s, rss_after_load=rss_after_load, step_s=steps,
                # the trainer's own peak when it logged the last step: before the final checkpoint is written
                steps_peak_rss=int(records[-1]["peak_rss_mb"] * 2**20), losses=[r["loss"] for r in records],
                total_s=time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=tuple(SIZES), default="7B")
    ap.add_argument("--dir", default="/tmp/qlora-big",
                    help="where the checkpoint and the run go (needs ~2 bytes/param free)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--optimizer-budget", default="1GB",
                    help="RAM for resident optimizer state; the rest pages to disk")
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and the run")
    ap.add_argument("--force", action="store_true", help="pass --force to qlora train (skip the memory preflight)")
    ap.add_argument("--nproc", type=int, default=1, help="ranks (data parallel; batch = nproc, one example each)")
    ap.add_argument("--shard-base", action="store_true",
                    help="FSDP2: shard the decoder layers' 4-bit weights over the ranks")
    a = ap.parse_args(argv)

    root = Path(a.dir) / f"llama-{a.size}"
    model_dir, run_dir = root / "model", root / "run"
    spec = SIZES[a.size]
    need = 2 * sum(_numel(s) for _, s in llama_shapes(**spec))
    if not (model_dir / "model.safetensors.index.json").exists():
        free = shutil.disk_usage(Path(a.dir).parent if not Path(a.dir).exists() else a.dir).free
        if free < need + 8 * GB:
            sys.exit(f"{a.dir}: {free / GB:.0f} GB free, the {a.size} checkpoint needs {need / GB:.0f} GB "
                     "(+8 GB for the run)")
        print(f"writing a random LLaMA-{a.size} checkpoint ({need / GB:.1f} GB bf16) to {model_dir}", flush=True)
        t = time.perf_counter()
        write_checkpoint(model_dir, a.size, int(a.shard_gb * GB))
        print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    data = root / "data.jsonl"
    write_data(data)
    predicted = estimate(model_dir, a)
    cmd = [sys.executable, "-m", "qlora", "train", "--model", str(model_dir), "--data", str(data), "--output-dir",
           str(run_dir), "--max-steps", str(a.steps), "--batch-size", str(a.nproc), "--max-seq-len", str(a.seq_len),
           "--gradient-checkpointing", "--optimizer", "paged_adamw", "--optimizer-memory-budget", a.optimizer_budget,
           "--lora-r", str(a.lora_r), "--logging-steps", "1", "--save-steps", "0", "--eval-steps", "0",
           "--val-fraction", "0", "--warmup-ratio", "0", "--nproc", str(a.nproc)] + (["--force"] if a.force else [])
    cmd += ["--shard-base"] if a.shard_base else []
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: no metrics of an earlier one
    print("running: " + " ".join(cmd), flush=True)
    m = run_training(cmd, root / "train.log", run_dir / "metrics.jsonl")
    report(a, spec, m, predicted, root)
    if not a.keep:
        shutil.rmtree(root)


def report(a, spec, m: dict, predicted: dict, root: Path) -> None:
    steps = m["step_s"]
    later = steps[1:] or steps
    rows = [
        ("model", f"LLaMA-{a.size} shape ({spec['layers']} layers, hidden {spec['hidden']}), random weights"),
        ("processes", f"{a.nproc}" + (", decoder layers sharded (FSDP2)" if a.shard_base else "")),
        ("LoRA", f"r={a.lora_r}, all linear layers; batch 1 x {a.seq_len} tokens; gradient checkpointing; "
                 f"paged_adamw, {a.optimizer_budget} resident"),
        ("peak RSS, training steps", f"{m['steps_peak_rss'] / GB:.2f} GB ({m['steps_peak_rss'] / GiB:.2f} GiB)"),
        ("peak RSS, whole run",
         f"{m['peak_rss'] / GB:.2f} GB ({m['peak_rss'] / GiB:.2f} GiB), final checkpoint included"),
        ("training step (qlora memory)",
         f"{predicted['step'] / GB:.2f} GB ({predicted['step'] / GiB:.2f} GiB) predicted"),
        ("RSS when loaded (largest rank)" if a.nproc > 1 else "RSS when loaded",
         f"{m['rss_after_load'] / GB:.2f} GB ({m['rss_after_load'] / GiB:.2f} GiB)"),
        ("loading (qlora memory)", f"{predicted['load'] / GB:.2f} GB ({predicted['load'] / GiB:.2f} GiB) predicted"),
        ("load (start -> model ready)", f"{m['load_s']:.0f} s"),
        ("first step", f"{steps[0]:.0f} s" if steps else "-"),
        ("later steps (mean)", f"{sum(later) / len(later):.0f} s" if steps else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    result = dict(size=a.size, lora_r=a.lora_r, seq_len=a.seq_len, optimizer_budget=a.optimizer_budget,
                  nproc=a.nproc, shard_base=a.shard_base,
                  predicted_bytes=predicted, **m)
    procs, sharded = f"-{a.nproc}proc" if a.nproc > 1 else "", "-sharded" if a.shard_base else ""
    out = Path(a.dir) / f"result-{a.size}{procs}{sharded}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\n(saved {out}; the training log was {root / 'train.log'})")


if __name__ == "__main__":
    main()
