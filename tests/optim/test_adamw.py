"""The pure AdamW function and the fp32 optimizer equal torch.optim.AdamW bit for bit."""

import pytest
import torch

from qlora.optim import adamw_update, build_optimizer

SHAPES = [(37, 53), (4096,), (3, 5, 7), (1,)]


def _params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) * (10.0 ** (step % 3 - 2)) for p in params]


def _run_torch(foreach, weight_decay, steps, lrs):
    params = _params()
    opt = torch.optim.AdamW(params, lr=lrs[0], betas=(0.9, 0.95), eps=1e-6, weight_decay=weight_decay,
                            foreach=foreach)
    for t in range(steps):
        for p, g in zip(params, _grads(params, t)):
            p.grad = g
        opt.param_groups[0]["lr"] = lrs[t]
        opt.step()
    return params, opt


LRS = [1e-3 * (1 + t) / 3 for t in range(7)]  # a changing lr, like a warmup schedule


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("foreach", [False, True, None])
def test_pure_function_equals_torch_adamw_bitwise(foreach, weight_decay):
    ref, ref_opt = _run_torch(foreach, weight_decay, len(LRS), LRS)
    params = _params()
    states = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for t in range(len(LRS)):
        for p, g, (m, v) in zip(params, _grads(params, t), states):
            adamw_update(p.data, g, m, v, step=t + 1, lr=LRS[t], betas=(0.9, 0.95), eps=1e-6,
                         weight_decay=weight_decay)
    for p, r, (m, v) in zip(params, ref, states):
        assert torch.equal(p, r)
        assert torch.equal(m, ref_opt.state[r]["exp_avg"])
        assert torch.equal(v, ref_opt.state[r]["exp_avg_sq"])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_optimizer_equals_torch_bitwise(weight_decay):
    ref, _ = _run_torch(False, weight_decay, len(LRS), LRS)
    params = _params()
    opt = build_optimizer([(f"p{i}", p) for i, p in enumerate(params)], "adamw", lr=0.0,
                          betas=(0.9, 0.95), eps=1e-6, weight_decay=weight_decay)
    for t in range(len(LRS)):
        for p, g in zip(params, _grads(params, t)):
            p.grad = g
        opt.lr = LRS[t]
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None for p in params)
    for p, r in zip(params, ref):
        assert torch.equal(p, r)
    opt.close()


def test_none_grad_skips_parameter_and_its_step_count():
    # torch counts steps per parameter; a parameter without grad neither moves nor advances
    ref = _params()
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    params = _params()
    opt = build_optimizer([(f"p{i}", p) for i, p in enumerate(params)], "adamw", lr=1e-2, weight_decay=0.01)
    for t in range(4):
        for ps in (ref, params):
            for k, (p, g) in enumerate(zip(ps, _grads(ps, t))):
                p.grad = None if (k == 1 and t < 2) else g
        ref_opt.step()
        opt.step()
    for p, r in zip(params, ref):
        assert torch.equal(p, r)
    assert opt.meta()["params"]["p1"]["step"] == 2 and opt.meta()["step"] == 4


def test_bf16_parameter_updates_in_fp32_and_rounds_once():
    p = torch.nn.Parameter(torch.randn(64, 64).to(torch.bfloat16))
    master = p.detach().float().clone()
    m, v = torch.zeros_like(master), torch.zeros_like(master)
    opt = build_optimizer([("w", p)], "adamw", lr=1e-2)
    g = torch.randn(64, 64).to(torch.bfloat16)
    p.grad = g
    opt.step()
    adamw_update(master, g.float(), m, v, step=1, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    assert p.dtype == torch.bfloat16
    assert torch.equal(p.detach(), master.to(torch.bfloat16))
    assert torch.equal(opt.state_tensors()["w.exp_avg"], m)
