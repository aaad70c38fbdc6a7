"""Elo ratings from pairwise matches, as the QLoRA paper's tournament (section 5.1):

    E_a = 1 / (1 + 10^((R_b - R_a) / 400)),   R_a += K (S_a - E_a),   R_b += K ((1 - S_a) - (1 - E_a))

with S_a = 1 (a wins), 0.5 (tie), 0 (b wins); every model starts at 1000, K = 32. Elo depends on
the order of the matches, so the match list is replayed in many random orders (default 10,000,
seeded): the result is the mean rating and the 2.5/97.5 percentiles over orders. All orders are
played at once: one vectorised update per match position across the (orders, models) table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INITIAL, K, SCALE = 1000.0, 32.0, 400.0


@dataclass(frozen=True)
class Match:
    a: str
    b: str
    score_a: float  # 1 = a wins, 0.5 = tie, 0 = b wins


def elo_once(matches: list[Match], k: float = K, initial: float = INITIAL) -> dict[str, float]:
    """Ratings after playing `matches` in the given order (the hand-checkable definition)."""
    rating: dict[str, float] = {}
    for m in matches:
        ra, rb = rating.setdefault(m.a, initial), rating.setdefault(m.b, initial)
        ea = 1.0 / (1.0 + 10.0 ** ((rb - ra) / SCALE))
        rating[m.a] = ra + k * (m.score_a - ea)
        rating[m.b] = rb + k * ((1.0 - m.score_a) - (1.0 - ea))
    return rating


@dataclass
class EloResult:
    models: list[str]
    mean: dict[str, float]
    low: dict[str, float]  # 2.5th percentile over orders
    high: dict[str, float]  # 97.5th percentile over orders
    rounds: int
    matches: int

    def to_dict(self) -> dict:
        ranked = sorted(self.models, key=lambda m: -self.mean[m])
        return dict(rounds=self.rounds, matches=self.matches, k=K, initial=INITIAL,
                    ratings=[dict(model=m, elo=self.mean[m], ci95=[self.low[m], self.high[m]]) for m in ranked])


def random_orders(rounds: int, n: int, seed: int = 0) -> torch.Tensor:
    """(rounds, n): one seeded random permutation of the match indices per row."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(rounds, n, generator=gen, dtype=torch.float64).argsort(dim=1)


def elo_orders(matches: list[Match], orders: torch.Tensor, k: float = K,
               initial: float = INITIAL) -> tuple[list[str], torch.Tensor]:
    """-> (models, ratings (rounds, models)): `elo_once` for every row of `orders`, all rows at once."""
    if any(m.a == m.b for m in matches):
        raise ValueError("a model cannot play itself")
    models = sorted({m.a for m in matches} | {m.b for m in matches})
    index = {name: i for i, name in enumerate(models)}
    # numpy, not torch: thousands of tiny elementwise steps, where torch's thread pool only adds overhead
    order = orders.numpy().T  # (M, rounds): the match played at step j of each round
    a = np.array([index[m.a] for m in matches])[order]
    b = np.array([index[m.b] for m in matches])[order]
    s = np.array([m.score_a for m in matches], dtype=np.float64)[order]
    ratings = np.full((orders.shape[0], len(models)), initial, dtype=np.float64)
    rows = np.arange(orders.shape[0])
    for ia, ib, sa in zip(a, b, s):
        ra, rb = ratings[rows, ia], ratings[rows, ib]
        ea = 1.0 / (1.0 + 10.0 ** ((rb - ra) / SCALE))
        ratings[rows, ia] = ra + k * (sa - ea)
        ratings[rows, ib] = rb + k * ((1.0 - sa) - (1.0 - ea))
    return models, torch.from_numpy(ratings)


def elo_tournament(matches: list[Match], rounds: int = 10_000, seed: int = 0, k: float = K,
                   initial: float = INITIAL) -> EloResult:
    """Mean Elo and 95% interval over `rounds` random orders of `matches` (seeded, deterministic)."""
    if not matches:
        raise ValueError("no matches to rate")
    models, ratings = elo_orders(matches, random_orders(rounds, len(matches), seed), k, initial)
    q = torch.quantile(ratings, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
    mean = ratings.mean(dim=0)
    by_name = lambda t: {m: t[i].item() for i, m in enumerate(models)}  # noqa: E731
    return EloResult(models, by_name(mean), by_name(q[0]), by_name(q[1]), rounds, len(matches))


def win_table(matches: list[Match]) -> dict[str, dict[str, list[int]]]:
    """model -> opponent -> [wins, ties, losses], counted from `model`'s side."""
    table: dict[str, dict[str, list[int]]] = {}
    for m in matches:
        for me, other, score in ((m.a, m.b, m.score_a), (m.b, m.a, 1.0 - m.score_a)):
            cell = table.setdefault(me, {}).setdefault(other, [0, 0, 0])
            cell[0 if score == 1.0 else 1 if score == 0.5 else 2] += 1
    return table
