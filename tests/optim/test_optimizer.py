"""The trainer-facing API: checkpoint round trip (exact resume), and errors for bad input."""

import errno
import io
import json
import subprocess
import sys

import pytest
import torch

from qlora.errors import QloraError
from qlora.optim import KINDS, build_optimizer
from qlora.optim import store as store_mod
from qlora.safetensors_reader import TensorFile
from qlora.safetensors_writer import write_streaming

SHAPES = [(96, 128), (40, 40), (128, 64), (5,)]
EVICT_ALL = 96 * 128 * 8  # the largest fp32 page: every other page is evicted every step


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(f"m.{i}.w", torch.nn.Parameter(torch.randn(s, generator=g))) for i, s in enumerate(SHAPES)]


def _steps(params, opt, start, stop):
    for t in range(start, stop):
        gen = torch.Generator().manual_seed(100 + t)
        for _, p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.lr = 1e-2 / (1 + t)
        opt.step()
        opt.zero_grad()


def _kw(kind, tmp_path):
    return {"memory_budget": EVICT_ALL, "offload_dir": str(tmp_path)} if kind.startswith("paged") else {}


# the state format depends on the bits only: paged and resident runs resume each other
SAME_BITS = [(a, b) for a in KINDS for b in KINDS if a.endswith("8bit") == b.endswith("8bit")]


@pytest.mark.parametrize("kind, resume_kind", SAME_BITS)
def test_save_load_resumes_bit_identically(kind, resume_kind, tmp_path):
    full = _params()
    opt = build_optimizer(full, kind, lr=0.0, weight_decay=0.05, **_kw(kind, tmp_path))
    _steps(full, opt, 0, 6)

    first = _params()
    opt1 = build_optimizer(first, kind, lr=0.0, weight_decay=0.05, **_kw(kind, tmp_path))
    _steps(first, opt1, 0, 3)
    write_streaming(tmp_path / "optimizer.safetensors", opt1.state_specs(), opt1.iter_state())  # as checkpoints do
    (tmp_path / "optimizer.json").write_text(json.dumps(opt1.meta()))
    opt1.close()

    resumed = _params()
    for (_, a), (_, b) in zip(resumed, first):
        a.data.copy_(b.data)  # the trainer restores adapter weights from the same checkpoint
    opt2 = build_optimizer(resumed, resume_kind, lr=0.0, weight_decay=0.05, **_kw(resume_kind, tmp_path))
    meta = json.loads((tmp_path / "optimizer.json").read_text())
    opt2.load_state(TensorFile(tmp_path / "optimizer.safetensors"), meta)
    assert opt2.meta()["step"] == 3 and opt2.lr == pytest.approx(1e-2 / 3)
    _steps(resumed, opt2, 3, 6)
    for (_, a), (_, b) in zip(full, resumed):
        assert torch.equal(a, b)
    s1, s2 = opt.state_tensors(), opt2.state_tensors()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    opt.close()
    opt2.close()


def test_state_tensors_are_named_contiguous_cpu_tensors():
    params = _params()
    opt = build_optimizer(params, "adamw_8bit", lr=1e-3)
    _steps(params, opt, 0, 1)
    st = opt.state_tensors()
    assert sorted(st) == sorted([
        "m.0.w.exp_avg.codes", "m.0.w.exp_avg.absmax", "m.0.w.exp_avg_sq.codes", "m.0.w.exp_avg_sq.absmax",
        "m.1.w.exp_avg", "m.1.w.exp_avg_sq",  # 1600 elements < 4096: fp32
        "m.2.w.exp_avg.codes", "m.2.w.exp_avg.absmax", "m.2.w.exp_avg_sq.codes", "m.2.w.exp_avg_sq.absmax",
        "m.3.w.exp_avg", "m.3.w.exp_avg_sq"])
    assert st["m.0.w.exp_avg.codes"].shape == (96, 128) and st["m.0.w.exp_avg.absmax"].shape == (48,)
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in st.values())
    specs = opt.state_specs()
    assert [k for k, _, _ in specs] == list(st) == [k for k, _ in opt.iter_state()]
    assert all((st[k].dtype, tuple(st[k].shape)) == (dtype, shape) for k, dtype, shape in specs)
    meta = opt.meta()
    json.dumps(meta)
    assert meta["kind"] == "adamw_8bit" and meta["bits"] == 8 and meta["params"]["m.1.w"]["state"] == "fp32"


def _saved(kind="adamw"):
    params = _params()
    opt = build_optimizer(params, kind, lr=1e-3)
    _steps(params, opt, 0, 1)
    return opt.state_tensors(), opt.meta()


@pytest.mark.parametrize("break_it, message", [
    (lambda t, m: m.update(format="torch"), "not a qlora optimizer checkpoint"),
    (lambda t, m: t.pop("m.2.w.exp_avg_sq"), "'m.2.w.exp_avg_sq' is missing"),
    (lambda t, m: t.update({"m.1.w.exp_avg": torch.zeros(41, 40)}), "'m.1.w.exp_avg' is torch.float32 (41, 40)"),
    (lambda t, m: m["params"].pop("m.3.w"), "parameters differ from the model's (e.g. 'm.3.w')"),
])
def test_load_state_refuses_mismatched_checkpoints(break_it, message):
    tensors, meta = _saved()
    break_it(tensors, meta)
    opt = build_optimizer(_params(), "paged_adamw", lr=1e-3)
    with pytest.raises(QloraError, match=message.replace("(", r"\(").replace(")", r"\)")):
        opt.load_state(tensors, meta)
    assert not any(t.any() for t in opt.state_tensors().values())  # checked first: nothing was loaded


def test_load_state_refuses_other_bits():
    tensors, meta = _saved("adamw_8bit")
    with pytest.raises(QloraError, match="checkpoint holds 8-bit state"):
        build_optimizer(_params(), "adamw", lr=1e-3).load_state(tensors, meta)


def test_budget_smaller_than_a_parameter_state_names_both_sizes(tmp_path):
    message = r"budget 90,000 bytes is smaller than the state of parameter 'm.0.w' \(98,304 bytes\)"
    with pytest.raises(QloraError, match=message):
        build_optimizer(_params(), "paged_adamw", lr=1e-3, memory_budget=90_000, offload_dir=str(tmp_path))


def test_unwritable_offload_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(QloraError, match="optimizer offload dir .*a-file/sub: cannot create the state file"):
        build_optimizer(_params(), "paged_adamw", lr=1e-3, memory_budget=EVICT_ALL, offload_dir=str(blocker / "sub"))


def test_not_enough_disk_for_the_backing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda d: type("U", (), {"free": 10_000})())
    with pytest.raises(QloraError, match=r"needs 184,320 bytes for paged optimizer state .* only 10,000 bytes is free"):
        build_optimizer(_params(), "paged_adamw", lr=1e-3, memory_budget=EVICT_ALL, offload_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_allocation_failure_is_reported_before_training(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store_mod.os, "posix_fallocate", full)
    with pytest.raises(QloraError, match=r"cannot allocate .* \(No space left on device\)"):
        build_optimizer(_params(), "paged_adamw", lr=1e-3, memory_budget=EVICT_ALL, offload_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_io_error_mid_run_stops_with_qlora_error(tmp_path, monkeypatch):
    params = _params()
    opt = build_optimizer(params, "paged_adamw", lr=1e-3, memory_budget=EVICT_ALL, offload_dir=str(tmp_path))
    _steps(params, opt, 0, 1)

    def broken(self, offset, page):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(store_mod.FileStore, "save", broken)
    with pytest.raises(QloraError, match="paged optimizer: moving state .* Input/output error"):
        _steps(params, opt, 1, 2)
    monkeypatch.undo()  # a failed write leaves its page resident: the page table stays consistent
    assert len(opt.state_tensors()) == 2 * len(SHAPES)
    opt.close()


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "sgd"}, "optimizer 'sgd' is unknown"),
    ({"name": "adamw", "memory_budget": 10**9}, "applies to paged optimizers only"),
    ({"name": "adamw", "betas": (0.9, 1.0)}, "betas must be two numbers in"),
    ({"name": "adamw", "lr": float("nan")}, "lr must be >= 0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(QloraError, match=message):
        build_optimizer(_params(), **{"lr": 1e-3, **kwargs})


def test_no_parameters():
    with pytest.raises(QloraError, match="no trainable parameters"):
        build_optimizer([], "adamw", lr=1e-3)


def test_optim_never_imports_transformers():
    code = "import sys; sys.modules['transformers'] = None; import qlora.optim; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_offload_dir_on_a_ram_filesystem_is_warned_about(caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(store_mod, "_on_ram_filesystem", lambda d: True)
    with caplog.at_level("WARNING", logger="qlora.optim.store"):
        opt = build_optimizer(_params(), "paged_adamw", lr=1e-3, memory_budget=EVICT_ALL, offload_dir=str(tmp_path))
    assert "RAM filesystem (tmpfs): paging there saves no memory" in caplog.text
    opt.close()


def test_ram_filesystem_detection_uses_the_longest_mount_point(monkeypatch):
    mounts = "/dev/vda / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\ntmpfs /mnt/my\\040ram tmpfs rw 0 0\n"
    real_open = open

    def fake_open(f, *a, **k):
        return io.StringIO(mounts) if f == "/proc/mounts" else real_open(f, *a, **k)
    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(store_mod.os.path, "realpath", lambda p: p)
    assert store_mod._on_ram_filesystem("/dev/shm/x") and store_mod._on_ram_filesystem("/mnt/my ram")
    assert not store_mod._on_ram_filesystem("/dev/shmem") and not store_mod._on_ram_filesystem("/home")
