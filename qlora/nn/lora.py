"""LoRALinear: y = base(x) + s · B(A(dropout(x))), s = α/r (or α/√r with rsLoRA).

Hu et al. 2021; QLoRA puts it on every linear layer of a 4-bit base (paper section 3, eq. 6).
A is Kaiming-uniform and B is zero, so a freshly wrapped layer computes exactly the base output.
Wrapping composes with any linear (Linear4bit or nn.Linear); `merge()` is its exact inverse up to
the merged weight's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .linear4bit import Linear4bit


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int = 64, alpha: float = 16.0, dropout: float = 0.0,
                 rslora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        device = _device_of(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()
        for p in base.parameters():
            p.requires_grad_(False)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's choice
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a = self.lora_A.weight.to(x.dtype)  # (r, in): computed in the activation dtype,
        b = self.lora_B.weight.to(x.dtype)  # gradients flow back to the fp32 parameters
        return y + F.linear(F.linear(self.dropout(x), a), b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """s · B A in fp32, shape (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merge(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """Dequantize the base, add s·BA in fp32, return a plain nn.Linear in `dtype`."""
        base = self.base.merge(torch.float32) if isinstance(self.base, LoRALinear) else self.base
        if isinstance(base, Linear4bit):
            w = base.dequantized_weight(torch.float32)
            dtype = dtype or base.compute_dtype
        else:
            w = base.weight.detach().float()
            dtype = dtype or _root_dtype(self)
        bias = base.bias
        merged = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            merged.weight.copy_((w + self.delta_weight()).to(dtype))
            if bias is not None:
                merged.bias.copy_(bias.detach().to(dtype))
        merged.requires_grad_(False)
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def _root_dtype(layer: "LoRALinear") -> torch.dtype:
    while isinstance(layer, LoRALinear):
        layer = layer.base
    return layer.compute_dtype if isinstance(layer, Linear4bit) else layer.weight.dtype


def _device_of(module: nn.Module) -> torch.device:
    if isinstance(module, Linear4bit):
        return module.weight.data.device
    return next(module.parameters()).device
