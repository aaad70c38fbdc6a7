"""The chunked head + cross-entropy (nn/loss.py) equals F.cross_entropy on full logits."""

import pytest
import torch
import torch.nn.functional as F

from qlora.nn.loss import linear_cross_entropy


@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("reference", [False, True])  # bf16 without cap: the compiled per-row pass
def test_matches_full_logits(cap, dtype, tol, reference, monkeypatch):
    if reference:
        monkeypatch.setenv("QLORA_REFERENCE_KERNELS", "1")
    torch.manual_seed(0)
    hidden = torch.randn(300, 32, dtype=dtype, requires_grad=True)
    weight = (torch.randn(500, 32) * 0.5).to(dtype)
    targets = torch.randint(0, 500, (300,))
    grads, losses = [], []
    for fused in (True, False):
        if fused:
            loss = linear_cross_entropy(hidden, weight, targets, cap, chunk=64)  # 5 chunks, last partial
        else:
            z = (hidden @ weight.t()).float()
            z = torch.tanh(z / cap) * cap if cap else z
            loss = F.cross_entropy(z, targets, reduction="sum")
        (loss * 0.5).backward()
        losses.append(loss.item())
        grads.append(hidden.grad.float())
        hidden.grad = None
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < tol


def test_no_grad_and_trainable_head():
    hidden, targets = torch.randn(10, 8), torch.randint(0, 20, (10,))
    weight = torch.randn(20, 8)
    with torch.no_grad():
        expected = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
        assert linear_cross_entropy(hidden, weight, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="frozen output head"):
        linear_cross_entropy(hidden, weight.requires_grad_(), targets)
