"""Stochastic rounding of fp32 results into bf16 parameters (qlora/optim/rounding.py)."""

import torch

from qlora.optim.rounding import seed_for, stochastic_round_


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values on either side of each fp32 value, toward and away from zero."""
    toward = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)
    ulp = (toward.view(torch.int32) + 0x10000).view(torch.float32)
    return toward, ulp


def _round(x: torch.Tensor, seed: int) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    stochastic_round_(out, x, seed)
    return out


def test_representable_values_and_special_values_are_kept():
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, float("inf"), -float("inf"), 2.0**-130])
    x = x.bfloat16().float()  # exactly representable
    for seed in range(20):
        y = _round(x, seed).float()
        assert torch.equal(y, x) and torch.equal(torch.signbit(y), torch.signbit(x))
    assert _round(torch.tensor([float("nan")]), 0).isnan().all()


def test_result_is_one_of_the_two_neighbours_and_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 10.0 ** torch.randint(-6, 3, (4096,), generator=g)
    toward, away = _neighbours(x)
    runs = torch.stack([_round(x, seed).float() for seed in range(400)])
    assert ((runs == toward) | (runs == away)).all()
    # P(away) = the fraction of an ulp that x lies past `toward`; 400 draws: std <= 0.025
    p = (x - toward) / (away - toward)
    frac_away = (runs == away).float().mean(0)
    assert (frac_away - p).abs().max() < 0.1
    assert (frac_away - p).abs().mean() < 0.02


def test_seeded_reproducible_and_different_seeds_differ():
    x = torch.randn(10_000) + 1e-3
    assert torch.equal(_round(x, seed_for(3, 7)), _round(x, seed_for(3, 7)))
    assert not torch.equal(_round(x, seed_for(3, 7)), _round(x, seed_for(3, 8)))
    assert not torch.equal(_round(x, seed_for(3, 7)), _round(x, seed_for(4, 7)))
    state = torch.get_rng_state()
    _round(x, 0)
    assert torch.equal(torch.get_rng_state(), state)  # torch's global RNG is not touched


def test_updates_under_half_an_ulp_accumulate_in_expectation():
    """What round-to-nearest loses: 1000 steps of +1e-3 on a weight of 1.0 (bf16 ulp there: 2^-7,
    so each step is 0.13 ulp). To nearest, the weight never moves; stochastically it follows the
    fp32 sum, 2.0, within a few ulps."""
    nearest = stochastic = torch.ones(256, dtype=torch.bfloat16)
    for step in range(1000):
        nearest = (nearest.float() + 1e-3).bfloat16()
        out = torch.empty_like(stochastic)
        stochastic_round_(out, stochastic.float() + 1e-3, seed_for(0, step))
        stochastic = out
    assert torch.equal(nearest, torch.ones(256, dtype=torch.bfloat16))
    assert (stochastic.float().mean() - 2.0).abs() < 0.02
    assert (stochastic.float() - 2.0).abs().max() < 0.25
