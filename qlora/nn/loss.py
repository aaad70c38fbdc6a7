"""Cross-entropy through a frozen output head, chunked, with the gradient formed in forward.

    loss = Σ_t logsumexp(z_t) − z_t[y_t],   z_t = cap·tanh(h_t·Wᵀ / cap)  (cap: Gemma's softcapping)

F.cross_entropy(head(h).float(), y) keeps (tokens × vocab) logits in bf16 and fp32 plus their
gradient — for SmolLM2 (vocab 49,152) that is 0.6 GB at 1,024 tokens — and its log-softmax
backward, zero fill and fp32 copies took a fifth of a training step on CPU. The head is frozen,
so the only gradient is dL/dh = (softmax(z) − onehot(y))·W, which forward can form chunk by chunk
while each chunk's logits are in cache; backward then just scales it by the incoming gradient.
Logits come from the same bf16 matmul as the head's, the softmax is in fp32, as before. On CPU
with bf16 logits one compiled pass per row (quant/csrc/train_cpu.cpp) does max, exp, sum and
softmax − onehot in place: torch's exp alone took ~17 ms per (256 × 49k) chunk here.
"""

from __future__ import annotations

import torch

from ..quant import kernels

# (256 × vocab) logits per chunk: 25 MB in bf16 for a 49k vocabulary (+ 50 in fp32 off the compiled path)
CHUNK_TOKENS = 256


def _chunk_compiled(k, h, y, weight, out, zb):
    """_chunk through one compiled pass per row (max, exp and sum, softmax - onehot in place)."""
    torch.mm(h, weight.t(), out=zb)
    loss = k.train.cross_entropy_rows(zb, y.contiguous(), out is not None).sum()
    if out is not None:
        torch.mm(zb, weight, out=out)
    return loss


def _chunk(h, y, weight, softcap: float | None, out, zb, z):
    """Summed loss of one chunk; with `out`, dL/dh written there. zb (C, V) in h's dtype and z
    (C, V) fp32 are buffers the caller reuses across chunks: fresh ones cost ~25k page faults per
    chunk on CPU."""
    torch.mm(h, weight.t(), out=zb)
    rows = torch.arange(len(y), device=h.device)
    if z is not zb:
        z.copy_(zb)  # fp32 (a mixed-dtype op would take torch's unvectorized path: ~20x slower)
    t = None
    if softcap:
        t = torch.tanh(z.div_(softcap))
        torch.mul(t, softcap, out=z)
    zy, m = z[rows, y], z.amax(-1, keepdim=True)
    e = z.sub_(m).exp_()  # exp(z - max)
    s = e.sum(-1)
    loss = (m.squeeze(1) + s.log() - zy).sum()  # logsumexp - target logit
    if out is None:
        return loss
    e[rows, y] -= s  # softmax - onehot, before dividing by s
    e.mul_(s.reciprocal()[:, None])
    if softcap:
        e.mul_(1.0 - t * t)  # d(cap·tanh(u/cap))/du
    if zb is not e:
        zb.copy_(e)
    torch.mm(zb, weight, out=out)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap: float | None, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        c = min(chunk, hidden.shape[0])
        zb = hidden.new_empty(c, weight.shape[0])
        k = kernels.cpu_kernels(hidden) if hidden.dtype == torch.bfloat16 and not softcap else None
        z = None  # the fp32 logits of the torch path (the compiled pass needs none)
        if k is None:
            z = zb if zb.dtype == torch.float32 and not softcap else zb.new_empty(zb.shape, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            n, out = len(targets[rows]), None if grad_hidden is None else grad_hidden[rows]
            total += (_chunk_compiled(k, hidden[rows], targets[rows], weight, out, zb[:n]) if k is not None else
                      _chunk(hidden[rows], targets[rows], weight, softcap, out, zb[:n], z[:n]))
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None = None, chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Summed cross-entropy of targets (N,) under logits hidden (N, H) · weight (V, H)ᵀ, fp32.
    The head weight is frozen here (no gradient flows to it)."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy is for a frozen output head; compute the logits instead")
    return _LinearCrossEntropy.apply(hidden, weight.detach(), targets, softcap, chunk)
