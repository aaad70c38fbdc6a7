"""Finetune against finetune on one held-out set, with a paired bootstrap confidence interval.

The paper's claim "QLoRA matches 16-bit LoRA" is a claim about a difference; this measures it.
Both systems are scored on the same examples, per example:
- `loss`: mean NLL of the answer tokens (tokenized exactly as training tokenizes them);
- `exact_match`: greedy answer to the prompt == the reference answer (whitespace-normalized).
The difference of means (A - B) gets a 95% interval from a paired bootstrap: resample examples
with replacement `rounds` times (seeded), keeping each example's two scores together.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

METRICS = ("loss", "exact_match")
HIGHER_IS_BETTER = {"loss": False, "exact_match": True}


def paired_bootstrap(a: list[float], b: list[float], rounds: int = 10_000, seed: int = 0) -> dict:
    """Mean of A, of B, of A - B, and the 2.5/97.5 percentiles of the resampled mean difference."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired bootstrap needs two equally long, non-empty score lists ({len(a)} vs {len(b)})")
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    n, gen = len(diff), torch.Generator().manual_seed(seed)
    means = torch.cat([diff[torch.randint(n, (min(1000, rounds - k), n), generator=gen)].mean(dim=1)
                       for k in range(0, rounds, 1000)])  # 1000 resamples at a time bounds memory
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return dict(n=n, mean_a=sum(a) / n, mean_b=sum(b) / n, diff=diff.mean().item(), ci95=[low, high],
                frac_a_above_b=(means > 0).double().mean().item(), rounds=rounds, seed=seed)


@torch.inference_mode()
def example_losses(model, examples: list[dict], pad_id: int, batch_size: int = 8, progress: bool = True) -> list[float]:
    """Mean NLL (nats/token) over each example's labelled tokens; `examples` from data.build_examples."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    out = [0.0] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    for k in tqdm(range(0, len(order), batch_size), desc="loss", unit="batch", disable=not progress):
        chunk = order[k : k + batch_size]
        width = max(len(examples[i]["input_ids"]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # right padding: positions of real tokens are unchanged
            n = len(examples[i]["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = (torch.tensor(examples[i]["input_ids"]),
                                                            torch.tensor(examples[i]["labels"]), 1)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        target = labels[:, 1:].to(device)
        nll = F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none") * (target >= 0)
        for row, i in enumerate(chunk):
            out[i] = (nll[row].sum() / (target[row] >= 0).sum().clamp(min=1)).item()
    return out


def normalize(text: str) -> str:
    return " ".join(text.split())


def example_exact_match(model, tokenizer, rows: list[dict], fmt: str, max_new_tokens: int = 64,
                        source: str = "data", progress: bool = True) -> tuple[list[float], list[str]]:
    """1.0 where the greedy answer equals the reference (after whitespace normalization), else 0.0."""
    from tqdm.auto import tqdm

    from ..data import prompt_and_reference
    from ..generate import GenerationSettings, generate

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    scores, answers = [], []
    for row in tqdm(rows, desc="exact match", unit="row", disable=not progress):
        prompt, reference = prompt_and_reference(row, fmt, tokenizer, source)
        answer = generate(model, tokenizer, prompt, settings)
        answers.append(answer)
        scores.append(float(normalize(answer) == normalize(reference)))
    return scores, answers


def score(model, tokenizer, rows: list[dict], fmt: str, metric: str, max_seq_len: int = 1024, max_new_tokens: int = 64,
          batch_size: int = 8, source: str = "data", progress: bool = True) -> list[float]:
    """Per-row scores of one system under `metric` (rows already validated for `fmt`)."""
    from ..data import build_examples
    from ..errors import QloraError
    from .scoring import pad_token_id

    if metric == "exact_match":
        return example_exact_match(model, tokenizer, rows, fmt, max_new_tokens, source, progress)[0]
    examples, _ = build_examples(rows, fmt, tokenizer, max_seq_len, max_seq_len, max_seq_len, source=source)
    if len(examples) != len(rows):
        raise QloraError(f"{source}: {len(rows) - len(examples)} rows have no answer to score; remove them")
    return example_losses(model, examples, pad_token_id(tokenizer), batch_size, progress)


def summarize(metric: str, scores_a: list[float], scores_b: list[float], rounds: int, seed: int) -> dict:
    """Bootstrap result, plus perplexity for the loss metric and which side is better."""
    result = dict(metric=metric, **paired_bootstrap(scores_a, scores_b, rounds, seed))
    if metric == "loss":  # per-example mean: exp of it is a per-example-averaged perplexity
        result.update(ppl_a=math.exp(result["mean_a"]), ppl_b=math.exp(result["mean_b"]))
    low, high = result["ci95"]
    above, below = ("A better", "B better") if HIGHER_IS_BETTER[metric] else ("B better", "A better")
    same = "no significant difference (the 95% interval contains 0)"
    result["verdict"] = above if low > 0 else below if high < 0 else same
    return result
