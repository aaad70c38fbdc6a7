"""Write a safetensors file from tensors produced one at a time: the header first (it needs only
names, dtypes and shapes), then each tensor's bytes as it arrives. Peak memory is whatever the
producer holds for one tensor, where `safetensors.torch.save_file` needs every tensor alive at
once - for a checkpoint's optimizer state that was a second copy of all of it (paged state read
back whole), the largest transient of a run. Layout: safetensors_reader's docstring.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable

import torch

from .safetensors_reader import DTYPES

_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_ALIGN = 8  # safetensors pads the header so that the data starts 8-byte aligned


def write_streaming(path: str | os.PathLike, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                    tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` ((name, tensor) pairs, in the order and with the dtypes and shapes of
    `specs`) to `path`. Each tensor is written before the next is asked for, so the producer may
    reuse its buffer. Raises ValueError if a tensor does not match its spec."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _ALIGN)
    expected = iter(specs)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, t in tensors:
            spec = next(expected, None)
            if spec is None or (name, t.dtype, tuple(t.shape)) != (spec[0], spec[1], tuple(spec[2])):
                raise ValueError(f"{path}: tensor {name!r} {t.dtype} {tuple(t.shape)} does not match the header's "
                                 f"{spec and (spec[0], spec[1], tuple(spec[2]))}")
            f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        if next(expected, None) is not None:
            raise ValueError(f"{path}: fewer tensors than the header announces")
