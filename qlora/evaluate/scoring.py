"""Log-likelihood scoring, the primitive under multiple choice, MMLU, the local judge and `compare`.

    log P(continuation | context) = sum_t log softmax(logits_{t-1})[continuation_t]

Pairs are encoded as lm-evaluation-harness encodes them: trailing spaces of the context move to
the continuation, the continuation's tokens are those of tokenize(context + continuation) past
the context's own tokens, no special tokens (an empty context gets the BOS/EOS token). Requests
run longest first in left-padded batches with explicit position ids, so padding changes nothing
but rounding, and only the logits of the scored positions are computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Score:
    logprob: float  # summed log-probability of the continuation tokens, nats
    greedy: bool  # every continuation token is the argmax at its position
    tokens: int  # continuation length in tokens


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    if not ctx:
        return [start_id(tokenizer)], whole
    return whole[: len(ctx)], whole[len(ctx) :]


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def max_length(model) -> int:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048


@torch.inference_mode()
def forward_last(model, seqs: list[list[int]], keep: int, pad_id: int) -> torch.Tensor:
    """Logits (B, keep, V) at the last `keep` positions of each sequence, left-padded to one batch."""
    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                logits_to_keep=keep)
    return out.logits[:, -keep:].float()


def loglikelihood(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8,
                  progress: bool = True, desc: str = "scoring") -> list[Score]:
    """Score every (context, continuation) pair; results in input order."""
    encoded = [encode_pair(tokenizer, c, x) for c, x in pairs]
    return loglikelihood_ids(model, encoded, pad_token_id(tokenizer), batch_size, progress, desc)


def loglikelihood_ids(model, encoded: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8,
                      progress: bool = True, desc: str = "scoring") -> list[Score]:
    """As `loglikelihood`, for pairs already tokenized; contexts are cut from the left to fit."""
    from tqdm.auto import tqdm

    limit = max_length(model)
    seqs = []
    for ctx, cont in encoded:
        if not cont:
            raise ValueError("an empty continuation has no likelihood to score")
        seqs.append(((ctx + cont)[-(limit + 1) :][:-1], cont))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    scores: list[Score | None] = [None] * len(seqs)
    with tqdm(total=len(seqs), desc=desc, unit="req", disable=not progress) as bar:
        for k in range(0, len(order), batch_size):
            chunk = order[k : k + batch_size]
            keep = max(len(seqs[i][1]) for i in chunk)
            logits = forward_last(model, [seqs[i][0] for i in chunk], keep, pad_id)
            for row, i in enumerate(chunk):
                cont = seqs[i][1]
                logp = F.log_softmax(logits[row, keep - len(cont) :], dim=-1)  # (len(cont), V)
                target = torch.tensor(cont, device=logp.device)
                picked = logp.gather(-1, target[:, None]).squeeze(-1)
                greedy = bool((logp.argmax(-1) == target).all())
                scores[i] = Score(picked.double().sum().item(), greedy, len(cont))
            bar.update(len(chunk))
    return scores  # type: ignore[return-value]


def next_token_logprobs(model, seqs: list[list[int]], candidates: list[int], pad_id: int, batch_size: int = 8,
                        progress: bool = True, desc: str = "scoring") -> torch.Tensor:
    """(N, len(candidates)) log-probabilities of each candidate token right after each token
    sequence (log-softmax over the whole vocabulary, then the candidate columns)."""
    from tqdm.auto import tqdm

    limit = max_length(model)
    seqs = [s[-limit:] for s in seqs]
    out = torch.empty(len(seqs), len(candidates), dtype=torch.float32)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    cols = torch.tensor(candidates)
    with tqdm(total=len(seqs), desc=desc, unit="prompt", disable=not progress) as bar:
        for k in range(0, len(order), batch_size):
            chunk = order[k : k + batch_size]
            logits = forward_last(model, [seqs[i] for i in chunk], 1, pad_id)[:, -1]  # (B, V)
            out[torch.tensor(chunk)] = F.log_softmax(logits, dim=-1)[:, cols.to(logits.device)].cpu()
            bar.update(len(chunk))
    return out


def start_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def pad_token_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return tid
    return 0
