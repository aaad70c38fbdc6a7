"""DoRA (Liu et al. 2024, arXiv 2402.09353) over any base LoRALinear wraps, as PEFT's `use_dora`.

The weight is split into a magnitude m (one value per output row) and a direction:

    W' = m · (W + s·BA) / ‖W + s·BA‖,   ‖·‖ the L2 norm of each output row,

with m initialised to ‖W + s·BA‖ (= ‖W‖ while B = 0, so a fresh layer computes the base output).
The norm is treated as a constant in backward (the paper's section 4.3, and PEFT), so the
forward is PEFT's DoraLinearLayer formula, term for term:

    y = base(x) + (m/‖·‖ - 1) · (x_d Wᵀ) + (m/‖·‖) · s · B A x_d,

where x_d is the dropped-out input. Without dropout (and in eval) x_d Wᵀ is the base output less
its bias; with dropout it is recomputed from x_d, as PEFT does. The norm is taken in fp32 from the
dequantized weight on every call: W + s·BA changes with each step, and a 4-bit W is never kept in
16 bits between calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dropout as seeded
from .linear4bit import Linear4bit


def base_weight(base: torch.nn.Module) -> torch.Tensor:
    """The base's weight (out, in) in fp32 (dequantized for a Linear4bit)."""
    if isinstance(base, Linear4bit):
        return base.dequantized_weight(torch.float32)
    return base.weight.detach().float()


def row_norm(layer) -> torch.Tensor:
    """‖W + s·BA‖ per output row, fp32 (out,), no gradient."""
    with torch.no_grad():
        return (base_weight(layer.base) + layer.delta_weight()).norm(dim=1)


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA forward for a LoRALinear `layer` with `layer.lora_magnitude` (see module doc)."""
    p = layer.dropout if layer.training else 0.0
    scale = (layer.lora_magnitude.float() / row_norm(layer)).to(x.dtype)  # (out,)
    y = layer.base(x)
    xd = seeded.dropout(x, p)
    if p > 0:
        w = base_weight(layer.base).to(x.dtype)
        plain = F.linear(xd, w)
    else:
        bias = layer.base.bias
        plain = y if bias is None else y - bias.to(y.dtype)
    lora = F.linear(F.linear(xd, layer.lora_A.weight.to(x.dtype)), layer.lora_B.weight.to(x.dtype))
    return y + (scale - 1) * plain + scale * lora * layer.scaling


def merged_weight(layer) -> torch.Tensor:
    """m · (W + s·BA) / ‖W + s·BA‖ in fp32 (out, in): the weight the forward applies."""
    with torch.no_grad():
        w = base_weight(layer.base) + layer.delta_weight()
        return w * (layer.lora_magnitude.detach().float() / w.norm(dim=1))[:, None]
