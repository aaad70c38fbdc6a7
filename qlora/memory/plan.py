"""What fits: the largest batch for a budget, a small search over optimizer / checkpointing /
batch / rank, and the trainer's preflight check against the memory available now."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

from .. import distributed
from ..config import TrainConfig, parse_size
from ..errors import QloraError
from .arch import load_model_config
from .estimate import OPTIMIZERS, Breakdown, estimate
from .report import human

PLAN_BATCHES = (1, 2, 4, 8, 16, 32, 64)
PLAN_RANKS = (8, 16, 32, 64, 128, 256)
# Preference among optimizers with equal memory: the paper's choice first, exact fp32 state before 8-bit.
_OPTIMIZER_ORDER = ("paged_adamw", "adamw", "paged_adamw_8bit", "adamw_8bit")


@dataclass(frozen=True)
class PlanOption:
    optimizer: str
    gradient_checkpointing: bool
    batch_size: int
    lora_r: int
    total: int  # estimated peak bytes of this option (of batch 1 at the smallest rank if nothing fits)
    fits: bool
    optimizer_memory_budget: int | None = None  # resident state of a paged optimizer, when it must page


def largest_batch(model_config: dict, budget: int, max_batch: int = 1024, **settings) -> int:
    """The largest batch size in 1..max_batch whose estimate fits `budget` bytes; 0 if none does.
    Memory grows with the batch, so a bisection finds it."""
    def fits(b: int) -> bool:
        return estimate(model_config, **{**settings, "batch_size": b}).total <= budget

    if max_batch < 1 or not fits(1):
        return 0
    lo, hi = 1, max_batch
    if fits(hi):
        return hi
    while hi - lo > 1:  # lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _fit(model_config: dict, budget: int, settings: dict) -> tuple[bool, int, int | None]:
    """(fits, peak, paged budget). A paged optimizer without a fixed budget may keep resident only
    what the rest leaves free, down to its largest page (qlora.optim refuses less)."""
    b = estimate(model_config, **settings)
    if b.total <= budget:
        return True, b.total, None
    paged = settings["optimizer"].startswith("paged_") and settings.get("optimizer_memory_budget") is None
    room = budget - (b.total - b.optimizer_states)
    if paged and room >= b.optimizer_largest_page:
        return True, budget, room
    return False, b.total, None


def plan(model_config: dict, budget_bytes: int, **fixed) -> list[PlanOption]:
    """For each optimizer and checkpointing on/off: the largest batch (powers of two up to 64) at
    the requested rank (default 64), then the largest rank (8..256) at that batch. Paged optimizers
    may page state out to fit. Best first: options that fit, without paging (a step re-reads paged
    state), larger batch (more tokens per step), no checkpointing (no recompute), larger rank,
    then the optimizer preference above."""
    for key in ("optimizer", "gradient_checkpointing", "batch_size"):
        fixed.pop(key, None)
    rank = fixed.pop("lora_r", 64)
    ranks = sorted(set(PLAN_RANKS) | {rank})
    options = []
    for optimizer in OPTIMIZERS:
        kw = dict(fixed, optimizer=optimizer)
        if not optimizer.startswith("paged_"):
            kw.pop("optimizer_memory_budget", None)
        for ckpt in (False, True):
            def fit(b: int, r: int) -> tuple[bool, int, int | None]:
                return _fit(model_config, budget_bytes, dict(kw, gradient_checkpointing=ckpt, batch_size=b, lora_r=r))

            batch = max((b for b in PLAN_BATCHES if fit(b, rank)[0]), default=0)
            if not batch and fit(1, ranks[0])[0]:
                batch = 1
            if not batch:
                options.append(PlanOption(optimizer, ckpt, 0, 0, fit(1, ranks[0])[1], False))
                continue
            best = max(r for r in ranks if fit(batch, r)[0])
            _, total, paged = fit(batch, best)
            options.append(PlanOption(optimizer, ckpt, batch, best, total, True, paged))
    return sorted(options, key=lambda o: (not o.fits, o.optimizer_memory_budget is not None, -o.batch_size,
                                          o.gradient_checkpointing, -o.lora_r, _OPTIMIZER_ORDER.index(o.optimizer)))


# ---- preflight ----


def memory_available(device: str = "cpu") -> int:
    """Memory this process can grow to now: what it holds plus what the system can still give
    (MemAvailable on Linux; free + reserved device memory on CUDA)."""
    import torch

    from ..optim.optimizer import available_memory

    dev = torch.device(device)
    if dev.type == "cuda":
        return available_memory(dev) + torch.cuda.memory_reserved(dev)
    return available_memory(dev) + _rss()


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name.split(":")[0]


def settings_for(cfg: TrainConfig, device: str = "cpu") -> dict:
    """estimate() keywords for a training config. The loss covers target positions only: at most
    max_target_len per sequence for single-answer formats (alpaca, completion), any position
    otherwise (multi-turn answers, plain text, or a format still to be detected)."""
    prompt_response = cfg.data_format in ("alpaca", "completion") and not cfg.train_on_source
    pair = cfg.objective != "sft"  # two sequences per pair, one answer each; DPO's reference pass keeps no activations
    budget = cfg.optimizer_memory_budget
    return dict(
        quant_type=cfg.quant_type, double_quant=cfg.double_quant, blocksize=cfg.blocksize,
        quantize_head=cfg.quantize_head, lora_r=cfg.lora_r, lora_targets=cfg.lora_targets,
        lora_dropout=cfg.lora_dropout, lora_dtype=cfg.lora_dtype, batch_size=cfg.batch_size * (2 if pair else 1),
        seq_len=cfg.max_seq_len, target_tokens=cfg.max_target_len if prompt_response or pair else None,
        gradient_checkpointing=cfg.gradient_checkpointing, saved_activations=cfg.saved_activations,
        optimizer=cfg.optimizer,
        optimizer_memory_budget=parse_size(budget, "optimizer_memory_budget") if budget else None,
        compute_dtype=cfg.compute_dtype, device=device,
        shards=max(cfg.nproc, distributed.world_size()) if cfg.shard_base else 1, objective=cfg.objective,
        reference_copy=cfg.reference_adapter is not None,
    )


def preflight(cfg: TrainConfig, model_config: dict | None = None, available_bytes: int | None = None) -> Breakdown:
    """Estimate the run's peak before any weight is loaded; raise QloraError if it exceeds the
    memory available (unless cfg.force). Returns the estimate."""
    model_config = load_model_config(cfg.model) if model_config is None else model_config
    device = _device(cfg.device)
    avail = memory_available(device) if available_bytes is None else available_bytes
    if available_bytes is None and device == "cpu":  # the ranks on this machine share its memory
        avail //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    kw = settings_for(cfg, device)
    b = estimate(model_config, **kw)
    if kw["optimizer"].startswith("paged_") and kw["optimizer_memory_budget"] is None:
        # build_optimizer keeps half of what is free once the model is loaded resident
        loaded = b.framework_overhead + b.weights_4bit + b.weights_16bit + b.lora_weights
        kw["optimizer_memory_budget"] = max(0, avail - loaded) // 2
        b = estimate(model_config, **kw)
    if b.peak <= avail:
        return b
    if b.load_peak > avail:
        message = (f"loading {b.model} needs about {human(b.load_peak)} ("
                   + ("GGUF files are dequantized whole before quantizing; a safetensors copy streams one tensor "
                      "at a time" if b.source_format == "gguf" else "4-bit weights plus the largest tensor")
                   + f") but {human(avail)} is available on {device}; pass --force to start anyway")
    else:
        message = _too_big_message(cfg, model_config, kw, b.total, avail, device)
    if cfg.force:
        print(f"warning: {message.split('; pass --force')[0]} (--force given: starting anyway)", file=sys.stderr)
        return b
    raise QloraError(message)


def _too_big_message(cfg: TrainConfig, model_config: dict, kw: dict, total: int, avail: int, device: str) -> str:
    what = (f"batch {cfg.batch_size} x {cfg.max_seq_len} tokens, {cfg.quant_type}, r={cfg.lora_r}, {cfg.optimizer}"
            + (", gradient checkpointing" if cfg.gradient_checkpointing else ""))
    head = f"estimated peak memory {human(total)} ({what}) exceeds the {human(avail)} available on {device}"
    batch = largest_batch(model_config, avail, max_batch=cfg.batch_size - 1, **kw)
    if batch:
        accum = math.ceil(cfg.batch_size * cfg.grad_accum / batch)
        hint = (f"the largest batch size that fits is {batch} (--batch-size {batch} --grad-accum {accum} keeps "
                f"the effective batch)")
    elif not cfg.gradient_checkpointing and (b := largest_batch(
            model_config, avail, max_batch=cfg.batch_size, **{**kw, "gradient_checkpointing": True})):
        hint = f"the largest batch size that fits is 0 without checkpointing, {b} with --gradient-checkpointing"
    else:
        tries = [] if cfg.gradient_checkpointing else ["--gradient-checkpointing"]
        tries += ["a shorter --max-seq-len", "a smaller --lora-r"]
        tries += [] if "8bit" in cfg.optimizer else ["an 8-bit optimizer"]
        tries += ["a smaller --optimizer-memory-budget"] if cfg.optimizer.startswith("paged_") else []
        hint = f"the largest batch size that fits is 0: try {', '.join(tries[:-1])} or {tries[-1]}"
    return f"{head}; {hint}; pass --force to start anyway"
