"""Data-parallel training on 2 CPU processes (gloo): the same per-step losses as one process with
the same global batch, and a checkpoint written by 2 processes resumes in 1."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora import distributed
from qlora.config import build_config
from qlora.train import train

# Summation order differs (each rank sums its half, then the all-reduce adds the halves; fp32
# throughout) and each half is padded to its own longest row: the losses agree to ~1e-7 relative.
REL_TOL = 1e-5


def _rows(path: Path, n: int = 48) -> str:
    with open(path, "w") as f:
        for i in range(n):  # varied lengths: ranks' halves of a batch pad differently
            f.write(json.dumps({"instruction": f"Repeat {i * 7 % 100}" + " again" * (i % 5), "input": "",
                                "output": f"{i * 7 % 100}" * (1 + i % 3)}) + "\n")
    return str(path)


def _settings(tiny_llama, tmp_path, out: str, batch_size=4, **kw) -> dict:
    # compute in fp32, no dropout: the only difference left between 1 and 2 processes is summation order
    return dict(model=tiny_llama, data=_rows(tmp_path / "d.jsonl"), output_dir=str(tmp_path / out), max_steps=6,
                batch_size=batch_size, grad_accum=2, lora_r=4, lora_dropout=0.0, compute_dtype="float32",
                optimizer="adamw",
                logging_steps=1, save_steps=3, eval_steps=3, val_fraction=0.1, warmup_ratio=0.0, threads=1, **kw)


def _losses(out: Path) -> dict[tuple[int, str], float]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], kind): r[kind] for r in recs for kind in ("loss", "val_loss") if kind in r}


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= REL_TOL * abs(b[k]) for k in a)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_two_processes_match_one_and_resume_in_one(tiny_llama, tmp_path):
    one = _settings(tiny_llama, tmp_path, "one")
    train(build_config(one), progress=False)
    two = _settings(tiny_llama, tmp_path, "two")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in two.items()]
    r = subprocess.run([sys.executable, "-m", "qlora", "train", *flags, "--nproc=2"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"skipped_steps"') == 1  # rank 1 prints nothing
    ref, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(ref) == 8 and _close(got, ref), (got, ref)  # 6 train losses, 2 validation losses
    trainer_state = json.loads((tmp_path / "two" / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert trainer_state["config"]["nproc"] == 2 and trainer_state["cursor"] == 6  # global position: 3 steps × 2
    for k, t in _adapter(tmp_path / "one").items():
        torch.testing.assert_close(_adapter(tmp_path / "two")[k], t, rtol=1e-4, atol=1e-6)

    # the 2-process checkpoint at step 3 continues in one process
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-000003"
    train(build_config(_settings(tiny_llama, tmp_path, "resumed", resume=str(ckpt))), progress=False)
    assert _close(_losses(tmp_path / "resumed"), ref)


def test_single_process_helpers_are_identity():
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard([3, 1, 4]) == [3, 1, 4]
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    assert distributed.all_reduce_grads([p], 1.5, 7) == (1.5, 7)
    assert torch.equal(p.grad, torch.full((2,), 3.0))
    before = torch.get_rng_state()
    distributed.seed_step(0, 5)
    assert torch.equal(torch.get_rng_state(), before)


def test_nproc_must_be_positive(tiny_llama, tmp_path):
    from qlora.config import ConfigError

    with pytest.raises(ConfigError, match="nproc must be > 0"):
        build_config(_settings(tiny_llama, tmp_path, "x", nproc=0))


@pytest.mark.parametrize("checkpointing,batch", [(False, 4), (True, 1)])
def test_sharded_base_matches_one_process(tiny_llama, tmp_path, checkpointing, batch):
    """FSDP2 over the decoder layers' frozen 4-bit weights: same losses and adapter as one process,
    each rank holding half of those weights and gathering them per layer (in the recomputation of
    gradient checkpointing too; with batch 1, rank 1 has no example and runs a zero-weight pass)."""
    kw = dict(gradient_checkpointing=checkpointing, batch_size=batch)
    one = _settings(tiny_llama, tmp_path, "one", **kw)
    train(build_config(one), progress=False)
    two = _settings(tiny_llama, tmp_path, "two", shard_base=True, **kw)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in two.items() if not isinstance(v, bool)]
    flags += [f"--{'' if v else 'no-'}{k.replace('_', '-')}" for k, v in two.items() if isinstance(v, bool)]
    r = subprocess.run([sys.executable, "-m", "qlora", "train", *flags, "--nproc=2"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    held, whole = map(float, re.search(r"holds ([\d.e+-]+) of the decoder layers' ([\d.e+-]+) MiB", r.stdout).groups())
    assert 0.45 * whole <= held <= 0.55 * whole, r.stdout
    ref, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(ref) == 8 and _close(got, ref), (got, ref)
    for k, t in _adapter(tmp_path / "one").items():
        torch.testing.assert_close(_adapter(tmp_path / "two")[k], t, rtol=1e-4, atol=1e-6)


def test_sharded_base_needs_several_processes(tiny_llama, tmp_path):
    from qlora.errors import QloraError

    with pytest.raises(QloraError, match="shard_base: needs several processes"):
        train(build_config(_settings(tiny_llama, tmp_path, "x", shard_base=True)), progress=False)


_GATHER_CHECK = r"""
import sys
import torch
from torch.distributed.tensor import DTensor
from qlora import distributed, hf
from qlora.nn.surgery import add_lora
from qlora.train import loss_sum

device = distributed.init(torch.device("cpu"))
shard = distributed.layer_sharder(device)
model, _ = hf.load(sys.argv[1], compute_dtype=torch.float32, on_layer=shard)
add_lora(model, r=4, dropout=0.0)
distributed.shard_base(model, shard)
_, layers = hf.decoder_layers(model)

def gathered():
    return [i for i, layer in enumerate(layers)
            if not all(isinstance(p, DTensor) for p in layer.parameters() if not p.requires_grad)]

ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
s, _ = loss_sum(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids))
assert not gathered(), f"after the forward, layers {gathered()} still hold their gathered weights"
s.backward()
assert not gathered(), f"after the backward, layers {gathered()} still hold their gathered weights"
assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
distributed.shutdown()
print("ok")
"""


def test_sharded_layers_let_go_of_gathered_weights(tiny_llama, tmp_path):
    """Every layer is an FSDP root of its own, and a root keeps what it gathered from forward to
    backward unless told otherwise: that would hold the whole base. Between uses, every layer's
    frozen weights are back to their shards."""
    script = tmp_path / "check.py"
    script.write_text(_GATHER_CHECK)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script), tiny_llama], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]  # rank 1 prints nothing
