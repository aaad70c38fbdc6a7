"""qlora/checkpoint.py: a full disk during a checkpoint is a one-line error that names the directory,
the bytes needed and free, and leaves nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from qlora import safetensors_writer
from qlora.errors import QloraError
from qlora.train import fit, setup

from test_train import _cfg  # tests/ is on sys.path (rootdir-style, like conftest)


def test_disk_full_names_the_directory_and_sizes_and_removes_the_partial_checkpoint(tiny_llama, tmp_path,
                                                                                 monkeypatch):
    run = setup(_cfg(tmp_path, tiny_llama, max_steps=6, save_steps=3))
    real = safetensors_writer.write_streaming

    def full_at_step_6(path, specs, tensors, **kw):  # half the file lands, then the disk is full
        if Path(path).parent.name.startswith(".tmp-step-000006"):
            Path(path).write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, specs, tensors, **kw)

    monkeypatch.setattr(safetensors_writer, "write_streaming", full_at_step_6)
    root = Path(run.cfg.output_dir) / "checkpoints"
    with pytest.raises(QloraError) as e:
        fit(run, progress=False)
    # AdamW's two fp32 moments and the adapter's (at most) 4 bytes: 12 bytes per LoRA parameter
    need = 12 * sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{root}: no space left on device for checkpoint step-000006")
    assert f"needs about {need:,} bytes" in message
    free = int(message.split("bytes, ")[1].split(" are free")[0].replace(",", ""))
    assert abs(free - shutil.disk_usage(root).free) < 64 * 2**20  # the disk's own figure (other writers move it)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000003"]  # no .tmp-step-000006-*
    assert json.loads((root / "latest").read_text()) == {"checkpoint": "step-000003"}


def test_other_write_errors_propagate_and_also_clean_up(tiny_llama, tmp_path, monkeypatch):
    run = setup(_cfg(tmp_path, tiny_llama, max_steps=3, save_steps=3))

    def broken(path, specs, tensors, **kw):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    monkeypatch.setattr(safetensors_writer, "write_streaming", broken)
    with pytest.raises(OSError, match="Input/output error"):
        fit(run, progress=False)
    assert list((Path(run.cfg.output_dir) / "checkpoints").iterdir()) == []
