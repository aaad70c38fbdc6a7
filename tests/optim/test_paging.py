"""Paged storage: same bits as resident storage, counters that add up, nothing when it fits."""

import os

import pytest
import torch

from qlora.optim import build_optimizer

SHAPES = [(256, 96), (40, 40), (7,), (128, 160), (96, 256)]  # 8-bit on all but two


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(f"layer{i}.weight", torch.nn.Parameter(torch.randn(s, generator=g))) for i, s in enumerate(SHAPES)]


def _train(kind, steps=5, **kw):
    params = _model()
    opt = build_optimizer(params, kind, lr=1e-2, weight_decay=0.01, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for _, p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        opt.zero_grad()
    return params, opt


def _largest_page(opt):
    return max(lay.nbytes for lay in opt._layouts)


@pytest.mark.parametrize("bits", ["", "_8bit"])
@pytest.mark.parametrize("budget_pages", [1, 2])  # 1: no room to prefetch; 2: prefetch overlaps
def test_paged_equals_unpaged_bitwise_when_evicting_every_step(bits, budget_pages, tmp_path):
    ref_params, ref_opt = _train("adamw" + bits)
    budget = budget_pages * _largest_page(ref_opt)
    params, opt = _train("paged_adamw" + bits, memory_budget=budget, offload_dir=str(tmp_path))
    for (_, a), (_, b) in zip(ref_params, params):
        assert torch.equal(a, b)
    ref_state, state = ref_opt.state_tensors(), opt.state_tensors()
    assert ref_state.keys() == state.keys()
    assert all(torch.equal(ref_state[k], state[k]) for k in state)
    s = opt.stats()
    assert s["paged"] and s["evictions"] >= 5 * (len(SHAPES) - budget_pages)
    assert s["peak_resident_bytes"] <= budget
    total = sum(lay.nbytes for lay in opt._layouts)
    assert s["bytes_in"] >= 5 * (total - budget) and s["bytes_out"] >= 4 * (total - budget)
    if budget_pages == 2:
        assert s["prefetch_hits"] > 0
    opt.close()
    ref_opt.close()


def test_room_to_spare_means_no_paging_and_no_file(tmp_path):
    _, ref = _train("adamw")
    params, opt = _train("paged_adamw", memory_budget=10 * sum(lay.nbytes for lay in ref._layouts),
                         offload_dir=str(tmp_path))
    s = opt.stats()
    assert not s["paged"] and s["bytes_in"] == s["bytes_out"] == s["evictions"] == 0
    assert os.listdir(tmp_path) == []


def test_backing_file_is_gone_while_running_and_after_close(tmp_path):
    # unlinked as soon as it is mapped: a killed run leaves no multi-GB file behind
    params, opt = _train("paged_adamw", steps=1, memory_budget=200_000, offload_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []
    assert "qlora-optim-" in opt.stats()["backing"]
    opt.close()
    assert os.listdir(tmp_path) == []


def test_bf16_parameters_page_bitwise(tmp_path):
    def run(kind, **kw):
        g = torch.Generator().manual_seed(0)
        params = [(f"w{i}", torch.nn.Parameter(torch.randn(64, 96, generator=g).to(torch.bfloat16))) for i in range(3)]
        opt = build_optimizer(params, kind, lr=1e-2, **kw)
        for _ in range(3):
            for _, p in params:
                p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
            opt.step()
        return [p for _, p in params]

    for a, b in zip(run("adamw_8bit"), run("paged_adamw_8bit", memory_budget=13_000, offload_dir=str(tmp_path))):
        assert torch.equal(a, b)


def test_stats_have_the_same_keys_paged_or_not(tmp_path):
    _, resident = _train("paged_adamw", steps=1)
    _, paged = _train("paged_adamw", steps=1, memory_budget=200_000, offload_dir=str(tmp_path))
    assert resident.stats().keys() == paged.stats().keys()
    paged.close()
