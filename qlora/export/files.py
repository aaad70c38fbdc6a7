"""Writing outputs so that nothing is ever half-written: a staging directory (or file) beside the
target, renamed into place only when complete, and safetensors shards written as they fill.

A shard is written as soon as adding the next tensor would pass `max_shard_bytes`, so peak memory
is one shard (default 2 GB, as transformers' save_pretrained) on top of the model, whatever the
size of the whole checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import QloraError

MAX_SHARD_BYTES = 2 * 1024**3
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise QloraError(f"{out}: already exists; pass --overwrite to replace it, or choose another --output")


def _replace(tmp: Path, out: Path) -> None:
    if out.exists() and (out.is_dir() or tmp.is_dir()):  # move the old one aside first: a failure loses neither
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, aside / out.name)
        os.replace(tmp, out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _staging_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty directory beside `out`; it becomes `out` if the block succeeds, else vanishes."""
    out = Path(out)
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging_name(out)
    tmp.mkdir()  # not mkdtemp: that one is private (0700), the output should get the usual permissions
    try:
        yield tmp
        _replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_file(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a path beside `out` to write; it is renamed to `out` if the block succeeds."""
    out = Path(out)
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging_name(out)
    tmp.touch(exist_ok=False)
    try:
        yield tmp
        _replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


class ShardWriter:
    """Safetensors shards named and indexed as transformers expects (model.safetensors, or
    model-0000k-of-0000n.safetensors + model.safetensors.index.json)."""

    def __init__(self, directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES):
        if max_shard_bytes <= 0:
            raise QloraError(f"max shard size must be > 0 bytes, got {max_shard_bytes}")
        self.directory, self.max_bytes = Path(directory), max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.storages: set[int] = set()  # storage addresses in the buffer
        self.size = 0
        self.shards: list[list[str]] = []  # tensor names per written shard
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max_bytes:
            self._flush()
        tensor = tensor.detach().to("cpu")
        if not tensor.is_contiguous() or tensor.untyped_storage().data_ptr() in self.storages:
            tensor = tensor.contiguous().clone()  # safetensors refuses tensors that share memory (e.g. one codebook)
        self.storages.add(tensor.untyped_storage().data_ptr())
        self.buffer[name] = tensor
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.directory / f"shard-{len(self.shards):05d}.tmp"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~_umask())  # safetensors creates files private (0600); outputs are meant to be shared
        self.shards.append(list(self.buffer))
        self.buffer, self.storages, self.size = {}, set(), 0

    def close(self) -> list[str]:
        """Write the last shard, give the shards their final names, write the index. -> file names."""
        if self.buffer or not self.shards:
            self._flush()
        n = len(self.shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(self.directory / f"shard-{i:05d}.tmp", self.directory / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {t: name for name, keys in zip(names, self.shards) for t in keys}}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return names


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
