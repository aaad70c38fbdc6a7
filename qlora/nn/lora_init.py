"""LoRA initialisations that see the quantization error: LoftQ and PiSSA / QPiSSA.

Both return a 4-bit base Q and LoRA factors (A (r, in), B (out, r)) with Q + s·BA ≈ W from step 0,
instead of Q = quantize(W) and B = 0:

- PiSSA / QPiSSA (Meng et al. 2024, arXiv 2404.02948): the top-r singular directions of W go into
  A and B (B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ, PEFT's split), and the residual W - s·BA is
  quantized. The quantization error is that of the residual, whose largest directions are gone.
- LoftQ (Li et al. 2023, arXiv 2310.08659): alternate T times between Q_t = quantize(W - s·B_{t-1}A_{t-1})
  and s·B_t A_t = the rank-r SVD of W - Q_t (B_0 A_0 = 0), so that BA soaks up the quantization
  error Q leaves.

Deterministic (top-r SVD in fp32 on the CPU, no random draws): the same weights and settings give
the same bits, which is how qlora re-derives the base from the original checkpoint when an adapter
trained this way is loaded (hf.load(lora_init=...); adapters.py records the init in the adapter).
`quantize(w) -> QuantizedTensor` and `dequantize(q) -> fp32` are passed in, so the math knows
nothing of the 4-bit format.
"""

from __future__ import annotations

import torch

METHODS = ("gaussian", "loftq", "pissa")


def _top_r(m: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) fp32 with s·BA the best rank-r approximation of m (Eckart-Young), the singular values
    split evenly between the factors.

    Only the top r directions are needed, so instead of a full SVD of m: the eigenvectors of the
    smaller Gram matrix (m mᵀ or mᵀ m) span a subspace of 2r directions, and the exact SVD of m
    projected on it (Rayleigh-Ritz, a (2r, n) matrix) gives the top r. The oversampling absorbs the
    Gram's fp32 rounding (the squared spectrum blurs directions with nearby singular values); the
    small SVD is in m's own precision. 2.5-4x faster on SmolLM2's 576x1536 weights, where LoftQ's
    five SVDs of all 210 weights were most of a model load; deterministic like the SVD (no random
    start, unlike torch.svd_lowrank)."""
    m = m.float()
    wide = m.shape[0] <= m.shape[1]
    mt = m if wide else m.T  # (short, long): the Gram is short x short
    basis = torch.linalg.eigh(mt @ mt.T)[1].flip(1)[:, :min(2 * r, mt.shape[0])]  # top eigenvectors first
    u_small, s, vh = torch.linalg.svd(basis.T @ mt, full_matrices=False)
    u, vh, s = basis @ u_small[:, :r], vh[:r], s[:r]
    if not wide:
        u, vh = vh.T, u.T
    root = (s / scaling).sqrt()
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()


def pissa(w: torch.Tensor, r: int, scaling: float, quantize, dequantize):
    """(Q of W - s·BA, A, B) with A, B the top-r singular directions of W."""
    a, b = _top_r(w, r, scaling)
    residual = w.float() - scaling * (b @ a)
    return quantize(residual.to(w.dtype)), a, b


def loftq(w: torch.Tensor, r: int, scaling: float, quantize, dequantize, iters: int = 5, errors: list | None = None):
    """(Q, A, B) after `iters` LoftQ alternations; `errors` (if given) receives ‖W - (Q_t + s·B_t A_t)‖_F
    after each one."""
    if iters < 1:
        raise ValueError(f"LoftQ needs at least one iteration, got {iters}")
    w32 = w.float()
    target = w
    for _ in range(iters):
        q = quantize(target)
        residual = w32 - dequantize(q)
        a, b = _top_r(residual, r, scaling)
        ba = scaling * (b @ a)
        if errors is not None:
            errors.append(float((residual - ba).norm()))
        target = (w32 - ba).to(w.dtype)
    return q, a, b


def spec(method: str, r: int, alpha: float, rslora: bool = False, iters: int = 5) -> dict | None:
    """The `lora_init` of hf.load for a LoRA of rank r and alpha (None for the plain gaussian start)."""
    from .lora import lora_scaling

    if method not in METHODS:
        raise ValueError(f"unknown LoRA init {method!r}; choose one of {', '.join(METHODS)}")
    if method == "gaussian":
        return None
    init = dict(method=method, r=r, scaling=lora_scaling(r, alpha, rslora))
    return dict(init, iters=iters) if method == "loftq" else init


def initialise(w: torch.Tensor, init: dict, quantize, dequantize):
    """Dispatch on init["method"] ("loftq" | "pissa") with init["r"], init["scaling"] (and
    init["iters"] for LoftQ)."""
    if init["method"] == "pissa":
        return pissa(w, init["r"], init["scaling"], quantize, dequantize)
    if init["method"] == "loftq":
        return loftq(w, init["r"], init["scaling"], quantize, dequantize, init.get("iters", 5))
    raise ValueError(f"unknown LoRA init {init['method']!r}; choose one of {', '.join(METHODS)}")


# ---- glue for the loader (nn.surgery.quantize_layer) and the LoRA wrapper: one layer at a time ----

_STASH = "lora_init_ab"  # attribute on a fresh Linear4bit: its (A, B), until a LoRALinear takes them
_INIT = "lora_init"  # attribute on such a Linear4bit for good: the init that derived its codes


def quantized_layer(weight: torch.Tensor, bias, spec, compute_dtype: torch.dtype, init: dict):
    """A Linear4bit of `weight` (out, in) in the 4-bit format `spec` (quant.spec.QuantSpec) after
    LoftQ / PiSSA, with the LoRA factors stashed on it and the init recorded on it (see `of`).
    Works on fp32 copies of one layer's weight: the loader calls it as each weight streams in."""
    from .. import quant
    from .linear4bit import Linear4bit

    r = init["r"]
    if r > min(weight.shape):
        raise ValueError(f"LoRA rank {r} exceeds the weight's smaller side {min(weight.shape)}")
    fmt = (spec.quant_type, spec.blocksize, spec.double_quant)
    q, a, b = initialise(weight, init, lambda t: quant.quantize(t, *fmt), lambda q: quant.dequantize(q, torch.float32))
    layer = Linear4bit(q, bias, compute_dtype)
    setattr(layer, _STASH, (a, b, init["scaling"]))
    setattr(layer, _INIT, dict(init))
    return layer


def of(net) -> dict | None:
    """The LoftQ / PiSSA init the model's 4-bit layers were quantized with (None: plain quantization),
    read from the layers themselves: what an adapter trained on them records."""
    for m in net.modules():
        init = m.__dict__.get(_INIT)
        if init is not None:
            return dict(init)
    return None


def take_stashed(layer) -> None:
    """Move the (A, B) stashed on a LoRALinear's base into the LoRALinear (DoRA: and restart its
    magnitude at ‖W + s·BA‖, so step 0 still computes Q + s·BA)."""
    ab = layer.base.__dict__.pop(_STASH, None)
    if ab is None:
        return
    a, b, scaling = ab
    if a.shape != layer.lora_A.weight.shape or scaling != layer.scaling:
        raise ValueError(f"the base was initialised for LoRA rank {a.shape[0]} and scaling {scaling:g}, "
                         f"the adapter has rank {layer.r} and scaling {layer.scaling:g}")
    with torch.no_grad():
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.copy_(b)
        if layer.dora:
            from . import dora

            layer.lora_magnitude.copy_(dora.row_norm(layer))


def drop_stashed(layer) -> None:
    """Forget the factors (an adapter's trained A and B replace them)."""
    layer.__dict__.pop(_STASH, None)
