"""RMSNorm and SwiGLU as single autograd functions, and `fuse(net)` to put them into a model.

transformers' LlamaRMSNorm is six fp32 elementwise ops (autograd keeps an fp32 copy of the input)
and LlamaMLP's silu(gate) * up keeps silu(gate) beside gate and up. On SmolLM2-135M (batch 4 x 256)
those took ~9% of a training step and 225 MB of the 718 MB autograd saved. Here each is one
function: forward keeps only its bf16 inputs (and one fp32 rstd per row), backward recomputes the
rest. On CPU in bf16 or fp32 both directions are one compiled pass (quant/csrc/fused_cpu.cpp); in
fp32 (the compute dtype of CPUs without native bf16) they took a SmolLM2 step on AVX2 from 9.5 to
7.3 s. Elsewhere the same maths runs as torch ops. Forward is transformers'
computation, rounding for rounding; results can differ from it by one bf16 rounding (sum order,
exp), in fp32 by a few ulps; tested in tests/nn/test_fused.py.

The 4-bit LoRA layers that read a norm's output (q/k/v, gate/up) keep the norm's input, which
the norm keeps anyway, instead of that output, and form it again in backward (`norm_source`,
`renormed`): same bits, one tensor of (tokens, hidden) less per norm (SmolLM2 fp32, 4 x 256:
activations 986 -> 851 MiB estimated).

`keep_saved_in(net, torch.bfloat16)` (TrainConfig.saved_activations) has both keep what backward
reads (the norm's input, gate and up) rounded to bf16 when they are wider: with fp32 compute
forward is unchanged and backward reads bf16 copies, ~30% less activation memory (SmolLM2,
4 x 256: 851 -> 602 MiB estimated). TrainConfig's default, auto, does this where auto picked fp32.

The norm weight is taken as frozen (QLoRA trains only the adapters): when it requires grad the
plain ops run instead, so autograd gives it a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import kernels


def _kernels(*tensors: torch.Tensor):
    dtype = tensors[0].dtype
    if dtype in (torch.bfloat16, torch.float32) and all(t.dtype == dtype for t in tensors):
        return kernels.cpu_kernels(*tensors)
    return None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def kept(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """What an autograd function saves of `t`: t, or t rounded to `dtype` when that is narrower."""
    return t if dtype is None or dtype.itemsize >= t.element_size() else t.to(dtype)


def _rms_norm_rows(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) for the rows of x2 (T, H): the forward pass, the same bits every time it is called."""
    k = _kernels(x2, weight)
    if k is not None:
        return k.train.rms_norm_forward(x2, weight.contiguous(), eps)
    rstd = torch.rsqrt(x2.float().pow(2).mean(-1) + eps)
    return weight * (x2.float() * rstd[:, None]).to(x2.dtype), rstd


_SOURCE = "_fused_norm_source"  # attribute on a fused norm's output: what renormed() forms it again from


def norm_source(t: torch.Tensor) -> tuple | None:
    """(the input as the norm keeps it, weight, eps) when `t` is a fused RMSNorm's output in training,
    else None. A consumer that would save `t` for backward can save these instead (the norm keeps them
    anyway) and form `t` again with `renormed`: same bits, unless the norm keeps its input rounded
    (keep_saved_in), where backward reads `t` formed from that rounded copy."""
    return getattr(t, _SOURCE, None)


_last: list = []  # [x2, weight, eps, dtype, output]: renormed's one result, reused by the norm's next reader


def renormed(source: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The norm's output (T, H) from norm_source(output), in the compute dtype `dtype`. Formed once
    for the layers that read one norm (q/k/v, gate/up: their backwards run back to back); the cache
    holds the input too, so its memory cannot be reused by another tensor while it is the key; the
    norm's backward, which runs after all its readers', lets it go, as does the end of backward.
    Called from backward only."""
    x2, weight, eps = source
    if _last and _same(_last[0], x2) and _same(_last[1], weight) and _last[2:4] == [eps, dtype]:
        return _last[4]
    y = _rms_norm_rows(x2.to(dtype), weight, eps)[0]
    _last[:] = [x2, weight, eps, dtype, y]
    # the first layer's norm has no backward (its input, the frozen embedding, needs no gradient): let go at the end
    torch.autograd.Variable._execution_engine.queue_callback(_last.clear)
    return y


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype and a._version == b._version
            and a.stride() == b.stride())


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, saved_dtype: torch.dtype | None = None):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = _rms_norm_rows(x2, weight, eps)
        saved = kept(x2, saved_dtype)
        ctx.save_for_backward(saved, weight, rstd)
        ctx.dtype = x2.dtype
        out = y.view(x.shape)
        setattr(out, _SOURCE, (saved, weight, eps))  # read by nn.lora._LoRA4bit
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        if _last and _same(_last[0], x2):
            _last.clear()  # every reader of this norm's output is done
        x2 = x2.to(ctx.dtype)
        dy2 = dy.reshape(x2.shape).contiguous()
        k = _kernels(dy2, x2, weight)
        if k is not None:
            dx = k.train.rms_norm_backward(dy2, x2, weight.contiguous(), rstd)
        else:  # dx = r (g - n mean(g n)), g = dy w (in the activation dtype, as autograd's), n = x r
            g = (dy2 * weight).float()
            n = x2.float() * rstd[:, None]
            dx = (rstd[:, None] * (g - n * (g * n).mean(-1, keepdim=True))).to(x2.dtype)
        return dx.view(dy.shape), None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, saved_dtype: torch.dtype | None = None) -> torch.Tensor:
    if weight.requires_grad and torch.is_grad_enabled():
        return rms_norm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps, saved_dtype)


def swiglu_forward(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(g) * u for contiguous g, u (no autograd), into `out` if given (contiguous, like g)."""
    k = _kernels(g, u)
    if k is not None:
        return k.train.swiglu_forward(g, u, out)
    return torch.mul(F.silu(g), u, out=out) if out is not None else F.silu(g) * u


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dg, dL/du) of silu(g) * u, as autograd through silu and mul forms them:
    du = dh s, ds = dh u, dg = ds sig (1 + g (1 - sig)). Into `out` = (dg, du) if given (contiguous,
    like g), which may be g and u themselves: every element is read before it is overwritten."""
    dh = dh.contiguous()
    k = _kernels(dh, g, u)
    if k is not None:
        return k.train.swiglu_backward(dh, g, u, out)
    sig = torch.sigmoid(g.float())
    ds = (dh * u).float()
    dg, du = (ds * sig * (1 + g.float() * (1 - sig))).to(g.dtype), dh * F.silu(g)
    return (dg, du) if out is None else (out[0].copy_(dg), out[1].copy_(du))


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, saved_dtype: torch.dtype | None = None):
        g, u = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(kept(g, saved_dtype), kept(u, saved_dtype))
        ctx.dtype = g.dtype
        return swiglu_forward(g, u)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g, u = (t.to(ctx.dtype) for t in ctx.saved_tensors)
        return (*swiglu_backward(dh, g, u), None)


def swiglu(gate: torch.Tensor, up: torch.Tensor, saved_dtype: torch.dtype | None = None) -> torch.Tensor:
    """silu(gate) * up; backward reads gate and up as kept(·, saved_dtype)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    return _SwiGLU.apply(gate, up, saved_dtype)


class RMSNorm(nn.Module):
    """LlamaRMSNorm's computation through rms_norm; the same `weight` and `variance_epsilon`."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps
        self.saved_dtype: torch.dtype | None = None  # keep_saved_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon, self.saved_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class GatedMLP(nn.Module):
    """LlamaMLP: down_proj(silu(gate_proj(x)) * up_proj(x)), holding the same three projections."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.saved_dtype: torch.dtype | None = None  # keep_saved_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        gated = getattr(self.down_proj, "forward_gated", None)  # LoRALinear: keeps gate and up only
        if gated is not None:
            return gated(gate, up, self.saved_dtype)
        return self.down_proj(swiglu(gate, up, self.saved_dtype))


# transformers classes whose forward is exactly LlamaRMSNorm's / LlamaMLP's (Gemma's norm scales by
# 1 + w and its MLP uses GELU: they stay as they are)
_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
FUSED_MODEL_TYPES = frozenset(n.removesuffix("RMSNorm").lower() for n in _NORMS)  # for the memory estimate


def fuse(net: nn.Module) -> int:
    """Replace the model's RMSNorm and SiLU-gated MLP modules by RMSNorm / GatedMLP, keeping their
    parameters and submodules (state_dict keys are unchanged). Returns how many were replaced."""
    swaps = []
    for name, m in net.named_modules():
        kind = type(m).__name__
        if kind in _NORMS:
            swaps.append((name, RMSNorm(m.weight, m.variance_epsilon)))
        elif kind in _MLPS and getattr(getattr(m, "config", None), "hidden_act", None) in ("silu", "swish"):
            swaps.append((name, GatedMLP(m.gate_proj, m.up_proj, m.down_proj)))
    for name, new in swaps:
        net.set_submodule(name, new)
    return len(swaps)


def keep_saved_in(net: nn.Module, dtype: torch.dtype | None) -> int:
    """Have the fused norms and MLPs of `net` keep their saved activations in `dtype` where that is
    narrower than the compute dtype (None: as computed, the default). Returns how many modules."""
    found = [m for m in net.modules() if isinstance(m, (RMSNorm, GatedMLP))]
    for m in found:
        m.saved_dtype = dtype
    return len(found)
