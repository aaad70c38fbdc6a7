"""`qlora memory`: the peak-memory breakdown of a training config, and with --budget a plan of what
fits. Reads only the model's config (config.json or GGUF metadata), never its weights."""

from __future__ import annotations

import argparse

from ..config import TrainConfig, field_docs
from ..precision import spelled
from .options import field_help

# flag -> TrainConfig field whose default and help text it shares (one copy of each)
_SHARED = ("quant_type", "double_quant", "blocksize", "quantize_head", "compute_dtype", "lora_r", "lora_targets",
           "lora_dropout", "lora_dtype", "batch_size", "gradient_checkpointing", "saved_activations", "optimizer",
           "optimizer_memory_budget")


def register(sub) -> None:
    import typing

    p = sub.add_parser(
        "memory", help="estimate peak training memory; with --budget, find the largest batch/rank that fits",
        description="Peak memory of a QLoRA training step, part by part (4-bit weights and scales, 16-bit "
        "weights, LoRA weights, gradients, optimizer state, activations, loss logits, overhead), from the "
        "model's config alone. Defaults are `qlora train`'s.",
    )
    p.add_argument("--model", help="HF model dir, config.json, GGUF file, hub name (reads its config.json), or a "
                   "LLaMA size (7B, 13B, 33B, 65B, 70B). Default: the embedded SmolLM2-135M-Instruct")
    hints, docs, defaults = typing.get_type_hints(TrainConfig), field_docs(), TrainConfig()
    for name in _SHARED:
        flag, default = "--" + name.replace("_", "-"), getattr(defaults, name)
        helptext = field_help(docs[name], default)
        tp = hints[name]
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        elif typing.get_origin(tp) is typing.Literal:
            p.add_argument(flag, choices=typing.get_args(tp), default=default, help=helptext,
                           type=spelled)
        else:
            kind = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Union else tp
            p.add_argument(flag, type=kind, default=default, metavar=name.upper(), help=helptext)
    p.add_argument("--seq-len", "--max-seq-len", dest="seq_len", type=int, default=defaults.max_seq_len,
                   help=field_help(docs["max_seq_len"], defaults.max_seq_len))
    p.add_argument("--target-tokens", type=int, default=None,
                   help="loss (target) tokens per sequence (default: all of --seq-len)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where training runs: framework overhead, dropout masks, and what 'available' means")
    p.add_argument("--shards", type=int, default=1, metavar="N",
                   help="ranks of `qlora train --nproc N --shard-base`: the estimate is one rank's (default: 1)")
    p.add_argument("--budget", help="memory budget, e.g. 24GB or 24GiB: print the options that fit")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from dataclasses import asdict

    from ..config import parse_size
    from ..memory import estimate, human, largest_batch, load_model_config, memory_available, plan
    from ..memory.report import plan_table

    cfg = load_model_config(args.model)
    opt_budget = args.optimizer_memory_budget
    settings = dict(
        quant_type=args.quant_type, double_quant=args.double_quant, blocksize=args.blocksize,
        quantize_head=args.quantize_head, compute_dtype=args.compute_dtype, lora_r=args.lora_r,
        lora_targets=args.lora_targets, lora_dropout=args.lora_dropout, lora_dtype=args.lora_dtype,
        batch_size=args.batch_size,
        seq_len=args.seq_len, target_tokens=args.target_tokens, gradient_checkpointing=args.gradient_checkpointing,
        saved_activations=args.saved_activations, optimizer=args.optimizer, device=args.device, shards=args.shards,
        optimizer_memory_budget=parse_size(opt_budget, "--optimizer-memory-budget") if opt_budget else None,
    )
    b = estimate(cfg, **settings)
    budget = parse_size(args.budget, "--budget") if args.budget else None
    options = plan(cfg, budget, **settings) if budget is not None else None
    avail = memory_available(args.device) if _present(args.device) else None
    if args.json:
        out = {"model": b.model, "breakdown": b.to_dict(), "available_bytes": avail}
        if options is not None:
            out.update(budget_bytes=budget, plan=[asdict(o) for o in options])
        print(json.dumps(out, indent=2))
        return 0
    print(b.table())
    if avail is not None:
        if b.peak <= avail:
            verdict = "fits"
        elif b.load_peak > avail:
            verdict = "does not fit: loading alone needs more"
        else:
            verdict = f"does not fit; largest batch that fits: {largest_batch(cfg, avail, args.batch_size, **settings)}"
        print(f"\navailable now ({args.device}): {human(avail)} -> {verdict}")
    if options is not None:
        print()
        print(plan_table(options, budget))
        print(f"\nsearch: for each optimizer and checkpointing on/off, the largest batch in 1, 2, 4 .. 64 at "
              f"{args.seq_len} tokens and r={args.lora_r}, then the largest rank in 8 .. 256 at that batch. "
              "Paged optimizers may keep part of their state paged out (to disk on CPU, host memory on CUDA) "
              "at the cost of copies every step, so options without paging come first; --grad-accum restores "
              "the effective batch of a smaller one.")
    return 0


def _present(device: str) -> bool:
    """Whether this machine has `device`, so that 'available now' means something."""
    if device == "cpu":
        return True
    import torch

    return torch.cuda.is_available()
