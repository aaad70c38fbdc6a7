"""One parameter's optimizer state as a single byte buffer: layout, and the update per storage.

Each parameter owns one flat uint8 buffer (its "page") that holds all its state tensors at
aligned offsets, so a page moves between memory and its backing store in one copy.

fp32 state (`adamw`, and tensors too small for 8 bits): exp_avg, exp_avg_sq as fp32.
8-bit state (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): exp_avg with
the signed dynamic map, exp_avg_sq with the unsigned one, blocks of 256 with an fp32 absmax each;
a step dequantizes to fp32, runs `adamw_update`, and requantizes - bitsandbytes' CPU recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import kernels
from ..quant.codebooks import dynamic_map
from .adamw import adamw_update

BLOCKSIZE = 256  # bitsandbytes' block for 8-bit optimizer states
MIN_8BIT_NUMEL = 4096  # bitsandbytes keeps smaller tensors in fp32 (min_8bit_size)
_ALIGN = 64  # byte alignment of each state tensor inside a page (cache line; any dtype view)


def fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1_000_000 else f"{n:,} bytes"


@dataclass(frozen=True)
class Field:
    """One state tensor inside a page: `key` is its checkpoint suffix."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class StateLayout:
    """Where each state tensor of one parameter lives in its page of `nbytes` bytes."""

    name: str
    shape: tuple[int, ...]
    eight_bit: bool
    fields: tuple[Field, ...]
    nbytes: int

    @classmethod
    def build(cls, name: str, shape: tuple[int, ...], want_8bit: bool) -> StateLayout:
        numel = 1
        for s in shape:
            numel *= s
        eight_bit = want_8bit and numel >= MIN_8BIT_NUMEL
        if eight_bit:
            blocks = (-(-numel // BLOCKSIZE),)
            specs = [("exp_avg.codes", torch.uint8, shape), ("exp_avg.absmax", torch.float32, blocks),
                     ("exp_avg_sq.codes", torch.uint8, shape), ("exp_avg_sq.absmax", torch.float32, blocks)]
        else:
            specs = [("exp_avg", torch.float32, shape), ("exp_avg_sq", torch.float32, shape)]
        fields, offset = [], 0
        for key, dtype, fshape in specs:
            f = Field(key, dtype, tuple(fshape), offset)
            fields.append(f)
            offset += -(-f.nbytes // _ALIGN) * _ALIGN
        return cls(name, tuple(shape), eight_bit, tuple(fields), offset)

    def views(self, page: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views (shaped like the checkpoint tensors) into a uint8 page."""
        return {f.key: page[f.offset : f.offset + f.nbytes].view(f.dtype).view(f.shape) for f in self.fields}


class Codebooks:
    """The two 8-bit dynamic maps on one device, built once per optimizer."""

    def __init__(self, device: torch.device):
        self.signed = dynamic_map(True, device)
        self.unsigned = dynamic_map(False, device)


def update_state(
    layout: StateLayout,
    state: dict[str, torch.Tensor],
    param32: torch.Tensor,
    grad32: torch.Tensor,
    codebooks: Codebooks | None,
    **hyper,
) -> None:
    """AdamW on one parameter (fp32 tensors of its shape) with its state in `layout.views(page)`."""
    if not layout.eight_bit:
        adamw_update(param32, grad32, state["exp_avg"], state["exp_avg_sq"], **hyper)
        return
    q1, a1, q2, a2 = (state["exp_avg.codes"], state["exp_avg.absmax"],
                      state["exp_avg_sq.codes"], state["exp_avg_sq.absmax"])
    exp_avg = kernels.dequantize_8bit(q1, a1, codebooks.signed, BLOCKSIZE)
    exp_avg_sq = kernels.dequantize_8bit(q2, a2, codebooks.unsigned, BLOCKSIZE)
    adamw_update(param32, grad32, exp_avg, exp_avg_sq, **hyper)
    for moment, codes, absmax, code in ((exp_avg, q1, a1, codebooks.signed), (exp_avg_sq, q2, a2, codebooks.unsigned)):
        try:
            new_codes, new_absmax = kernels.quantize_8bit(moment, code, BLOCKSIZE)
        except ValueError:  # the quantizer refuses NaN/Inf: they came from the gradient
            raise FloatingPointError(
                f"non-finite optimizer state for parameter {layout.name!r} (NaN/Inf gradient?)"
            ) from None
        codes.copy_(new_codes)
        absmax.copy_(new_absmax)
