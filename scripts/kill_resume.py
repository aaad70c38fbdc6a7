"""Kill test: SIGKILL a real `qlora train` subprocess at random moments, resume, and check that
the final adapter and every logged loss equal an uninterrupted run bit for bit.

Half of the kills are aimed at checkpoint writes (the moment a `.tmp-step-*` directory appears),
the rest land at random times. Runs on a tiny random model; no data or weights needed.

    python scripts/kill_resume.py --kills 4 --steps 24 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_data(path: Path, n: int = 96) -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)}) + "\n")


def train_cmd(model: str, data: Path, out: Path, steps: int, optimizer: str, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "qlora", "train", "--model", model, "--data", str(data), "--output-dir", str(out),
           "--max-steps", str(steps), "--batch-size", "4", "--lora-r", "4", "--logging-steps", "1",
           "--save-steps", "2", "--save-total-limit", "2", "--eval-steps", "0", "--warmup-ratio", "0.1",
           "--optimizer", optimizer, "--seed", "3", "--threads", "1"]
    return cmd + (["--resume"] if resume else [])


def same_tensors(a: Path, b: Path) -> bool:
    """Bitwise equality of every tensor (the header's metadata order is not deterministic)."""
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    as_bytes = lambda t: t.contiguous().view(-1).view(torch.uint8)  # noqa: E731  (NaN-safe, -0 != +0)
    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(as_bytes(ta[k]), as_bytes(tb[k]))
                                          for k in ta)


def losses(out: Path) -> list[tuple[int, float]]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def _newest(out: Path) -> str:
    done = sorted(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else []
    return done[-1] if done else ""


def _logged(out: Path) -> int:
    """Lines the run has logged so far (one per step: --logging-steps 1)."""
    path = out / "metrics.jsonl"
    return path.read_text(encoding="utf-8").count("\n") if path.exists() else 0


def _random_moment(proc, out: Path, rng: random.Random) -> float:
    """A deadline at a random moment within about the next two steps, in this run's own step time
    (waits for one more logged step to measure it): a fixed span of seconds would let a fast machine
    finish the run before the remaining kills."""
    n, t0 = _logged(out), time.monotonic()
    while proc.poll() is None and _logged(out) <= n:
        time.sleep(0.0005)
    return time.monotonic() + rng.uniform(0.0, 2.0) * (time.monotonic() - t0)


def run_with_kills(cmd_for, out: Path, kills: int, rng: random.Random, log) -> dict:
    """Kill the run `kills` times, each after it has completed one new checkpoint, alternately the
    instant its next checkpoint write starts and at a random moment within the next steps; resume
    each time."""
    counts = {"kills": 0, "during_checkpoint_write": 0, "resumes": 0}
    resume = False
    while True:
        start = _newest(out)
        proc = subprocess.Popen(cmd_for(resume), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if counts["kills"] < kills:
            aim_at_write = counts["kills"] % 2 == 0
            writing = lambda: any((out / "checkpoints").glob(f".tmp-step-*-{proc.pid}"))  # noqa: E731
            while proc.poll() is None and _newest(out) <= start:  # progress first: one new checkpoint
                time.sleep(0.002)
            deadline = time.monotonic() + 120 if aim_at_write else _random_moment(proc, out, rng)
            while proc.poll() is None and time.monotonic() < deadline and not (aim_at_write and writing()):
                time.sleep(0.0005)
            if proc.poll() is None:
                in_write = writing()
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                counts["kills"] += 1
                counts["during_checkpoint_write"] += int(in_write)
                when = "during a checkpoint write" if in_write else "between checkpoints"
                log(f"kill {counts['kills']}: SIGKILL {when}"
                    f" (newest complete checkpoint: {_newest(out) or 'none'})")
                resume = bool(_newest(out))
                counts["resumes"] += int(resume)
                continue
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"training exited with {proc.returncode}:\n{err[-2000:]}")
        return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizer", default="paged_adamw")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/tiny.py, a test fixture
    from tiny import save_tiny

    work = Path(a.workdir or tempfile.mkdtemp(prefix="qlora-kill-"))
    model = save_tiny(str(work / "model"), "llama")
    data = work / "data.jsonl"
    write_data(data)
    env_log = lambda msg: print(msg, flush=True)  # noqa: E731
    ref = work / "uninterrupted"
    subprocess.run(train_cmd(model, data, ref, a.steps, a.optimizer, False), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = work / "killed"
    counts = run_with_kills(lambda resume: train_cmd(model, data, killed, a.steps, a.optimizer, resume),
                            killed, a.kills, random.Random(a.seed), env_log)
    same_losses = losses(ref) == losses(killed)
    same_adapter = same_tensors(ref / "adapter_model.safetensors", killed / "adapter_model.safetensors")
    result = dict(counts, steps=a.steps, same_losses=same_losses, same_adapter=same_adapter, workdir=str(work))
    print(json.dumps(result))
    return 0 if same_losses and same_adapter else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
