"""metrics.jsonl: one JSON record per logged step (and per evaluation), cut back to the checkpoint's
step on resume, plotted to loss.png at the end of a run."""

from __future__ import annotations

import json
import resource
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log_window(log, bar, step: int, window: list[dict], lr: float, grad_norm: float, seconds: float) -> None:
    """One metrics.jsonl record for the steps since the last: mean loss, last lr and norm, tokens/s, peak RSS;
    for preference objectives also the per-pair means of what the window summed (reward margin and
    accuracy, chosen and rejected log-probabilities)."""
    rec = {"step": step, "loss": round(sum(w["loss"] for w in window) / len(window), 6), "lr": lr,
           "grad_norm": round(grad_norm, 6), "tokens_per_s": round(sum(w["tokens"] for w in window) / seconds, 1),
           "peak_rss_mb": round(peak_rss_mb(), 1)}
    pairs = sum(w.get("pairs", 0) for w in window)
    for key in (k for k in window[0] if k not in ("loss", "tokens", "pairs")):
        rec[key] = round(sum(w[key] for w in window) / max(pairs, 1), 6)
    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", rss=f"{rec['peak_rss_mb']:.0f}MB")
    write(log, rec)


def write(log, rec: dict) -> None:
    log.write(json.dumps(rec) + "\n")
    log.flush()


def truncate(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


def plot(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in metrics_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
