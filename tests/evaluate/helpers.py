"""Models with known logits, so scores can be checked against a hand calculation."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class Bigram(nn.Module):
    """logits[t] = log P(. | token t): the next-token distribution depends on the current token only,
    so every log-likelihood is a sum of table entries, whatever the batching or padding."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.logp = nn.Parameter(probs.log(), requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=512)

    def forward(self, input_ids, logits_to_keep: int = 0, **_):
        logits = self.logp[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def random_bigram(vocab: int, seed: int = 0) -> Bigram:
    g = torch.Generator().manual_seed(seed)
    return Bigram(torch.softmax(torch.randn(vocab, vocab, generator=g, dtype=torch.float64), dim=-1).float())
