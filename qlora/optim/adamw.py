"""AdamW maths as one pure function; every storage policy (fp32, 8-bit, paged) calls it.

Decoupled weight decay (Loshchilov & Hutter 2019, Algorithm 2) with Adam's bias correction
(Kingma & Ba 2015, Algorithm 1). The float operations, their order and the Python-side scalar
arithmetic are those of `torch.optim.AdamW` (single-tensor and foreach paths), so fp32 results are
bit-identical to it (tests/optim/test_adamw.py).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place on fp32 tensors of one shape; `step` counts from 1.

    theta <- theta * (1 - lr * wd)
    m <- m + (1 - b1) (g - m);  v <- b2 v + (1 - b2) g^2
    theta <- theta - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    `grad` is only read."""
    beta1, beta2 = betas
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    # torch uses lerp for the first moment (one rounding fewer than b1*m + (1-b1)*g)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = exp_avg_sq.sqrt()  # one temporary; torch's out-of-place divide rounds the same
    denom.div_(bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
