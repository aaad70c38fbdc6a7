"""Training throughput with and without --packing on short-row (Alpaca-style) data.

Same model, data, seed and steps; each run in its own subprocess. Tokens/s counts real tokens
(padding excluded), from metrics.jsonl, averaged over the steps after the warmup ones. Packing
fills each row up to --seq tokens with several examples; unpacked rows are padded to the longest
example of their batch (group-by-length on, as by default).

    python benchmarks/bench_packing.py [--data ../shared/data/instruct/code_alpaca_2k.jsonl]
                                       [--steps 4] [--warmup 1] [--batch 4] [--seq 512] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(args, packing: bool, out: Path) -> dict:
    cfg = dict(data=args.data, max_steps=args.steps, batch_size=args.batch, max_seq_len=args.seq, packing=packing,
               output_dir=str(out), logging_steps=1, eval_steps=0, save_steps=0, val_fraction=0.0, seed=0,
               **({"model": args.model} if args.model else {}))
    code = ("import json, sys; from qlora.config import build_config; from qlora.train import train; "
            "train(build_config(json.loads(sys.argv[1])))")
    subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    timed = recs[args.warmup:]
    return {"packing": packing, "steps timed": len(timed),
            "tokens/s": round(sum(r["tokens_per_s"] for r in timed) / len(timed), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/instruct/code_alpaca_2k.jsonl"))
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
    from machine import header

    print(header())
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one(args, p, Path(tmp) / f"packing-{p}") for p in (False, True)]
    for r in rows:
        print(json.dumps(r))
    print(f"packing speed-up (real tokens/s): {rows[1]['tokens/s'] / rows[0]['tokens/s']:.2f}x")


if __name__ == "__main__":
    main()
