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


@pytest.mark.parametrize("kind", ["adamw", "paged_adamw"])
def test_bf16_parameter_updates_in_fp32_and_rounds_once_stochastically(kind, tmp_path):
    """Per step: widen the bf16 weight, the fp32 AdamW update on fp32 state, one stochastic
    rounding seeded by (parameter index, step) - equal to that reference bit for bit."""
    from qlora.optim.rounding import seed_for, stochastic_round_

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16)) for s in ((64, 64), (8, 300))]
    ref = [p.detach().clone() for p in params]
    moments = [(torch.zeros(p.shape), torch.zeros(p.shape)) for p in params]
    kw = dict(memory_budget=40_000, offload_dir=str(tmp_path)) if kind.startswith("paged") else {}  # pages out
    opt = build_optimizer([(f"w{i}", p) for i, p in enumerate(params)], kind, lr=1e-3, weight_decay=0.1, **kw)
    for step in range(1, 4):
        for i, (p, r, (m, v)) in enumerate(zip(params, ref, moments)):
            g = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
            p.grad = g
            master = r.float()
            adamw_update(master, g.float(), m, v, step=step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                         weight_decay=0.1)
            stochastic_round_(r, master, seed_for(i, step))
        opt.step()
        for p, r in zip(params, ref):
            assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), r)
    assert torch.equal(opt.state_tensors()["w0.exp_avg"], moments[0][0])
    assert torch.equal(opt.state_tensors()["w1.exp_avg_sq"], moments[1][1])
    assert (opt.stats()["bytes_out"] > 0) == kind.startswith("paged")
