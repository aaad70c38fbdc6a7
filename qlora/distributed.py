"""Data-parallel QLoRA on torch.distributed: every rank holds the frozen 4-bit base and its own copy
of the LoRA weights; each optimizer step's global batch (the single-process batch) is split across
ranks, and the LoRA gradients are summed with one all-reduce of one flat buffer.

    qlora train --nproc 2 --data d.jsonl ...          # this machine: torchrun under the hood
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 -m qlora train --data ...

Why the result equals one process (up to summation order): the loss is summed over target tokens
and divided by the step's global target count, which every rank computes from the same global
micro-batch indices, so the summed gradients are the single-process gradients. Clipping, the NaN
guard and the optimizer then see identical gradients on every rank, and the LoRA weights and
optimizer state stay identical without being broadcast. Checkpoints are written by rank 0 only;
the data position in them is global, so a run resumes under any world size.

With shard_base (`--shard-base`), FSDP2 also splits every decoder layer's frozen 4-bit weights over
the ranks (layer_sharder); LoRA stays data-parallel as above.

Everything here is a no-op in a single process (WORLD_SIZE unset or 1).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import QloraError


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether this process is one rank of a multi-process job started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun set up (gloo for CPU, nccl for CUDA) and return this rank's
    device. Ranks other than 0 print nothing: their output would repeat rank 0's."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return device


def shutdown(drain: bool = True) -> None:
    """Leave the process group; with `drain` (a normal end) after every rank got here. Without that
    barrier a rank that tore its gloo group down while another still had traffic in flight made the
    other abort at exit now and then (SIGABRT, "terminate called without an active exception": 3 of
    30 two-rank runs of tests/test_distributed.py's gather check, 0 of 24 with it). After an error
    the other ranks may never arrive: no barrier then."""
    if dist.is_initialized():
        if drain:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard(indices: list[int]) -> list[int]:
    """This rank's share of a micro-batch: every world_size-th example (all of them in one process)."""
    return indices[rank()::world_size()]


def seed_step(seed: int, step: int) -> None:
    """Reseed dropout per (step, rank): ranks draw different masks, and a resumed run, under any
    world size, draws what an uninterrupted one would. One process keeps its single RNG stream."""
    if world_size() > 1:
        torch.manual_seed(seed + 1_000_003 * (step + 1) + rank())


def all_reduce_grads(params: list[torch.nn.Parameter], *scalars: float) -> tuple[float, ...]:
    """Sum the parameters' gradients and `scalars` (loss, token count) over ranks: one all-reduce of
    one flat fp32 buffer, LoRA gradients being small (r·(in + out) per layer). Returns the summed
    scalars; the gradients are replaced in place. A rank that had no example contributes zeros."""
    if world_size() == 1:
        return scalars
    device = params[0].device
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=device) for p in params]
    flat = torch.cat([*[g.float() for g in grads], torch.tensor(scalars, dtype=torch.float32, device=device)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        summed = flat[offset : offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = summed.clone()
        else:
            p.grad.copy_(summed)
        offset += n
    return tuple(flat[offset:].tolist())


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Sum a few numbers over ranks (in float64); identity in one process."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return tuple(t.tolist())


def layer_sharder(device: torch.device):
    """FSDP2 (torch's fully_shard) for one decoder layer: its frozen parameters (4-bit codes, block
    scales, norms, biases) are split over the ranks and gathered for that layer's forward and again
    for its backward, so a rank holds 1/N of them plus one or two gathered layers at a time. hf.load
    calls it as each layer's weights arrive (a rank never holds the whole base); shard_base covers
    the rest. LoRA weights stay out of FSDP (added after loading, or ignored_params): whole on every
    rank and summed by all_reduce_grads as in plain data parallel, so the optimizer, checkpoints and
    resume under any world size are those of data parallel."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if world_size() == 1:
        raise QloraError("shard_base: needs several processes (--nproc N with N > 1, or torchrun)")
    mesh = init_device_mesh(device.type, (world_size(),))

    def shard(layer: torch.nn.Module) -> None:
        if not isinstance(layer, FSDPModule):
            # reshard_after_forward: each layer is an FSDP root of its own (no wrapped parent), and
            # roots keep their gathered weights from forward to backward by default: the whole base
            fully_shard(layer, mesh=mesh, reshard_after_forward=True,
                        ignored_params={p for p in layer.parameters() if p.requires_grad})

    return shard


def shard_base(model: torch.nn.Module, shard) -> tuple[int, int]:
    """Shard every decoder layer not sharded yet with `shard` (layer_sharder). Embeddings, final norm
    and head stay whole (small next to the layers; the loss calls the head outside the model's
    forward). Returns (bytes of the layers' frozen parameters on this rank, on all ranks)."""
    from .hf import decoder_layers

    _, layers = decoder_layers(model)
    for layer in layers:
        shard(layer)
    frozen = [p for p in layers.parameters() if not p.requires_grad]
    return sum(p.to_local().nbytes for p in frozen), sum(p.numel() * p.element_size() for p in frozen)


def launch(cfg) -> dict:
    """Run `qlora train` with this config in cfg.nproc processes on this machine (torchrun,
    standalone rendezvous). The ranks print the run's output; returns a short summary."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="qlora-launch-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(dataclasses.asdict(cfg)), encoding="utf-8")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc}",
               "-m", "qlora", "train", "--config", str(config)]
        # torchrun would give every rank 1 thread; share the cores instead (unless the user chose)
        threads = str(cfg.threads or max(1, (os.cpu_count() or 1) // cfg.nproc))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
        code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        raise QloraError(f"distributed training with {cfg.nproc} processes failed (exit code {code}); "
                         "see the ranks' errors above")
    return {"nproc": cfg.nproc, "output_dir": cfg.output_dir,
            "adapter": str(Path(cfg.output_dir) / "adapter_model.safetensors")}
