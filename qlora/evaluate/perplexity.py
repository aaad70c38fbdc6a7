"""Perplexity of a causal LM on a token stream: exp of the token-weighted mean negative log-likelihood.

The text is tokenized once, as one string (no BOS; the way the bitsandbytes reference figures in
../shared/data/README.md were measured), then cut into windows of `window` tokens that start every
`stride` tokens (the transformers perplexity recipe). Each window predicts only the tokens the
previous window did not: with stride == window (the default) the windows do not overlap and each
predicts window - 1 tokens (its first token has no context); with stride < window every token after
the first window is predicted with at least window - stride tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import QloraError


_DATASET_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".pq")


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # tokens predicted (the loss is averaged over these)
    windows: int
    window: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def read_text(path: str, column: str | None = None) -> str:
    """A plain text file read whole, or one string column of a dataset file joined with blank lines."""
    p = Path(path)
    if column is None and not p.is_dir() and p.suffix.lower() not in _DATASET_SUFFIXES:
        try:
            return p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise QloraError(f"{path}: no such file") from None
        except UnicodeDecodeError as e:
            raise QloraError(f"{path}: not UTF-8 text (byte {e.start}); re-encode it as UTF-8") from None
    from ..data.load import load_rows, where

    rows = load_rows(path)
    column = column or "text"
    for i, row in enumerate(rows):
        if not isinstance(row.get(column), str):
            raise QloraError(f"{where(rows, i, path)}: no string column '{column}'; pick one with --column")
    return "\n\n".join(row[column] for row in rows)


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """The whole text as one 1-D id tensor, without special tokens, cut to `max_tokens`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise QloraError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    return torch.tensor(ids, dtype=torch.long)


def spans(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first predicted position) of each window over n tokens."""
    if window < 2 or not 1 <= stride <= window:
        raise QloraError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    out, predicted_to = [], 1  # position 0 is never predicted
    for begin in range(0, n - 1, stride):
        end = min(begin + window, n)
        if end <= predicted_to:
            break
        out.append((begin, end, max(predicted_to, begin + 1)))
        predicted_to = end
        if end == n:
            break
    return out


def window_nll(model, ids: torch.Tensor, first: int) -> torch.Tensor:
    """Summed NLL (fp32) of ids[:, first:] given everything before, for a batch (B, T) of windows."""
    logits = model(input_ids=ids).logits[:, first - 1 : -1]  # (B, T - first, V)
    logp = F.log_softmax(logits.float(), dim=-1)
    target = ids[:, first:].unsqueeze(-1)
    return -logp.gather(-1, target).squeeze(-1).sum(dim=-1)  # (B,)


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, window: int = 1024, stride: int | None = None, batch_size: int = 1,
               progress: bool = True) -> Perplexity:
    """Token-weighted perplexity of `model` over the 1-D token tensor `ids` (see module doc)."""
    from tqdm.auto import tqdm

    stride = stride or window
    device = _device(model)
    todo = spans(len(ids), window, stride)
    # windows of the same shape (length, offset of first prediction) run in one batch
    groups: dict[tuple[int, int], list[int]] = {}
    for begin, end, first in todo:
        groups.setdefault((end - begin, first - begin), []).append(begin)
    total, count = 0.0, 0
    bar = tqdm(total=len(todo), desc="perplexity", unit="win", disable=not progress)
    for (length, offset), begins in groups.items():
        for k in range(0, len(begins), batch_size):
            batch = torch.stack([ids[b : b + length] for b in begins[k : k + batch_size]]).to(device)
            total += window_nll(model, batch, offset).double().sum().item()
            count += batch.shape[0] * (length - offset)
            bar.update(batch.shape[0])
    bar.close()
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, len(todo), window, stride)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
