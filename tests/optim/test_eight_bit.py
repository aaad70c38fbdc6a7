"""8-bit blockwise state: layout rules, and parity with bitsandbytes.optim.AdamW8bit on CPU."""

import pytest
import torch

from qlora.optim import build_optimizer
from qlora.optim.state import BLOCKSIZE, MIN_8BIT_NUMEL, StateLayout

# ragged last block, exactly the 8-bit minimum, a LoRA-like matrix, and one kept in fp32
SHAPES = [(300, 200), (MIN_8BIT_NUMEL,), (64, 576), (100,)]
KEYS = {"exp_avg.codes": "state1", "exp_avg.absmax": "absmax1",
        "exp_avg_sq.codes": "state2", "exp_avg_sq.absmax": "absmax2"}


def test_layout_follows_bitsandbytes_rules():
    big = StateLayout.build("w", (300, 200), want_8bit=True)
    assert big.eight_bit
    shapes = {f.key: (f.dtype, f.shape) for f in big.fields}
    assert shapes["exp_avg.codes"] == (torch.uint8, (300, 200))
    assert shapes["exp_avg_sq.absmax"] == (torch.float32, (-(-60000 // BLOCKSIZE),))  # 235 blocks
    assert not StateLayout.build("b", (MIN_8BIT_NUMEL - 1,), want_8bit=True).eight_bit
    assert StateLayout.build("b", (MIN_8BIT_NUMEL,), want_8bit=True).eight_bit
    # codes 60000 B -> 60032 with 64-byte alignment, absmax 235 * 4 = 940 B -> 960; two moments
    assert big.nbytes == 2 * (60032 + 960)
    assert StateLayout.build("w", (300, 200), want_8bit=False).nbytes == 8 * 60000


def _pair(weight_decay):
    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    ref_opt = bnb.optim.AdamW8bit(ref, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    opt = build_optimizer([(f"p{i}", p) for i, p in enumerate(ours)], "adamw_8bit", lr=1e-3,
                          weight_decay=weight_decay)
    return ref, ours, ref_opt, opt


def _same_grads(ref, ours, gen):
    for a, b in zip(ref, ours):
        # column scales spread the magnitudes across blocks, as real gradients do
        g = torch.randn(a.shape, generator=gen) * (1 + torch.rand(a.shape[-1:], generator=gen) * 3)
        a.grad, b.grad = g.clone(), g.clone()


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_one_step_from_fresh_state_is_byte_identical_to_bitsandbytes(weight_decay):
    ref, ours, ref_opt, opt = _pair(weight_decay)
    _same_grads(ref, ours, torch.Generator().manual_seed(1))
    ref_opt.step()
    opt.step()
    st = opt.state_tensors()
    for i, p in enumerate(ref):
        if p.numel() < MIN_8BIT_NUMEL:  # fp32 state; bnb's 32-bit formula rounds differently
            assert torch.equal(st[f"p{i}.exp_avg"], ref_opt.state[p]["state1"])
            torch.testing.assert_close(ours[i], p, rtol=0, atol=1e-8)
            continue
        for ours_key, bnb_key in KEYS.items():
            assert torch.equal(st[f"p{i}.{ours_key}"], ref_opt.state[p][bnb_key]), (i, ours_key)
        assert torch.equal(ours[i], p)


def test_one_step_from_a_bitsandbytes_mid_run_state():
    # The state bytes agree except exp_avg's absmax, which can differ by an ulp: torch's AdamW (our
    # maths) updates m with lerp, bitsandbytes with b1*m + (1-b1)*g. Codes are identical.
    ref, ours, ref_opt, opt = _pair(0.0)
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        _same_grads(ref, ours, gen)
        ref_opt.step()
    meta = opt.meta()
    meta["step"] = 10
    tensors = {}
    for i, (a, b) in enumerate(zip(ref, ours)):
        b.data.copy_(a.data)
        meta["params"][f"p{i}"]["step"] = 10
        if a.numel() < MIN_8BIT_NUMEL:
            st = ref_opt.state[a]
            tensors.update({f"p{i}.exp_avg": st["state1"], f"p{i}.exp_avg_sq": st["state2"]})
        else:
            tensors.update({f"p{i}.{k}": ref_opt.state[a][v] for k, v in KEYS.items()})
    opt.load_state(tensors, meta)
    _same_grads(ref, ours, gen)
    ref_opt.step()
    opt.step()
    st = opt.state_tensors()
    for i, p in enumerate(ref[:3]):
        for k in ("exp_avg.codes", "exp_avg_sq.codes", "exp_avg_sq.absmax"):
            assert torch.equal(st[f"p{i}.{k}"], ref_opt.state[p][KEYS[k]]), (i, k)
        ulps = (st[f"p{i}.exp_avg.absmax"].view(torch.int32) - ref_opt.state[p]["absmax1"].view(torch.int32)).abs()
        assert int(ulps.max()) <= 1
        torch.testing.assert_close(ours[i], p, rtol=2.5e-7, atol=1e-9)  # 2 ulps, or 1e-6 of a step


def test_trajectory_over_100_steps_stays_within_tolerance_of_bitsandbytes():
    """Tolerance: |ours - bnb| <= lr/2 elementwise, and <= 1e-3 of the distance travelled (L2)."""
    ref, ours, ref_opt, opt = _pair(0.01)
    start = [p.detach().clone() for p in ref]
    gen = torch.Generator().manual_seed(3)
    for _ in range(100):
        _same_grads(ref, ours, gen)
        ref_opt.step()
        opt.step()
    for a, b, p0 in zip(ref, ours, start):
        a, b = a.detach(), b.detach()
        diff = (a - b).abs()
        assert float(diff.max()) <= 0.5e-3
        assert float(diff.norm() / (a - p0).norm()) <= 1e-3
    st = opt.state_tensors()
    for i, p in enumerate(ref[:3]):  # the quantized states still agree almost everywhere
        same = (st[f"p{i}.exp_avg_sq.codes"] == ref_opt.state[p]["state2"]).float().mean()
        assert float(same) > 0.99


def test_nan_gradient_names_the_parameter():
    p = torch.nn.Parameter(torch.randn(64, 96))
    opt = build_optimizer([("lora_A.weight", p)], "adamw_8bit", lr=1e-3)
    p.grad = torch.randn(64, 96)
    p.grad[3, 5] = float("nan")
    with pytest.raises(FloatingPointError, match="'lora_A.weight' \\(NaN/Inf gradient\\?\\)"):
        opt.step()
