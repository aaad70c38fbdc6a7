"""train(cfg): QLoRA finetuning. Setup runs in the order written; one optimizer step reads top to
bottom in `fit` (forward, token-weighted backward over accumulation, guard, clip, step, schedule,
log, evaluate, checkpoint). No callbacks: to change the loop, change the loop.
"""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__, adapters, checkpoint, data, distributed, hf, precision
from .config import TrainConfig, parse_size, to_dict
from .errors import QloraError
from .nn import lora_init
from .nn.loss import linear_cross_entropy
from .nn.surgery import add_lora


@dataclass
class Run:
    """Everything `fit` needs, built by `setup` before any output is written."""

    cfg: TrainConfig
    model: torch.nn.Module
    tokenizer: object
    train_set: list
    val_set: list
    device: torch.device
    data_stats: dict = field(default_factory=dict)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QloraError(f"device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def setup(cfg: TrainConfig, model=None, tokenizer=None) -> Run:
    """Validate data, load (or take) the model, add LoRA. Writes nothing to disk."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = distributed.init(pick_device(cfg.device))  # under torchrun: join the group, this rank's device
    if cfg.data is None:
        raise QloraError("data: no training file given (the built-in demo is run by `qlora train` with no --data)")
    shard = distributed.layer_sharder(device) if cfg.shard_base else None  # FSDP2 per layer (refuses one process)
    sources = data.read_sources(cfg)  # errors name file:line before the model loads
    cfg.compute_dtype = resolve_compute_dtype(cfg, device)  # concrete from here on: checkpoints record it
    if model is None:
        from .memory import preflight, return_freed_memory

        return_freed_memory()  # glibc: give freed blocks back, so RSS tracks live tensors (and the estimate)
        preflight(cfg)  # the estimate, before any weight is read: refuses a run that will not fit (unless force)
        model, tokenizer = hf.load(
            cfg.model, cfg.quant, compute_dtype=precision.torch_dtype(cfg.compute_dtype),
            quantize_head=cfg.quantize_head, device=device, on_layer=shard,
            lora_init=lora_init.spec(cfg.lora_init, cfg.lora_r, cfg.lora_alpha, cfg.rslora, cfg.loftq_iters),
        )
    torch.manual_seed(cfg.seed)  # LoRA A init
    add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
             targets=cfg.lora_targets, rslora=cfg.rslora, dtype=precision.torch_dtype(cfg.lora_dtype), dora=cfg.dora)
    model.to(device)
    if cfg.shard_base:  # FSDP2: each rank keeps 1/N of every decoder layer's frozen weights
        from .memory import return_freed_memory

        held, whole = distributed.shard_base(model, shard)
        return_freed_memory()
        print(f"shard_base: this rank holds {held / 2**20:.4g} of the decoder layers' {whole / 2**20:.4g} MiB "
              f"of frozen weights ({distributed.world_size()} ranks)")
    train_set, val_set, stats = data.build_mixture(sources, tokenizer, cfg)  # one source: the unmixed run
    if cfg.packing:
        n, train_set = len(train_set), data.pack(train_set, cfg.max_seq_len)
        print(f"packing: {n} examples in {len(train_set)} rows of up to {cfg.max_seq_len} tokens")
    return Run(cfg, model, tokenizer, train_set, val_set, device, stats)


def resolve_compute_dtype(cfg: TrainConfig, device) -> str:
    """cfg.compute_dtype made concrete. 'auto' is the machine's choice (qlora.precision), except on
    resume, where it is the dtype the checkpoint was trained in: a resumed run keeps its arithmetic."""
    if cfg.compute_dtype == "auto" and cfg.resume:
        try:
            ckpt = checkpoint.find_resume(cfg.output_dir, cfg.resume)
        except QloraError:
            ckpt = None  # fit() reports it, with the same message, before anything is written
        saved = checkpoint.read_state(ckpt).get("config", {}).get("compute_dtype") if ckpt else None
        if saved in precision.NAMES:
            print(f"compute dtype: {saved} (auto: as the checkpoint {ckpt.name} was trained)", file=sys.stderr)
            return saved
    return precision.resolve(cfg.compute_dtype, device)


# ---- loss ----


# Attention's outputs are kept under gradient checkpointing (1.2 MB per SmolLM2 layer at 4 x 256
# tokens, plus a logsumexp): recomputing them took 5% of a step; everything else is recomputed.
_KEEP_UNDER_CHECKPOINTING = tuple(getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name))


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (transformers' per-layer checkpoint,
    non-reentrant), except attention's outputs (_KEEP_UNDER_CHECKPOINTING)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    keep = functools.partial(create_selective_checkpoint_contexts, list(_KEEP_UNDER_CHECKPOINTING))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": keep})


def loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count.

    The head runs only on positions that have a target: prompt and padding positions never get
    logits, and the fp32 upcast covers (targets × vocab), not (batch × length × vocab)."""
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    inputs = data.model_inputs(batch, model.get_input_embeddings().weight.dtype)  # packed: block-diagonal mask
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1][mask]  # (N, H)
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)  # cap: Gemma
    if type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
        # frozen plain head: chunked, logits never whole, dL/dh formed in forward (nn/loss.py)
        return linear_cross_entropy(hidden, head.weight, labels[mask], cap), int(mask.sum())
    logits = head(hidden).float()  # (N, V)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, labels[mask], reduction="sum"), int(mask.sum())


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over ceil(warmup_ratio·max_steps) steps (step 0 already gets lr/warmup), then
    constant (paper), linear or cosine decay to 0."""
    warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.lr_scheduler == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    if cfg.lr_scheduler == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def validation_loss(run: Run) -> float | None:
    if not run.val_set:
        return None
    run.model.eval()
    total, count = 0.0, 0
    lengths = [len(e["input_ids"]) for e in run.val_set]
    for idx in data.epoch_batches(lengths, run.cfg.batch_size, run.cfg.seed, 0, False):
        idx, weight = _my_share(idx, run.cfg)  # data parallel: this rank's share
        if not idx:
            continue
        batch = _to_device(data.collate([run.val_set[i] for i in idx], run.tokenizer.pad_token_id), run.device)
        s, n = loss_sum(run.model, batch)
        total, count = total + weight * float(s), count + int(weight * n)
    total, count = distributed.sum_over_ranks(total, count)
    run.model.train()
    return total / max(count, 1)


def _my_share(idx: list[int], cfg: TrainConfig) -> tuple[list[int], float]:
    """This rank's examples of a micro-batch and the weight of its loss. A rank left without any
    (a batch smaller than the world) skips it, except under shard_base: every rank must then run
    every layer's forward and backward, whose FSDP gathers are collective, so it runs the batch's
    first example with weight 0 (zero loss, zero gradients)."""
    mine = distributed.shard(idx)
    if mine or not cfg.shard_base:
        return mine, 1.0
    return idx[:1], 0.0


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the loop ----


def fit(run: Run, progress: bool = True) -> dict:
    """Run optimizer steps until cfg.max_steps; resumable; returns a summary dict."""
    from tqdm import tqdm

    from .optim import build_optimizer

    cfg, model = run.cfg, run.model
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    budget = parse_size(cfg.optimizer_memory_budget) if cfg.optimizer_memory_budget else None
    opt = build_optimizer(params, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          memory_budget=budget, offload_dir=str(out / "optimizer_pages"))
    lengths = [len(e["input_ids"]) for e in run.train_set]
    step, epoch, cursor = 0, 0, 0
    metrics_path = out / "metrics.jsonl"
    main = distributed.is_main()  # data parallel: rank 0 alone writes metrics, checkpoints and the adapter
    if cfg.resume:
        ckpt = checkpoint.find_resume(cfg.output_dir, cfg.resume)
        state, opt_tensors, rng_tensors = checkpoint.load(ckpt)
        _check_compatible(state, cfg, ckpt)
        if state.get("data_digest") not in (None, run.data_stats.get("digest")):  # same files, mixture, seed
            raise QloraError(f"{ckpt}: the training examples differ from the checkpoint's (data, mixture, columns "
                             "or lengths changed); resume with the same data and settings")
        adapters.load_weights(model, ckpt)
        opt.load_state(opt_tensors, state["optimizer"])
        checkpoint.set_rng_state(rng_tensors, state["rng"])
        step, epoch, cursor = state["step"], state["epoch"], state["cursor"]
        if main:
            _truncate_metrics(metrics_path, step)
        print(f"resumed from {ckpt} at step {step}")
    elif main and metrics_path.exists():
        metrics_path.unlink()  # a fresh run owns its metrics file
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    batches = data.epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)
    last_good = str(checkpoint.candidates(ckpt_root)[0]) if checkpoint.candidates(ckpt_root) else None
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (progress and main), unit="step", dynamic_ncols=True)
    t_log, tokens_log, losses, skipped = time.perf_counter(), 0, [], 0
    with open(metrics_path if main else os.devnull, "a", encoding="utf-8") as log:
        while step < cfg.max_steps:
            # 1. collect this step's micro-batches (advancing epochs as needed)
            micro = []
            for _ in range(cfg.grad_accum):
                if cursor == len(batches):
                    epoch, cursor = epoch + 1, 0
                    batches = data.epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)
                micro.append(batches[cursor])
                cursor += 1
            # 2. forward/backward, loss weighted by target tokens across the accumulated batches
            #    (n_targets counts the whole global batch, so data-parallel ranks scale their shares alike)
            n_targets = sum(sum(1 for t in run.train_set[i]["labels"][1:] if t != -100) for idx in micro for i in idx)
            distributed.seed_step(cfg.seed, step)
            step_loss, step_tokens = 0.0, 0
            for idx in micro:
                idx, weight = _my_share(idx, cfg)  # data parallel: this rank's share of the micro-batch
                if not idx:
                    continue
                batch = data.collate([run.train_set[i] for i in idx], run.tokenizer.pad_token_id)
                batch = _to_device(batch, run.device)
                s, _ = loss_sum(model, batch)
                (s * weight / n_targets).backward()
                step_loss += weight * float(s.detach()) / n_targets
                step_tokens += int(weight * batch["attention_mask"].sum())
            # data parallel: sum LoRA gradients, loss and tokens over ranks (one all-reduce; no-op in one process)
            step_loss, step_tokens = distributed.all_reduce_grads([p for _, p in params], step_loss, step_tokens)
            tokens_log += step_tokens
            # 3. guard, clip, step
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.max_grad_norm))
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                where = f"step {step + 1} (examples {sorted(i for idx in micro for i in idx)[:16]})"
                if cfg.nan_policy == "stop":
                    raise QloraError(f"non-finite loss/gradient at {where}; adapters not saved; "
                                     f"last good checkpoint: {last_good or 'none'}")
                opt.zero_grad(set_to_none=True)
                skipped += 1
                print(f"skipped {where}: non-finite loss/gradient")
            else:
                opt.lr = lr_at(cfg, step)
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(step_loss)
            bar.update(1)
            # 4. log, evaluate, checkpoint
            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                dt = time.perf_counter() - t_log
                rec = {"step": step, "loss": round(sum(losses) / len(losses), 6), "lr": opt.lr,
                       "grad_norm": round(grad_norm, 6), "tokens_per_s": round(tokens_log / dt, 1),
                       "peak_rss_mb": round(peak_rss_mb(), 1)}
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                rss=f"{rec['peak_rss_mb']:.0f}MB")
                log.write(json.dumps(rec) + "\n")
                log.flush()
                t_log, tokens_log, losses = time.perf_counter(), 0, []
            if cfg.eval_steps and (step % cfg.eval_steps == 0 or step == cfg.max_steps) and run.val_set:
                val = validation_loss(run)
                log.write(json.dumps({"step": step, "val_loss": round(val, 6)}) + "\n")
                log.flush()
            if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps:
                if main:  # the other ranks hold the same state; they wait so that none runs ahead of it
                    last_good = str(checkpoint.save(
                        ckpt_root, step, lambda d: adapters.save_adapter(model, d, cfg.model), opt,
                        dict(epoch=epoch, cursor=cursor, config=to_dict(cfg), data_digest=run.data_stats.get("digest"),
                             qlora_version=__version__),
                        cfg.save_total_limit))
                distributed.barrier()
    bar.close()
    opt_stats = opt.stats()  # state size, and what paging cost: bytes in/out, evictions, stall time
    opt.close()
    if main:
        _publish_adapter(model, out, cfg, run.data_stats.get("chat_format"))
        _plot(metrics_path, out / "loss.png")
        if opt_stats.get("bytes_out"):
            print(f"optimizer {opt_stats['kind']}: {opt_stats['state_bytes'] / 2**20:.1f} MiB of state, paged "
                  f"{opt_stats['bytes_in'] / 2**20:.0f} MiB in / {opt_stats['bytes_out'] / 2**20:.0f} MiB out, "
                  f"waited {opt_stats['stall_s']:.2f} s", file=sys.stderr)
    return {"steps": step, "skipped_steps": skipped, "output_dir": str(out), "checkpoint": last_good,
            "peak_rss_mb": round(peak_rss_mb(), 1), "optimizer": opt_stats}


def _check_compatible(state: dict, cfg: TrainConfig, ckpt: Path) -> None:
    old = state.get("config", {})
    for key in ("model", "lora_r", "lora_targets", "lora_dtype", "dora", "lora_init", "quant_type", "optimizer",
                "batch_size", "grad_accum", "seed"):
        if key in old and old[key] != getattr(cfg, key):
            raise QloraError(f"{ckpt}: checkpoint was written with {key}={old[key]!r}, this run has "
                             f"{key}={getattr(cfg, key)!r}; resume with the same settings")


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


def _publish_adapter(model, out: Path, cfg: TrainConfig, chat_format: str | None = None) -> None:
    """Write the final adapter next to metrics.jsonl, each file replaced atomically, never NaN; with
    the chat format its data taught (data.chat.RECORD: generate, chat and serve use it by default)."""
    for name, t in adapters.adapter_state_dict(model).items():
        if not torch.isfinite(t).all():
            raise QloraError(f"adapter weight {name} is not finite; the final adapter was not written")
    tmp = out / f".adapter-tmp-{os.getpid()}"
    adapters.save_adapter(model, str(tmp), cfg.model)
    if chat_format:
        (tmp / data.chat.RECORD).write_text(json.dumps({"chat_format": chat_format}) + "\n", encoding="utf-8")
    elif (out / data.chat.RECORD).exists():
        (out / data.chat.RECORD).unlink()  # a previous run's record would not describe this adapter
    for f in ("adapter_model.safetensors", "adapter_config.json") + ((data.chat.RECORD,) if chat_format else ()):
        os.replace(tmp / f, out / f)
    tmp.rmdir()


def _plot(metrics_path: Path, png: Path) -> None:
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


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Load, finetune, save. For the built-in demo (no data), see qlora.demo.run."""
    if cfg.nproc > 1 and not distributed.launched():
        return distributed.launch(cfg)  # re-runs this in cfg.nproc processes, which take the branch below
    try:
        run = setup(cfg)
        summary = fit(run, progress=progress)
    finally:
        distributed.shutdown()
    summary["data"] = run.data_stats
    return summary
