"""Training objectives (torch only): the SFT loss, and the preference losses DPO and ORPO over
per-sequence log-probabilities of a chosen and a rejected answer.

A preference micro-batch holds P pairs as 2P rows: chosen answers first, rejected after
(qlora.data.preference.collate_pairs); every function here returns per-pair tensors (P,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data.packing import model_inputs
from .nn.lora import reference as reference_policy
from .nn.loss import linear_cross_entropy

# what preference_loss sums over a batch's pairs (metrics.jsonl logs each divided by "pairs")
PREFERENCE_METRICS = ("reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected", "pairs")


def loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count.

    The head runs only on positions that have a target: prompt and padding positions never get
    logits, and the fp32 upcast covers (targets × vocab), not (batch × length × vocab)."""
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    inputs = model_inputs(batch, model.get_input_embeddings().weight.dtype)  # packed: block-diagonal mask
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1][mask]  # (N, H)
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)  # cap: Gemma
    if type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
        # frozen plain head: chunked, logits never whole, dL/dh formed in forward (nn/loss.py)
        return linear_cross_entropy(hidden, head.weight, labels[mask], cap), int(mask.sum())
    logits = head(hidden).float()  # (N, V)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, labels[mask], reduction="sum"), int(mask.sum())


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's target tokens, their count), both (B,).

    As loss_sum, the head runs on target positions only; the per-row sums are formed with index_add."""
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, :-1][mask]).float()  # (N, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    token_logps = -F.cross_entropy(logits, labels[mask], reduction="none")  # (N,)
    rows = mask.nonzero()[:, 0]  # the batch row of each target position
    sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps), mask.sum(1)


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) halves of a (2P,) tensor laid out chosen-first."""
    n = values.shape[0] // 2
    return values[:n], values[n:]


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO, sigmoid loss (Rafailov et al. 2023, eq. 7): -log σ(β[(π_c - ref_c) - (π_r - ref_r)]) per pair,
    from summed sequence log-probabilities. -> (losses, chosen rewards, rejected rewards), each (P,);
    a reward is β(π - ref), the implicit reward of section 5."""
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards.detach(), rejected_rewards.detach()


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, n_chosen: torch.Tensor, n_rejected: torch.Tensor,
              lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, eqs. 4-7): L_SFT + λ·L_OR per pair, on length-normalised log-probabilities
    a = logp/n: L_SFT = -a_c, L_OR = -log σ(log odds_c - log odds_r), log odds = a - log(1 - e^a).
    -> (losses, chosen rewards λ·a_c, rejected rewards λ·a_r), each (P,)."""
    a_c, a_r = chosen / n_chosen, rejected / n_rejected
    log_odds = (a_c - a_r) - (torch.log1p(-torch.exp(a_c)) - torch.log1p(-torch.exp(a_r)))
    return -a_c - lam * F.logsigmoid(log_odds), lam * a_c.detach(), lam * a_r.detach()


def preference_loss(model, batch: dict, objective: str, beta: float) -> tuple[torch.Tensor, dict]:
    """(loss summed over the batch's P pairs, metric sums): DPO against the reference policy = this
    model with LoRA disabled (the frozen 4-bit base), or with a given adapter's frozen factors swapped
    in (nn.lora.reference; no second copy of the base either way; forward only, nothing kept for
    backward), or ORPO, which needs no reference. Metric sums: reward margin and accuracy, chosen and
    rejected log-probabilities, pairs."""
    logps, counts = sequence_logps(model, batch)
    chosen, rejected = split_pairs(logps)
    if objective == "dpo":
        with torch.no_grad(), reference_policy(model):
            reference, _ = sequence_logps(model, batch)
        losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, *split_pairs(reference), beta)
    else:
        losses, r_chosen, r_rejected = orpo_loss(chosen, rejected, *split_pairs(counts.to(logps.dtype)), beta)
    values = ((r_chosen - r_rejected).sum(), (r_chosen > r_rejected).sum(), chosen.detach().sum(),
              rejected.detach().sum(), len(chosen))
    return losses.sum(), dict(zip(PREFERENCE_METRICS, map(float, values)))
