"""Cross-entropy through a frozen output head, chunked, with the gradient formed in forward.

    loss = Σ_t logsumexp(z_t) − z_t[y_t],   z_t = cap·tanh(h_t·Wᵀ / cap)  (cap: Gemma's softcapping)

F.cross_entropy(head(h).float(), y) keeps (tokens × vocab) logits in bf16 and fp32 plus their
gradient — for SmolLM2 (vocab 49,152) that is 0.6 GB at 1,024 tokens — and its log-softmax
backward, zero fill and fp32 copies took a fifth of a training step on CPU. The head is frozen,
so the only gradient is dL/dh = (softmax(z) − onehot(y))·W, which forward can form chunk by chunk
while each chunk's logits are in cache; backward then just scales it by the incoming gradient.
Logits come from the same bf16 matmul as the head's, the softmax is in fp32, as before.
"""

from __future__ import annotations

import torch

CHUNK_TOKENS = 256  # (256 × vocab) fp32 per chunk: 50 MB for a 49k vocabulary


def _chunk(h, y, weight, softcap: float | None, want_grad: bool):
    """(summed loss, dL/dh or None) for one chunk; its (C, V) temporaries die on return."""
    z = (h @ weight.t()).float()  # (C, V)
    t = None
    if softcap:
        t = torch.tanh(z.div_(softcap))
        z = t * softcap
    lse = torch.logsumexp(z, dim=-1)  # (C,)
    loss = (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
    if not want_grad:
        return loss, None
    g = z.sub_(lse[:, None]).exp_()  # softmax, in place over the logits
    g[torch.arange(len(y), device=g.device), y] -= 1.0
    if softcap:
        g.mul_(1.0 - t * t)  # d(cap·tanh(u/cap))/du
    return loss, g.to(h.dtype) @ weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap: float | None, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            loss, grad = _chunk(hidden[rows], targets[rows], weight, softcap, grad_hidden is not None)
            total += loss
            if grad is not None:
                grad_hidden[rows] = grad
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
