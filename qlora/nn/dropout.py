"""Seeded dropout: the mask is a hash of (element index, seed), never stored.

    keep(i) = mix(i, seed) >= round(p · 2^32),   out = where(keep, x / (1 - p), 0)

LoRA applies dropout to every linear layer's input (PEFT: `lora_dropout`). Drawing those masks
with torch's bernoulli_ took 18% of a SmolLM2-135M training step on CPU, and autograd kept each
mask (or the dropped copy of x) alive until backward. Here the forward draws one 31-bit seed from
torch's generator (so torch.manual_seed, checkpointed RNG state and gradient checkpointing's
RNG replay all govern it), and backward re-applies the same mask to the gradient.

`keep_mask` is the definition (any device); the compiled CPU kernel (quant/csrc/dropout_cpu.cpp)
computes the same bits and is tested against it.
"""

from __future__ import annotations

import torch

from ..quant import kernels

_M32 = 0xFFFFFFFF


def draw_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def threshold(p: float) -> int:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(round(p * 2**32), _M32)


def keep_mask(n: int, seed: int, p: float, device=None) -> torch.Tensor:
    """bool[n]: MurmurHash3's fmix32 over i·0x9E3779B9 xor seed (i taken mod 2^32), >= threshold."""
    i = torch.arange(n, dtype=torch.int64, device=device) & _M32
    h = ((i * 0x9E3779B9) & _M32) ^ seed
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h >= threshold(p)


def apply(x: torch.Tensor, p: float, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """where(keep_mask, x · 1/(1-p), 0), same shape and dtype as x; into `out` if given (contiguous,
    x's shape and dtype; x itself for in place)."""
    scale = 1.0 / (1.0 - p)
    k = _kernel(x)
    if k is not None:
        return k.train.dropout(x.contiguous(), threshold(p), scale, seed, out)
    keep = keep_mask(x.numel(), seed, p, x.device).view(x.shape)
    y = torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))
    return y if out is None else out.copy_(y)


def _kernel(x: torch.Tensor):
    return kernels.cpu_kernels(x) if x.dtype in (torch.float32, torch.bfloat16) else None


class _SeededDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int):
        ctx.p, ctx.seed = p, seed
        return apply(x, p, seed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return apply(grad, ctx.p, ctx.seed), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout with a hashed mask: identity when p == 0 or not training."""
    if p == 0.0 or not training:
        return x
    return _SeededDropout.apply(x, p, draw_seed())
