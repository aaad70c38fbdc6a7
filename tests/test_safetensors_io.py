"""Streaming safetensors I/O: write_streaming's files are safetensors' own format, TensorFile reads
any safetensors file lazily, and a checkpoint's optimizer state moves one page at a time."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qlora.memory import TensorPeak
from qlora.optim import build_optimizer
from qlora.safetensors_reader import TensorFile
from qlora.safetensors_writer import write_streaming


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.bf16": torch.randn(7, generator=g).bfloat16(),
        "c.u8": torch.randint(0, 256, (4, 2, 3), generator=g, dtype=torch.uint8),
        "d.scalar": torch.tensor(2.5, dtype=torch.float64),
        "e.empty": torch.zeros(0, 4, dtype=torch.float16),
        "f.i64": torch.arange(5),
    }


def test_streamed_file_reads_back_with_safetensors_and_tensorfile(tmp_path):
    t = _tensors()
    path = tmp_path / "x.safetensors"
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in t.items()]
    write_streaming(path, specs, iter(t.items()), metadata={"format": "pt"})
    back = load_file(str(path))
    assert back.keys() == t.keys() and all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in t.items())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    lazy = TensorFile(path)
    assert sorted(lazy) == sorted(t) and len(lazy) == len(t)
    assert all(torch.equal(lazy[k], v) and lazy[k].dtype == v.dtype for k, v in t.items())


def test_tensorfile_reads_safetensors_own_files(tmp_path):
    t = _tensors()
    save_file(t, str(tmp_path / "y.safetensors"))
    lazy = TensorFile(tmp_path / "y.safetensors")
    assert all(torch.equal(lazy[k], v) for k, v in t.items())
    with pytest.raises(KeyError):
        lazy["nope"]


def test_tensors_must_match_the_header(tmp_path):
    t = _tensors()
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in t.items()]
    with pytest.raises(ValueError, match="'a.f32' torch.float32 \\(3, 5\\) does not match"):
        write_streaming(tmp_path / "z.safetensors", [(k, d, (1,) + s) for k, d, s in specs], iter(t.items()))
    with pytest.raises(ValueError, match="fewer tensors"):
        write_streaming(tmp_path / "z.safetensors", specs, iter(list(t.items())[:-1]))


def test_optimizer_state_is_written_and_restored_one_page_at_a_time(tmp_path):
    """16 parameters of 64 KiB state each: writing the state to a file and loading it back into a
    fresh optimizer holds about two pages of new tensors at a time, not the 1 MiB whole."""
    params = [(f"p{i}", torch.nn.Parameter(torch.randn(64, 128))) for i in range(16)]
    for _, p in params:
        p.grad = torch.randn_like(p)
    opt = build_optimizer(params, "adamw", lr=1e-3)
    opt.step()
    page, total = 64 * 128 * 8, opt.stats()["state_bytes"]
    path = tmp_path / "optimizer.safetensors"
    with TensorPeak() as written:
        write_streaming(path, opt.state_specs(), opt.iter_state())
    fresh = build_optimizer(params, "adamw", lr=1e-3)
    with TensorPeak(ignore=fresh._pages._pages) as restored:  # its own pages, written in place, are not new
        fresh.load_state(TensorFile(path), opt.meta())
    assert total == 16 * page
    assert written.peak <= 2 * page and restored.peak <= 3 * page, (written.peak, restored.peak)
    expected, got = opt.state_tensors(), fresh.state_tensors()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
