"""Full training state on disk, written atomically; safetensors + JSON only (nothing is unpickled).

    <output_dir>/checkpoints/step-000100/
        adapter_model.safetensors, adapter_config.json   the LoRA weights (PEFT layout)
        optimizer.safetensors                            every optimizer state tensor
        trainer_state.json                               step, data position, RNG, config, version
        rng.safetensors                                  torch RNG state(s)
        manifest.json                                    size + sha256 of each file above
    <output_dir>/checkpoints/latest                      name of the newest verified checkpoint

A checkpoint is written into a temporary directory, verified against its manifest, renamed into
place, and only then named in `latest` (itself replaced atomically). A crash at any instant leaves
the previous checkpoint usable; a checkpoint that fails verification is refused on resume.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import QloraError

FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "rng.safetensors",
         "trainer_state.json")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or the user's quota on it


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, state, gauss = random.getstate()
    return tensors, {"python": [version, list(state), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def save(ckpt_root: Path, step: int, adapter_writer, optimizer, trainer_state: dict, keep: int) -> Path:
    """Write checkpoint `step-XXXXXX` atomically, update `latest`, prune to the newest `keep`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, step, adapter_writer, optimizer, trainer_state)
    except BaseException as e:  # nothing half-written stays (a full disk would stay full)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            raise QloraError(f"{ckpt_root}: no space left on device for checkpoint {name}: it needs about "
                             f"{checkpoint_bytes(optimizer):,} bytes, {shutil.disk_usage(ckpt_root).free:,} are free "
                             "(the partial checkpoint was removed; free space or set --output-dir elsewhere)") from None
        raise
    if final.exists():  # a re-run of the same step after a crash: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    verify(final)
    write_json_atomic(ckpt_root / "latest", {"checkpoint": name})
    _prune(ckpt_root, keep)
    return final


def _write(tmp: Path, step: int, adapter_writer, optimizer, trainer_state: dict) -> None:
    """The checkpoint's files and manifest, fsynced, in the directory `tmp`."""
    from safetensors.torch import save_file

    from . import safetensors_writer

    tmp.mkdir()
    adapter_writer(str(tmp))
    # streamed one parameter's state at a time: save_file would want all of it in memory at once
    safetensors_writer.write_streaming(tmp / "optimizer.safetensors", optimizer.state_specs(), optimizer.iter_state())
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    state = dict(trainer_state, step=step, optimizer=optimizer.meta(), rng=rng_meta)
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    manifest = {}
    for f in FILES:
        p = tmp / f
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
        manifest[f] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    write_json_atomic(tmp / "manifest.json", manifest)
    _fsync_dir(tmp)


def checkpoint_bytes(optimizer) -> int:
    """About what a checkpoint takes on disk: the optimizer state plus the adapter weights (at most
    4 bytes each); the JSON files and RNG state add kilobytes."""
    state = sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                for _, dtype, shape in optimizer.state_specs())
    return state + sum(4 * math.prod(p["shape"]) for p in optimizer.meta()["params"].values())


def _prune(ckpt_root: Path, keep: int) -> None:
    for stale in ckpt_root.glob(".tmp-step-*"):  # leftovers of killed writes
        shutil.rmtree(stale, ignore_errors=True)
    done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def verify(ckpt: Path) -> None:
    """Raise QloraError unless every file matches the manifest."""
    mpath = ckpt / "manifest.json"
    if not mpath.is_file():
        raise QloraError(f"{ckpt}: incomplete checkpoint (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QloraError(f"{mpath}: corrupted manifest") from None
    for f in FILES:
        p = ckpt / f
        entry = manifest.get(f)
        if entry is None or not p.is_file():
            raise QloraError(f"{ckpt}: missing {f}")
        if p.stat().st_size != entry["size"] or _sha256(p) != entry["sha256"]:
            raise QloraError(f"{p}: does not match its manifest (size/sha256): checkpoint is corrupted")


def candidates(ckpt_root: Path) -> list[Path]:
    """Checkpoints newest first."""
    return sorted((p for p in ckpt_root.glob("step-*") if p.is_dir()), reverse=True)


def find_resume(output_dir: str, resume: str) -> Path:
    """'latest' -> the newest verified checkpoint in output_dir; a path -> that checkpoint, verified."""
    root = Path(output_dir) / "checkpoints"
    if resume != "latest":
        ckpt = Path(resume)
        if not ckpt.is_dir():
            raise QloraError(f"{resume}: no such checkpoint directory")
        try:
            verify(ckpt)
        except QloraError as e:
            older = [p for p in candidates(ckpt.parent) if p.name < ckpt.name]
            hint = f"; the previous checkpoint is {older[0]} (use --resume {older[0]})" if older else ""
            raise QloraError(f"{e}{hint}") from None
        return ckpt
    latest = root / "latest"
    named = None
    if latest.is_file():
        try:
            named = root / json.loads(latest.read_text(encoding="utf-8"))["checkpoint"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            named = None
    ordered = candidates(root)
    if not ordered:
        raise QloraError(f"{root}: no checkpoint to resume from (run without --resume to start fresh)")
    if named is not None:
        try:
            verify(named)
            return named
        except QloraError as e:
            older = [p for p in ordered if p.name < named.name]
            hint = f"; the previous good checkpoint is {older[0]} (use --resume {older[0]})" if older else ""
            raise QloraError(f"{e}{hint}") from None
    for ckpt in ordered:  # `latest` missing (crash before it was written): newest verified one
        try:
            verify(ckpt)
            return ckpt
        except QloraError:
            continue
    raise QloraError(f"{root}: no checkpoint verifies against its manifest")


def read_state(ckpt: Path) -> dict:
    """The checkpoint's trainer_state.json (step, data position, the run's config)."""
    return json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))


def load(ckpt: Path) -> tuple[dict, Mapping[str, torch.Tensor], dict[str, torch.Tensor]]:
    """-> (trainer_state, optimizer tensors, rng tensors). Adapter weights are read by the caller.
    Optimizer tensors are read from disk as they are asked for (AdamW.load_state takes them one
    parameter at a time), not all at once beside the optimizer's own copy."""
    from safetensors.torch import load_file

    from .safetensors_reader import TensorFile

    return read_state(ckpt), TensorFile(ckpt / "optimizer.safetensors"), load_file(str(ckpt / "rng.safetensors"))
