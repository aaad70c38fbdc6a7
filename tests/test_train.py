import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora import hf
from qlora.adapters import adapter_state_dict
from qlora.config import build_config
from qlora.errors import QloraError
from qlora.nn.surgery import lora_layers
from qlora.optim import build_optimizer
from tiny import ARCHS
from qlora.train import fit, loss_sum, lr_at, setup


def _write_rows(path: Path, n: int = 40) -> str:
    with open(path, "w") as f:
        for i in range(n):
            n = i * 7 % 100
            f.write(json.dumps({"instruction": f"Repeat {n}.", "input": "", "output": f"{n}"}) + "\n")
    return str(path)


def _cfg(tmp_path, model, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = dict(model=model, data=_write_rows(tmp_path / "d.jsonl"), output_dir=str(tmp_path / "out"), max_steps=6,
                batch_size=4, lora_r=4, logging_steps=1, save_steps=3, eval_steps=0, warmup_ratio=0.0, threads=1)
    return build_config({**base, **kw})


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_decreases_on_a_fixed_batch_and_only_lora_changes(tiny_dirs, arch):
    from qlora import data

    torch.manual_seed(0)  # LoRA A's init: independent of what ran before in this process
    model, tok = hf.load(tiny_dirs[arch], lora=dict(r=8, alpha=16, dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    q_before = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, hf.Linear4bit)}
    rows = [{"prompt": "Say hello to the world", "completion": " hello world!"}] * 4
    ex, _ = data.build_examples(rows, "completion", tok, 64, 32, 96)
    batch = data.collate(ex, tok.pad_token_id)
    opt = build_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], "adamw", lr=1e-2)
    losses = []
    for _ in range(16):
        s, n = loss_sum(model, batch)
        (s / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(s.item() / n)
    assert min(losses[-4:]) < losses[0] * 0.9 and min(losses[8:]) < min(losses[:4]), losses
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    for n, m in model.named_modules():
        if isinstance(m, hf.Linear4bit):
            assert torch.equal(m.weight.data, q_before[n])


def test_loss_sum_matches_transformers_loss(tiny_llama):
    from qlora import data

    model, tok = hf.load(tiny_llama, quant_type="bf16", compute_dtype=torch.float32)
    rows = [{"prompt": "ab", "completion": "cdef"}, {"prompt": "xyz12", "completion": "q"}]
    ex, _ = data.build_examples(rows, "completion", tok, 64, 32, 96)
    batch = data.collate(ex, tok.pad_token_id)
    s, n = loss_sum(model, batch)
    ref = model(**batch).loss  # HF: mean over target tokens
    torch.testing.assert_close(s / n, ref, rtol=1e-5, atol=1e-6)


def test_lr_schedule():
    cfg = build_config({"max_steps": 100, "warmup_ratio": 0.03, "lr": 1e-3})
    assert [lr_at(cfg, s) for s in (0, 1, 2, 3, 99)] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3])
    cos = build_config({"max_steps": 10, "warmup_ratio": 0.0, "lr": 1.0, "lr_scheduler": "cosine"})
    assert lr_at(cos, 0) == 1.0 and lr_at(cos, 5) == pytest.approx(0.5)
    lin = build_config({"max_steps": 10, "warmup_ratio": 0.0, "lr": 1.0, "lr_scheduler": "linear"})
    assert lr_at(lin, 5) == pytest.approx(0.5)


def test_accumulation_is_token_weighted(tiny_llama, tmp_path):
    a = fit(setup(_cfg(tmp_path / "a", tiny_llama, batch_size=4, grad_accum=1, max_steps=1, group_by_length=False,
                       optimizer="adamw", lora_dropout=0.0)), progress=False)
    b = fit(setup(_cfg(tmp_path / "b", tiny_llama, batch_size=2, grad_accum=2, max_steps=1, group_by_length=False,
                       optimizer="adamw", lora_dropout=0.0)), progress=False)
    la = json.loads((Path(a["output_dir"]) / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    lb = json.loads((Path(b["output_dir"]) / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert la == pytest.approx(lb, rel=1e-4)


@pytest.mark.parametrize("optimizer, lora_dtype, dora", [("adamw", "float32", False),
                                                         ("paged_adamw_8bit", "float32", False),
                                                         ("paged_adamw", "bfloat16", False),
                                                         ("adamw", "float32", True)])
def test_resume_is_bitwise_identical(tiny_llama, tmp_path, optimizer, lora_dtype, dora):
    from safetensors.torch import load_file

    kw = dict(optimizer=optimizer, lora_dtype=lora_dtype, dora=dora)
    full = fit(setup(_cfg(tmp_path / "full", tiny_llama, **kw)), progress=False)
    part_cfg = _cfg(tmp_path / "part", tiny_llama, max_steps=3, **kw)
    fit(setup(part_cfg), progress=False)
    resumed = fit(setup(_cfg(tmp_path / "part", tiny_llama, resume="latest", **kw)), progress=False)
    def read(d):
        rows = map(json.loads, (Path(d) / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]

    assert read(full["output_dir"]) == read(resumed["output_dir"])
    a = load_file(str(Path(full["output_dir"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed["output_dir"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    magnitudes = [k for k in a if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == (14 if dora else 0)  # DoRA trains (and resumes) one magnitude per layer
    if dora:
        fresh = hf.load(tiny_llama, compute_dtype="auto", lora=dict(r=4, dora=True))[0]
        start = adapter_state_dict(fresh)
        assert not torch.equal(a[magnitudes[0]], start[magnitudes[0]])


def test_checkpoints_pruned_and_latest(tiny_llama, tmp_path):
    out = fit(setup(_cfg(tmp_path, tiny_llama, max_steps=7, save_steps=2, save_total_limit=2)), progress=False)
    root = Path(out["output_dir"]) / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000006", "step-000007"]
    assert json.loads((root / "latest").read_text()) == {"checkpoint": "step-000007"}
    state = json.loads((root / "step-000007" / "trainer_state.json").read_text())
    assert state["step"] == 7 and state["config"]["lora_r"] == 4 and "qlora_version" in state


def test_nan_guard_stops_and_keeps_previous_adapter(tiny_llama, tmp_path):
    run = setup(_cfg(tmp_path, tiny_llama, max_steps=2, save_steps=1))
    fit(run, progress=False)
    good = (Path(run.cfg.output_dir) / "adapter_model.safetensors").read_bytes()
    run2 = setup(_cfg(tmp_path, tiny_llama, max_steps=4, save_steps=1, resume="latest"))
    layer = next(iter(lora_layers(run2.model).values()))
    # poison the weights at the first forward of the resumed run (after the checkpoint is loaded)
    def poison(mod, args):
        mod.lora_A.weight.data.fill_(float("nan"))

    layer.register_forward_pre_hook(poison)
    with pytest.raises(QloraError, match=r"non-finite loss/gradient at step 3 \(examples \[.*\]\)"
                                         r".*last good checkpoint: .*step-000002"):
        fit(run2, progress=False)
    assert (Path(run.cfg.output_dir) / "adapter_model.safetensors").read_bytes() == good


def test_nan_policy_skip(tiny_llama, tmp_path):
    run = setup(_cfg(tmp_path, tiny_llama, max_steps=2, save_steps=0, nan_policy="skip"))
    layer = next(iter(lora_layers(run.model).values()))
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("inf"))
    with pytest.raises(QloraError, match="not finite; the final adapter was not written"):
        fit(run, progress=False)
    assert not (Path(run.cfg.output_dir) / "adapter_model.safetensors").exists()


def test_resume_refuses_corrupt_checkpoint_and_names_previous(tiny_llama, tmp_path):
    fit(setup(_cfg(tmp_path, tiny_llama, max_steps=4, save_steps=2)), progress=False)
    root = Path(tmp_path / "out" / "checkpoints")
    with open(root / "step-000004" / "optimizer.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    with pytest.raises(QloraError, match=r"does not match its manifest.*previous good checkpoint is .*step-000002"):
        fit(setup(_cfg(tmp_path, tiny_llama, max_steps=6, resume="latest")), progress=False)


def test_resume_refuses_other_settings(tiny_llama, tmp_path):
    fit(setup(_cfg(tmp_path, tiny_llama, max_steps=2, save_steps=2)), progress=False)
    with pytest.raises(QloraError, match="lora_r=4"):
        fit(setup(_cfg(tmp_path, tiny_llama, max_steps=4, lora_r=8, resume="latest")), progress=False)
    with pytest.raises(QloraError, match="lora_dtype='float32'"):
        fit(setup(_cfg(tmp_path, tiny_llama, max_steps=4, lora_dtype="bfloat16", resume="latest")), progress=False)


def test_bf16_lora_only_adapters_change_dtype_and_are_saved_in_bf16(tiny_llama, tmp_path):
    """lora_dtype=bfloat16: A and B (and so their gradients) are bf16, every other tensor is as in
    an fp32-LoRA run, A starts as the fp32 run's A rounded; the adapter file holds the bf16 values
    as they are and loads into fp32 LoRA layers (inference) exactly."""
    from safetensors.torch import load_file

    runs = {d: setup(_cfg(tmp_path / d, tiny_llama, lora_dtype=d, max_steps=2, save_steps=0))
            for d in ("float32", "bfloat16")}
    params = {d: dict(r.model.named_parameters()) for d, r in runs.items()}
    assert params["float32"].keys() == params["bfloat16"].keys()
    trainable = {n for n, p in params["bfloat16"].items() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    for n, p in params["bfloat16"].items():
        p32 = params["float32"][n]
        assert p.dtype == (torch.bfloat16 if n in trainable else p32.dtype), n
        assert torch.equal(p, p32.to(p.dtype)), n
    fit(runs["bfloat16"], progress=False)
    out = tmp_path / "bfloat16" / "out"
    saved = load_file(str(out / "adapter_model.safetensors"))
    live = adapter_state_dict(runs["bfloat16"].model)
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, live[k]) for k, t in saved.items())
    assert any(bool(t.any()) for k, t in saved.items() if "lora_B" in k)  # it trained
    model, _ = hf.load(tiny_llama, adapters=[str(out)])
    for name, layer in lora_layers(model).items():
        assert layer.lora_A.weight.dtype == torch.float32
        assert torch.equal(layer.lora_B.weight, saved[f"base_model.model.{name}.lora_B.weight"].float())


def test_setup_runs_the_memory_preflight_before_loading(tiny_llama, tmp_path, monkeypatch):
    import importlib

    plan = importlib.import_module("qlora.memory.plan")  # the module (qlora.memory.plan is also a function)
    monkeypatch.setattr(plan, "memory_available", lambda device="cpu": 2**20)
    with pytest.raises(QloraError, match="needs about .* but 1.00 MiB is available on cpu; pass --force"):
        setup(_cfg(tmp_path, tiny_llama))
    assert not (tmp_path / "out").exists()
    assert setup(_cfg(tmp_path, tiny_llama, force=True)).model is not None


def test_cli_end_to_end(tiny_llama, tmp_path):
    data = _write_rows(tmp_path / "rows.jsonl")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "qlora", "train", "--model", tiny_llama, "--data", data, "--output-dir",
                        str(out), "--max-steps", "3", "--batch-size", "2", "--lora-r", "4", "--logging-steps", "1",
                        "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    written = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png"} <= written
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in recs if "loss" in r)


@pytest.mark.parametrize("args, match", [
    (["--data", "/nonexistent/x.jsonl"], "x.jsonl"),
    (["--lora-rank", "4"], "unrecognized arguments"),
    (["--max-steps", "-3"], "max_steps must be > 0"),
    (["--resume", "latest"], "no checkpoint to resume from"),  # nothing to resume: refused before out/ exists
])
def test_cli_bad_input_one_line_nonzero_exit_nothing_written(tiny_llama, tmp_path, args, match):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "qlora", "train", "--model", tiny_llama, "--output-dir", str(out),
                        "--data", _write_rows(tmp_path / "ok.jsonl")] + args, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2
    assert match in r.stderr
    assert not out.exists()


def test_summary_reports_what_paging_cost(tiny_llama, tmp_path, capsys):
    out = fit(setup(_cfg(tmp_path, tiny_llama, max_steps=2, optimizer="paged_adamw",
                         optimizer_memory_budget="8KB")), progress=False)
    stats = out["optimizer"]
    assert stats["kind"] == "paged_adamw" and stats["step"] == 2
    assert stats["bytes_out"] > 0 and stats["bytes_in"] > 0 and stats["peak_resident_bytes"] <= 8000
    assert "optimizer paged_adamw:" in capsys.readouterr().err


def _flash_calls_and_grads(model, batch):
    """Flash-attention kernels actually run in one forward + backward (a dispatch mode entered
    first sees only what checkpointing's caching mode lets through), the loss, the LoRA grads."""
    from torch.utils._python_dispatch import TorchDispatchMode

    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func is flash
            return func(*args, **(kwargs or {}))

    with Count():
        s, n = loss_sum(model, batch)
        (s / n).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return Count.calls, float(s), grads


def test_gradient_checkpointing_keeps_attention_and_matches(tiny_llama):
    """nn.checkpointing.enable_gradient_checkpointing recomputes each layer in backward but not its attention
    (kept: one flash call per layer, not two), and changes neither the loss nor the gradients."""
    from qlora.nn.checkpointing import enable_gradient_checkpointing

    torch.manual_seed(0)
    model, _ = hf.load(tiny_llama, lora=dict(r=8, alpha=16, dropout=0.1))
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    layers = model.config.num_hidden_layers
    torch.manual_seed(5)
    calls, loss, grads = _flash_calls_and_grads(model, batch)
    assert calls == layers
    enable_gradient_checkpointing(model)
    torch.manual_seed(5)  # the same dropout seeds (drawn in forward, replayed in the recompute)
    calls_ckpt, loss_ckpt, grads_ckpt = _flash_calls_and_grads(model, batch)
    assert calls_ckpt == layers  # a plain per-layer checkpoint would run 2 * layers
    assert loss_ckpt == loss
    for name, g in grads.items():
        assert torch.equal(grads_ckpt[name], g), name


def test_lora_init_runs_while_the_model_loads_and_is_recorded(tiny_llama, tmp_path):
    out = fit(setup(_cfg(tmp_path, tiny_llama, lora_init="loftq", loftq_iters=2, max_steps=2, save_steps=0)),
              progress=False)
    from safetensors import safe_open

    with safe_open(str(Path(out["output_dir"]) / "adapter_model.safetensors"), framework="pt") as f:
        recorded = json.loads(f.metadata()["qlora_quant"])
    assert recorded["lora_init"] == {"method": "loftq", "r": 4, "scaling": 4.0, "iters": 2}


def test_saved_activations_bf16_reaches_every_fused_module_and_the_estimate(tiny_llama, tmp_path):
    """--saved-activations bfloat16 with fp32 compute: each fused norm and MLP keeps bf16 copies, the
    run trains, and the preflight's estimate counts 2-byte saved tensors."""
    from qlora.memory import estimate, load_model_config
    from qlora.memory.plan import settings_for
    from qlora.nn import fused

    cfg = _cfg(tmp_path, tiny_llama, compute_dtype="float32", saved_activations="bfloat16", max_steps=2, save_steps=0)
    run = setup(cfg)
    kept = [m.saved_dtype for m in run.model.modules() if isinstance(m, (fused.RMSNorm, fused.GatedMLP))]
    assert kept and set(kept) == {torch.bfloat16}
    fit(run, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    model_cfg = load_model_config(tiny_llama)
    kw = settings_for(cfg, "cpu")
    assert kw["saved_activations"] == "bfloat16"
    exact = estimate(model_cfg, **{**kw, "saved_activations": "compute"})
    assert estimate(model_cfg, **kw).activations < exact.activations


def test_saved_activations_auto_follows_the_auto_compute_choice_and_a_resumed_checkpoint(tiny_llama, tmp_path,
                                                                                        monkeypatch, capsys):
    """auto: bf16 copies where auto picks fp32 (an AVX2-only CPU, simulated), said once on stderr and
    recorded; a resumed run keeps what its checkpoint kept, whatever auto picks on the new machine."""
    from qlora import precision
    from qlora.nn import fused

    def machine(dtype):
        monkeypatch.setattr(precision, "auto_choice", lambda device_type: (dtype, "simulated"))

    machine("float32")
    run = setup(_cfg(tmp_path, tiny_llama, max_steps=2, save_steps=1))
    assert (run.cfg.compute_dtype, run.cfg.saved_activations) == ("float32", "bfloat16")
    assert {m.saved_dtype for m in run.model.modules() if isinstance(m, (fused.RMSNorm, fused.GatedMLP))} == \
        {torch.bfloat16}
    assert "saved activations: bfloat16 (auto" in capsys.readouterr().err
    fit(run, progress=False)
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["config"]["saved_activations"] == "bfloat16"
    exact = setup(_cfg(tmp_path / "exact", tiny_llama, compute_dtype="float32", max_steps=1, save_steps=1))
    assert exact.cfg.saved_activations == "compute"  # fp32 asked for: exact
    fit(exact, progress=False)
    machine("bfloat16")  # the runs move to a machine with native bf16
    resumed = setup(_cfg(tmp_path, tiny_llama, max_steps=3, save_steps=1, resume="latest"))
    assert (resumed.cfg.compute_dtype, resumed.cfg.saved_activations) == ("float32", "bfloat16")
    resumed = setup(_cfg(tmp_path / "exact", tiny_llama, max_steps=2, save_steps=1, resume="latest"))
    assert (resumed.cfg.compute_dtype, resumed.cfg.saved_activations) == ("float32", "compute")
    assert setup(_cfg(tmp_path / "fresh", tiny_llama)).cfg.saved_activations == "compute"
