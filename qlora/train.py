"""train(cfg): QLoRA finetuning. Setup runs in the order written; one optimizer step reads top to
bottom in `fit` (forward, token-weighted backward over accumulation, guard, clip, step, schedule,
log, evaluate, checkpoint). No callbacks: to change the loop, change the loop.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, adapters, checkpoint, data, distributed, gguf_memo, hf, metrics, objectives, precision
from .config import TrainConfig, parse_size, to_dict
from .data import preference
from .errors import QloraError
from .metrics import peak_rss_mb
from .nn import fused, lora_init
from .nn.checkpointing import enable_gradient_checkpointing
from .nn.lora import keep_reference
from .nn.surgery import add_lora
from .objectives import loss_sum


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
    resume_from: Path | None = None  # the verified checkpoint --resume names, found before anything is written


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QloraError(f"device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def setup(cfg: TrainConfig, model=None, tokenizer=None, rows: tuple[list[dict], str] | None = None) -> Run:
    """Validate data, load (or take) the model, add LoRA. Writes nothing to disk. `rows`: (rows, format)
    already in memory (the built-in demos), validated here as a file's would be, instead of reading cfg.data."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = distributed.init(pick_device(cfg.device))  # under torchrun: join the group, this rank's device
    if cfg.data is None:
        raise QloraError("data: no training file given (the built-in demo is run by `qlora train` with no --data)")
    shard = distributed.layer_sharder(device) if cfg.shard_base else None  # FSDP2 per layer (refuses one process)
    sources = _read_sources(cfg, rows)  # errors name file:line before the model loads
    resume_from = checkpoint.find_resume(cfg.output_dir, cfg.resume) if cfg.resume else None
    resolve_arithmetic(cfg, device, resume_from)  # concrete from here on: checkpoints record them
    if cfg.reference_adapter:  # DPO from a given adapter: its LoRA settings are the run's (estimate, checkpoints)
        vars(cfg).update(adapters.reference_settings(cfg.reference_adapter, cfg.quant, vars(cfg)))
    if model is None:
        from .memory import preflight, return_freed_memory

        return_freed_memory()  # glibc: give freed blocks back, so RSS tracks live tensors (and the estimate)
        with gguf_memo.shared():  # the estimate and the load read a GGUF file's metadata once
            preflight(cfg)  # the estimate, before any weight is read: refuses a run that will not fit (unless force)
            model, tokenizer = hf.load(
                cfg.model, cfg.quant, compute_dtype=precision.torch_dtype(cfg.compute_dtype),
                quantize_head=cfg.quantize_head, device=device, on_layer=shard,
                lora_init=lora_init.spec(cfg.lora_init, cfg.lora_r, cfg.lora_alpha, cfg.rslora, cfg.loftq_iters),
            )
    torch.manual_seed(cfg.seed)  # LoRA A init
    if cfg.reference_adapter:  # the policy starts from the adapter, and a frozen copy of it is DPO's reference
        adapters.start_from(model, cfg.reference_adapter, cfg.lora_dropout, precision.torch_dtype(cfg.lora_dtype))
    else:
        add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets,
                 rslora=cfg.rslora, dtype=precision.torch_dtype(cfg.lora_dtype), dora=cfg.dora)
    model.to(device)
    if cfg.saved_activations != "compute":  # narrower copies for backward (nn.fused.keep_saved_in)
        fused.keep_saved_in(model, precision.torch_dtype(cfg.saved_activations))
    if cfg.reference_adapter:
        keep_reference(model)  # after the move: the copies live where the factors do
    if cfg.shard_base:  # FSDP2: each rank keeps 1/N of every decoder layer's frozen weights
        from .memory import return_freed_memory

        held, whole = distributed.shard_base(model, shard)
        return_freed_memory()
        print(f"shard_base: this rank holds {held / 2**20:.4g} of the decoder layers' {whole / 2**20:.4g} MiB "
              f"of frozen weights ({distributed.world_size()} ranks)")
    if cfg.objective == "sft":
        train_set, val_set, stats = data.build_mixture(sources, tokenizer, cfg)  # one source: the unmixed run
    else:
        train_set, val_set, stats = preference.build_sets(sources, tokenizer, cfg)
    if cfg.packing:
        n, train_set = len(train_set), data.pack(train_set, cfg.max_seq_len)
        print(f"packing: {n} examples in {len(train_set)} rows of up to {cfg.max_seq_len} tokens")
    return Run(cfg, model, tokenizer, train_set, val_set, device, stats, resume_from)


def _read_sources(cfg: TrainConfig, given: tuple[list[dict], str] | None) -> list:
    """data.read_sources' (source, rows, format) list for cfg.data, or for rows given in memory (the
    built-in demos), validated for cfg.objective: preference rows for dpo/orpo."""
    if cfg.objective != "sft":
        return preference.read_sources(cfg.data, None if given is None else given[0])
    if given is None:
        return data.read_sources(cfg)
    data.validate_rows(*given, cfg.data)
    return [(data.parse_sources(cfg.data)[0], *given)]


def resolve_arithmetic(cfg: TrainConfig, device, ckpt: Path | None = None) -> None:
    """cfg.compute_dtype and cfg.saved_activations made concrete (checkpoints record them). 'auto' is
    the machine's choice (qlora.precision; saved activations: precision.resolve_saved), except on
    resume, where it is what the checkpoint `ckpt` ran with: a resumed run keeps its arithmetic."""
    kept = checkpoint.read_state(ckpt).get("config", {}) if ckpt else {}
    requested = cfg.compute_dtype
    if requested == "auto" and kept.get("compute_dtype") in precision.NAMES:
        cfg.compute_dtype = kept["compute_dtype"]
        print(f"compute dtype: {cfg.compute_dtype} (auto: as the checkpoint {ckpt.name} was trained)", file=sys.stderr)
    else:
        cfg.compute_dtype = precision.resolve(requested, device)
    if cfg.saved_activations == "auto" and kept.get("saved_activations") not in (None, "auto"):
        cfg.saved_activations = kept["saved_activations"]
        return
    choice = precision.resolve_saved(cfg.saved_activations, requested, cfg.compute_dtype)
    if cfg.saved_activations == "auto" and choice != "compute":
        print(f"saved activations: {choice} (auto: with {cfg.compute_dtype} compute, backward reads {choice} copies of "
              "the norm inputs, gate and up; --saved-activations compute keeps them exact)", file=sys.stderr)
    cfg.saved_activations = choice


# ---- loss ----


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
    """The objective's loss over the validation set, weighted as in training (per target token for sft)."""
    if not run.val_set:
        return None
    run.model.eval()
    total, count = 0.0, 0
    lengths = [preference.length(e) for e in run.val_set]
    for idx in data.epoch_batches(lengths, run.cfg.batch_size, run.cfg.seed, 0, False):
        idx, weight = _my_share(idx, run.cfg)  # data parallel: this rank's share
        if not idx:
            continue
        s, _, _ = batch_loss(run, [run.val_set[i] for i in idx])
        total, count = total + weight * float(s), count + int(weight * sum(run.val_set[i]["targets"] for i in idx))
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


# ---- the loop ----


def fit(run: Run, progress: bool = True) -> dict:
    """Run optimizer steps until cfg.max_steps; resumable; returns a summary dict."""
    from tqdm import tqdm

    cfg, model, main = run.cfg, run.model, distributed.is_main()  # data parallel: rank 0 alone writes files
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)  # setup validated everything: the first thing written
    params, opt = _optimizer(run)
    step, epoch, cursor = resume(run, opt, out / "metrics.jsonl")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    plan = data.BatchPlan(tuple(map(preference.length, run.train_set)), cfg.batch_size, cfg.seed,
                          cfg.group_by_length)
    batches = plan.iterate(epoch, cursor)  # endless (epoch, index, example indices) from the saved position
    last_good = next((str(c) for c in checkpoint.candidates(out / "checkpoints")), None)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (progress and main), unit="step", dynamic_ncols=True)
    window, skipped, t_log = [], 0, time.perf_counter()
    with open(out / "metrics.jsonl" if main else os.devnull, "a", encoding="utf-8") as log:
        while step < cfg.max_steps:
            # 1. this step's micro-batches; the position saved is that of the next one
            epoch, cursor, micro = _take(batches, cfg.grad_accum)
            # 2. forward/backward over the micro-batches, the loss weighted by target tokens (sft) or pairs
            distributed.seed_step(cfg.seed, step)
            step_loss, step_tokens, sums = _forward_backward(run, micro)
            # data parallel: sum LoRA gradients, loss, tokens and metrics over ranks (one all-reduce; no-op alone)
            step_loss, step_tokens, *totals = distributed.all_reduce_grads(params, step_loss, step_tokens,
                                                                           *sums.values())
            # 3. guard, clip, step
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            if math.isfinite(step_loss) and math.isfinite(grad_norm):
                opt.lr = lr_at(cfg, step)
                opt.step()
            else:
                skipped += _refuse_or_skip(cfg, step, micro, last_good)
            opt.zero_grad(set_to_none=True)
            step += 1
            window.append({"loss": step_loss, "tokens": step_tokens, **dict(zip(sums, totals))})
            bar.update(1)
            # 4. log, evaluate, checkpoint
            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                metrics.log_window(log, bar, step, window, opt.lr, grad_norm, time.perf_counter() - t_log)
                window, t_log = [], time.perf_counter()
            if cfg.eval_steps and (step % cfg.eval_steps == 0 or step == cfg.max_steps) and run.val_set:
                metrics.write(log, {"step": step, "val_loss": round(validation_loss(run), 6)})
            if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps:
                last_good = _save(run, opt, step, epoch, cursor) if main else last_good
                distributed.barrier()  # the other ranks hold the same state; they wait so that none runs ahead of it
    bar.close()
    return finish(run, opt, dict(steps=step, skipped_steps=skipped, output_dir=str(out), checkpoint=last_good))


def _optimizer(run: Run):
    """(the trainable parameters, the optimizer over them); paged state pages under output_dir."""
    from .optim import build_optimizer

    cfg = run.cfg
    named = [(n, p) for n, p in run.model.named_parameters() if p.requires_grad]
    budget = parse_size(cfg.optimizer_memory_budget) if cfg.optimizer_memory_budget else None
    return [p for _, p in named], build_optimizer(named, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                  memory_budget=budget,
                                                  offload_dir=str(Path(cfg.output_dir) / "optimizer_pages"))


def _save(run: Run, opt, step: int, epoch: int, cursor: int) -> str:
    """A full checkpoint (adapter, optimizer, RNG, data position, config), written atomically."""
    cfg = run.cfg
    return str(checkpoint.save(Path(cfg.output_dir) / "checkpoints", step,
                               lambda d: adapters.save_adapter(run.model, d, cfg.model), opt,
                               dict(epoch=epoch, cursor=cursor, config=to_dict(cfg),
                                    data_digest=run.data_stats.get("digest"), qlora_version=__version__),
                               cfg.save_total_limit))


def _forward_backward(run: Run, micro: list[list[int]]) -> tuple[float, int, dict]:
    """Backward of the step's loss, token-weighted (sft) or pair-weighted (dpo, orpo) across the
    accumulated micro-batches: n_targets counts the whole global batch, so data-parallel ranks scale
    their shares alike. -> (loss, tokens, metric sums) of this rank."""
    n_targets = sum(run.train_set[i]["targets"] for idx in micro for i in idx)
    loss, tokens, sums = 0.0, 0, {}
    for idx in micro:
        idx, weight = _my_share(idx, run.cfg)  # data parallel: this rank's share of the micro-batch
        if not idx:
            continue
        s, n, batch_sums = batch_loss(run, [run.train_set[i] for i in idx])
        (s * weight / n_targets).backward()
        loss += weight * float(s.detach()) / n_targets
        tokens += int(weight * n)
        for k, v in batch_sums.items():
            sums[k] = sums.get(k, 0.0) + weight * v
    if run.cfg.objective != "sft" and not sums:  # a rank without examples still all-reduces the same keys
        sums = dict.fromkeys(objectives.PREFERENCE_METRICS, 0.0)
    return loss, tokens, sums


def batch_loss(run: Run, examples: list[dict]) -> tuple[torch.Tensor, int, dict]:
    """(summed loss, tokens, metric sums) of one micro-batch: the loss summed over what `example["targets"]`
    counts (target tokens for sft, pairs for dpo/orpo)."""
    pad = run.tokenizer.pad_token_id
    if run.cfg.objective == "sft":
        batch = _to_device(data.collate(examples, pad), run.device)
        return loss_sum(run.model, batch)[0], int(batch["attention_mask"].sum()), {}
    batch = _to_device(preference.collate_pairs(examples, pad), run.device)
    s, sums = objectives.preference_loss(run.model, batch, run.cfg.objective, run.cfg.beta)
    return s, int(batch["attention_mask"].sum()), sums


def resume(run: Run, opt, metrics_path: Path) -> tuple[int, int, int]:
    """(step, epoch, cursor) to start from: the checkpoint's, with adapter, optimizer, RNG and metrics
    restored to it; or zeros for a fresh run, which owns its metrics file."""
    main = distributed.is_main()
    if run.resume_from is None:
        if main and metrics_path.exists():
            metrics_path.unlink()
        return 0, 0, 0
    ckpt = run.resume_from
    state, opt_tensors, rng_tensors = checkpoint.load(ckpt)
    _check_compatible(state, run.cfg, ckpt)
    if state.get("data_digest") not in (None, run.data_stats.get("digest")):  # same files, mixture, seed
        raise QloraError(f"{ckpt}: the training examples differ from the checkpoint's (data, mixture, columns "
                         "or lengths changed); resume with the same data and settings")
    adapters.load_weights(run.model, ckpt)
    opt.load_state(opt_tensors, state["optimizer"])
    checkpoint.set_rng_state(rng_tensors, state["rng"])
    if main:
        metrics.truncate(metrics_path, state["step"])
    print(f"resumed from {ckpt} at step {state['step']}")
    return state["step"], state["epoch"], state["cursor"]


def _take(batches, n: int) -> tuple[int, int, list[list[int]]]:
    """The next n batches of the endless plan, and the data position (epoch, index) after them."""
    taken = [next(batches) for _ in range(n)]
    return taken[-1][0], taken[-1][1] + 1, [idx for _, _, idx in taken]


def _refuse_or_skip(cfg: TrainConfig, step: int, micro: list[list[int]], last_good: str | None) -> int:
    """A non-finite loss or gradient: stop (nan_policy=stop, nothing saved) or count a skipped step."""
    where = f"step {step + 1} (examples {sorted(i for idx in micro for i in idx)[:16]})"
    if cfg.nan_policy == "stop":
        raise QloraError(f"non-finite loss/gradient at {where}; adapters not saved; "
                         f"last good checkpoint: {last_good or 'none'}")
    print(f"skipped {where}: non-finite loss/gradient")
    return 1


def finish(run: Run, opt, summary: dict) -> dict:
    """Close the optimizer; rank 0 publishes the final adapter and the loss plot. -> the run's summary."""
    opt_stats = opt.stats()  # state size, and what paging cost: bytes in/out, evictions, stall time
    opt.close()
    out = Path(run.cfg.output_dir)
    if distributed.is_main():
        _publish_adapter(run.model, out, run.cfg, run.data_stats.get("chat_format"))
        metrics.plot(out / "metrics.jsonl", out / "loss.png")
        if opt_stats.get("bytes_out"):
            print(f"optimizer {opt_stats['kind']}: {opt_stats['state_bytes'] / 2**20:.1f} MiB of state, paged "
                  f"{opt_stats['bytes_in'] / 2**20:.0f} MiB in / {opt_stats['bytes_out'] / 2**20:.0f} MiB out, "
                  f"waited {opt_stats['stall_s']:.2f} s", file=sys.stderr)
    return dict(summary, peak_rss_mb=round(peak_rss_mb(), 1), optimizer=opt_stats)


def _check_compatible(state: dict, cfg: TrainConfig, ckpt: Path) -> None:
    old = state.get("config", {})
    for key in ("model", "objective", "reference_adapter", "lora_r", "lora_targets", "lora_dtype", "quant_type",
                "optimizer", "batch_size", "grad_accum", "seed"):
        if key in old and old[key] != getattr(cfg, key):
            raise QloraError(f"{ckpt}: checkpoint was written with {key}={old[key]!r}, this run has "
                             f"{key}={getattr(cfg, key)!r}; resume with the same settings")




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


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Load, finetune, save. For the built-in demo (no data), see qlora.demo.run."""
    if cfg.nproc > 1 and not distributed.launched():
        return distributed.launch(cfg)  # re-runs this in cfg.nproc processes, which take the branch below
    finished = False
    try:
        run = setup(cfg)
        summary = fit(run, progress=progress)
        finished = True
    finally:
        distributed.shutdown(drain=finished)
    summary["data"] = run.data_stats
    return summary
