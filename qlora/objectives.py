"""Training objectives (torch only): the SFT loss, and the preference losses DPO and ORPO over
per-sequence log-probabilities of a chosen and a rejected answer.

A preference micro-batch holds P pairs as 2P rows: chosen answers first, rejected after
(qlora.data.preference.collate_pairs); every function here returns per-pair tensors (P,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .nn.loss import linear_cross_entropy


def loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count.

    The head runs only on positions that have a target: prompt and padding positions never get
    logits, and the fp32 upcast covers (targets × vocab), not (batch × length × vocab)."""
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state
    hidden = hidden[:, :-1][mask]  # (N, H)
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)  # cap: Gemma
    if type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
        # frozen plain head: chunked, logits never whole, dL/dh formed in forward (nn/loss.py)
        return linear_cross_entropy(hidden, head.weight, labels[mask], cap), int(mask.sum())
    logits = head(hidden).float()  # (N, V)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, labels[mask], reduction="sum"), int(mask.sum())
