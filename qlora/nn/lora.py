"""LoRALinear: y = base(x) + s · B(A(dropout(x))), s = α/r (or α/√r with rsLoRA).

Hu et al. 2021; QLoRA puts it on every linear layer of a 4-bit base (paper section 3, eq. 6).
A is Kaiming-uniform and B is zero, so a freshly wrapped layer computes exactly the base output.
Wrapping composes with any linear (Linear4bit or nn.Linear); `merge()` is its exact inverse up to
the merged weight's dtype. A and B are stored in `dtype`: fp32 by default; bf16 halves the adapter
and its gradients (the paper's code casts LoRA to bf16), and since the product is formed in the
bf16 compute dtype either way, the forward equals the fp32 one with A and B rounded to bf16.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import dora as dora_fn
from . import dropout as seeded
from . import fused
from .linear4bit import Linear4bit, scratch


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """s = α/r, or α/√r with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int = 64, alpha: float = 16.0, dropout: float = 0.0,
                 rslora: bool = False, dtype: torch.dtype = torch.float32, dora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {r}")
        if dora and isinstance(base, LoRALinear):
            raise ValueError("DoRA needs a plain or 4-bit linear base, not another adapter")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = lora_scaling(r, alpha, rslora)
        device = _device_of(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        seeded.threshold(dropout)  # validates 0 <= p < 1
        self.dropout = dropout
        self.disabled = False  # True: the base layer alone (DPO's reference pass, see `disabled`)
        self.reference: dict[str, torch.Tensor] | None = None  # frozen factors of a given reference (`keep_reference`)
        self.dora = dora
        self.reset_parameters()
        for p in base.parameters():
            p.requires_grad_(False)
        if dora:  # qlora.nn.dora: one magnitude per output row, fp32, = ‖W + s·BA‖ so the layer starts as the base
            self.lora_magnitude = nn.Parameter(dora_fn.row_norm(self))

    def reset_parameters(self) -> None:
        # drawn in fp32 whatever the storage dtype: bf16 adapters start from the fp32 run's A, rounded
        # (uniform_ on a bf16 tensor draws a different sequence)
        a = torch.empty(self.lora_A.weight.shape, device=self.lora_A.weight.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's choice
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        if self.dora:  # the fused 4-bit paths below compute plain LoRA only
            return dora_fn.forward(self, x)
        p = self.dropout if self.training else 0.0
        base = self.base
        if isinstance(base, Linear4bit) and x.dtype == base.compute_dtype and torch.is_grad_enabled():
            return _LoRA4bit.apply(x, self.lora_A.weight, self.lora_B.weight, base, self.scaling, p,
                                   seeded.draw_seed() if p > 0 else 0)
        if isinstance(base, Linear4bit) and not torch.is_grad_enabled() and p == 0.0 and base.decodes(x):
            # generation: base and LoRA in fp32 from the fp32 adapter weights, one cast at the end
            # (per token, casting A and B to bf16 and two tiny bf16 GEMMs cost more than the layer)
            x2 = x.reshape(-1, self.in_features).float()
            y = base.decode_fp32(x2).addmm_(x2 @ self.lora_A.weight.float().t(), self.lora_B.weight.float().t(),
                                             alpha=self.scaling)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        y = base(x)
        a = self.lora_A.weight.to(x.dtype)  # (r, in): computed in the activation dtype,
        b = self.lora_B.weight.to(x.dtype)  # gradients flow back in the parameters' dtype
        return y + F.linear(F.linear(seeded.dropout(x, p), a), b) * self.scaling

    def forward_gated(self, gate: torch.Tensor, up: torch.Tensor,
                      saved_dtype: torch.dtype | None = None) -> torch.Tensor:
        """self(silu(gate) * up): over a 4-bit base in training, one function that does not keep the
        product (_GatedLoRA4bit); the same results either way. Backward reads gate and up as
        fused.kept(·, saved_dtype)."""
        base = self.base
        if isinstance(base, Linear4bit) and not self.disabled and gate.dtype == up.dtype == base.compute_dtype \
                and gate.shape == up.shape and torch.is_grad_enabled() and not self.dora:
            p = self.dropout if self.training else 0.0
            return _GatedLoRA4bit.apply(gate, up, self.lora_A.weight, self.lora_B.weight, base, self.scaling, p,
                                        seeded.draw_seed() if p > 0 else 0, saved_dtype)
        return self(fused.swiglu(gate, up, saved_dtype))

    def delta_weight(self) -> torch.Tensor:
        """s · B A in fp32, shape (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merge(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """Dequantize the base, add s·BA in fp32 (DoRA: and rescale its rows to m), return a plain
        nn.Linear in `dtype`."""
        base = self.base.merge(torch.float32) if isinstance(self.base, LoRALinear) else self.base
        if isinstance(base, Linear4bit):
            w = base.dequantized_weight(torch.float32)
            dtype = dtype or base.compute_dtype
        else:
            w = base.weight.detach().float()
            dtype = dtype or _root_dtype(self)
        w = dora_fn.merged_weight(self) if self.dora else w + self.delta_weight()
        bias = base.bias
        merged = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            merged.weight.copy_(w.to(dtype))
            if bias is not None:
                merged.bias.copy_(bias.detach().to(dtype))
        merged.requires_grad_(False)
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout:g}, dora={self.dora}"


def _dropped(x2: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """dropout(x2) in a scratch buffer (consumed by the next matmul), or x2 itself when p = 0."""
    if p == 0:
        return x2
    return seeded.apply(x2, p, seed, out=scratch(x2.shape, x2.dtype, x2.device, "dropout"))


def _lora4bit_forward(x2, a, b, layer: Linear4bit, scaling: float, p: float, seed: int):
    """(y, xa) for x2 (T, in): y = x2·Wᵀ + bias + s·(drop(x2)·Aᵀ)·Bᵀ, xa = drop(x2)·Aᵀ."""
    xa = _dropped(x2, p, seed) @ a.t()  # (T, r)
    w = layer.transient_weight(x2.dtype)  # (out, in)
    y = torch.mm(x2, w.t()) if layer.bias is None else torch.addmm(layer.bias, x2, w.t())
    return y.addmm_(xa, b.t(), alpha=scaling), xa


def _lora4bit_backward(g, x2, xa, a, b, layer: Linear4bit, s: float, p: float, seed: int, need, out=None):
    """(dL/dx2, dL/dA, dL/dB) from g = dL/dy (T, out); `need`: which of the three to form; dL/dx2
    into `out` (T, in) if given."""
    gxa = torch.mm(g, b) * s  # (T, r): dL/d(xa)
    grad_b = torch.mm(g.t(), xa).mul_(s) if need[2] else None  # (out, r)
    grad_a = torch.mm(gxa.t(), _dropped(x2, p, seed)) if need[1] else None
    grad_x = None
    if need[0]:
        grad_x = torch.mm(gxa, a, out=out)  # LoRA's term, (T, in): fresh, or in `out`
        if p > 0:  # through the dropout mask, in place (a fresh product)
            seeded.apply(grad_x, p, seed, out=grad_x)
        # then the base's term added in place, as addmm(LoRA's term, g, W) would, without its copy of
        # (T, in): above glibc's mmap threshold (fp32 down_proj: 6 MB) each copy was fresh pages
        grad_x.addmm_(g, layer.transient_weight(g.dtype))
    return grad_x, grad_a, grad_b


class _LoRA4bit(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ for a Linear4bit base, in one function (the training path).

    Versus composing base(x) + B(A(dropout(x)))·s under autograd: the LoRA product lands in the
    base output with one addmm (no separate scale and add passes over (tokens, out)); the
    dropout mask is re-derived from its seed in backward rather than kept; and what is saved is x
    itself, which q/k/v (and gate/up) share, plus the (tokens, r) product, instead of a dropped
    copy of x per layer. When x is a fused RMSNorm's output (q/k/v, gate/up) the norm's own saved input
    is kept instead and x formed again in backward (nn.fused.norm_source). W is dequantized again in
    backward, as in _Matmul4bit."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, layer: Linear4bit, scaling: float, p: float, seed: int):
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        y, xa = _lora4bit_forward(x2, lora_a.to(x.dtype), lora_b.to(x.dtype), layer, scaling, p, seed)
        source = fused.norm_source(x)  # x is a fused norm's output: keep the norm's input instead, as it does
        kept = source[:2] if source is not None else (x,)
        ctx.save_for_backward(*kept, xa, lora_a, lora_b)  # the parameters, cast again in backward: no saved copies
        ctx.layer, ctx.scaling, ctx.p, ctx.seed = layer, scaling, p, seed
        ctx.eps, ctx.dtype, ctx.shape = source and source[2], x.dtype, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        *kept, xa, lora_a, lora_b = ctx.saved_tensors
        x2 = fused.renormed((*kept, ctx.eps), ctx.dtype) if len(kept) == 2 else kept[0].reshape(-1, ctx.shape[-1])
        grad_x, grad_a, grad_b = _lora4bit_backward(
            grad_y.reshape(-1, grad_y.shape[-1]), x2, xa, lora_a.to(x2.dtype),
            lora_b.to(x2.dtype), ctx.layer, ctx.scaling, ctx.p, ctx.seed, ctx.needs_input_grad[:3])
        return (None if grad_x is None else grad_x.view(ctx.shape),
                None if grad_a is None else grad_a.to(lora_a.dtype),
                None if grad_b is None else grad_b.to(lora_b.dtype), None, None, None, None)


class _GatedLoRA4bit(torch.autograd.Function):
    """_LoRA4bit applied to silu(gate)·up (LlamaMLP's down_proj), in one function: it keeps gate and
    up (which SwiGLU needs anyway) instead of their product, and forms the product again in
    backward (one pass): 3 MB less per SmolLM2 layer at 4 x 256 tokens. Same results as
    down_proj(swiglu(gate, up))."""

    @staticmethod
    def forward(ctx, gate, up, lora_a, lora_b, layer: Linear4bit, scaling: float, p: float, seed: int,
                saved_dtype: torch.dtype | None):
        g, u = gate.contiguous(), up.contiguous()
        h = fused.swiglu_forward(g, u, out=scratch(g.shape, g.dtype, g.device, "swiglu"))  # used here only
        h2 = h.view(-1, h.shape[-1])
        y, xa = _lora4bit_forward(h2, lora_a.to(h.dtype), lora_b.to(h.dtype), layer, scaling, p, seed)
        ctx.save_for_backward(fused.kept(g, saved_dtype), fused.kept(u, saved_dtype), xa, lora_a, lora_b)
        ctx.layer, ctx.scaling, ctx.p, ctx.seed, ctx.dtype = layer, scaling, p, seed, g.dtype
        return y.view(*h.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        gate, up, xa, lora_a, lora_b = ctx.saved_tensors
        g, u = gate.to(ctx.dtype).contiguous(), up.to(ctx.dtype).contiguous()
        h = fused.swiglu_forward(g, u, out=scratch(g.shape, g.dtype, g.device, "swiglu"))
        h2 = h.view(-1, h.shape[-1])
        need = (ctx.needs_input_grad[0] or ctx.needs_input_grad[1], *ctx.needs_input_grad[2:4])
        grad_h, grad_a, grad_b = _lora4bit_backward(
            grad_y.reshape(-1, grad_y.shape[-1]), h2, xa, lora_a.to(h.dtype), lora_b.to(h.dtype), ctx.layer,
            ctx.scaling, ctx.p, ctx.seed, need, out=scratch(h2.shape, h.dtype, h.device, "grad_h"))
        grad_gate = grad_up = None
        if grad_h is not None:  # into g and u where they are this backward's own copies (bf16 kept)
            own = g.data_ptr() != gate.data_ptr() and u.data_ptr() != up.data_ptr()
            grad_gate, grad_up = fused.swiglu_backward(grad_h.view(h.shape), g, u, out=(g, u) if own else None)
        return (grad_gate, grad_up, None if grad_a is None else grad_a.to(lora_a.dtype),
                None if grad_b is None else grad_b.to(lora_b.dtype), None, None, None, None, None)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Every LoRALinear in `model` runs its base layer alone inside the block: the model is then the
    frozen base, bit for bit (the reference policy of DPO, with no second copy of the weights)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


_FACTORS = ("lora_A.weight", "lora_B.weight", "lora_magnitude")


def keep_reference(model: nn.Module) -> int:
    """Freeze a copy of every LoRALinear's current factors (A, B and DoRA's magnitude) as DPO's
    reference policy: plain tensors on the layer, not parameters, so neither the optimizer nor the
    saved adapter sees them. -> bytes held by the copies."""
    held = 0
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.reference = {n: m.get_parameter(n).detach().clone() for n in _FACTORS if _has(m, n)}
            held += sum(t.numel() * t.element_size() for t in m.reference.values())
    return held


@contextlib.contextmanager
def reference(model: nn.Module):
    """DPO's reference policy inside the block (use under no_grad): the frozen factors `keep_reference`
    copied where the layers hold them (a given adapter, e.g. the SFT one), else the base with LoRA
    disabled. The factors are swapped in place of the trainable ones, so no second model exists."""
    pairs = [(m.get_parameter(n), t) for m in model.modules() if isinstance(m, LoRALinear)
             for n, t in (m.reference or {}).items()]
    if not pairs:
        with disabled(model):
            yield model
        return
    trained = [p.data for p, _ in pairs]
    for p, t in pairs:
        p.data = t
    try:
        yield model
    finally:
        for (p, _), t in zip(pairs, trained):
            p.data = t


def _has(layer: "LoRALinear", name: str) -> bool:
    return name != "lora_magnitude" or layer.dora


def _root_dtype(layer: "LoRALinear") -> torch.dtype:
    while isinstance(layer, LoRALinear):
        layer = layer.base
    return layer.compute_dtype if isinstance(layer, Linear4bit) else layer.weight.dtype


def _device_of(module: nn.Module) -> torch.device:
    if isinstance(module, Linear4bit):
        return module.weight_data.device
    return next(module.parameters()).device
