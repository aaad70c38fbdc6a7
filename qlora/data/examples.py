"""Rows -> tokenized training examples with target-only labels, counted truncation, validation split.

An example is {"input_ids": [...], "labels": [...], "row": i}: labels equal input_ids on target
tokens and are -100 on prompt tokens (unless train_on_source), `row` is the source row index.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..errors import QloraError
from .chat import resolve_chat_format
from .formats import FORMATS, describe, detect_format, render, render_all, validate_rows
from .load import load_rows, where

IGNORE_INDEX = -100  # label value PyTorch's cross-entropy skips


@dataclass
class DataStats:
    """What happened to the rows on their way to examples (the trainer prints `summary()`)."""

    rows: int = 0
    examples: int = 0
    empty: int = 0
    """Rows without a non-empty answer; skipped."""
    dropped: int = 0
    """Rows whose answer was truncated away entirely; skipped."""
    truncated: int = 0
    """Kept examples that lost tokens to any limit."""
    truncated_source: int = 0
    truncated_target: int = 0
    truncated_total: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def summary(self) -> str:
        text = f"{self.examples} examples from {self.rows} rows, {self.tokens} tokens ({self.target_tokens} trained on)"
        if self.truncated:
            text += (f"; {self.truncated} truncated (prompt {self.truncated_source}, answer {self.truncated_target},"
                     f" max_seq_len {self.truncated_total})")
        if self.dropped or self.empty:
            text += f"; skipped {self.dropped} truncated away, {self.empty} with an empty answer"
        return text


def read_dataset(path: str, fmt: str = "auto") -> tuple[list[dict], str]:
    """Load rows, detect the format when `fmt` is 'auto', and validate every row for it."""
    rows = load_rows(path)
    if fmt == "auto":
        fmt = detect_format(rows, path)
        print(f"{path}: detected the {describe(fmt)} format (set data_format to override)", file=sys.stderr)
    validate_rows(rows, fmt, path)
    return rows, fmt


def build_examples(rows: list[dict], fmt: str, tokenizer, max_source_len: int, max_target_len: int,
                   max_seq_len: int, train_on_source: bool = False, source: str = "data",
                   chat_format: str = "auto") -> tuple[list[dict], DataStats]:
    """Tokenize rows; prompt pieces are cut from the left to max_source_len, each answer (+EOS) from the
    right to max_target_len, then the whole example from the right to max_seq_len.

    In the text format the whole text is the answer and only max_seq_len applies. A row whose
    answer is gone after truncation is dropped and counted; if nothing is left, that is an error.
    """
    validate_rows(rows, fmt, source)
    chat_format = resolve_chat_format(chat_format, tokenizer)
    prefix = _prefix(fmt, chat_format, tokenizer)
    eos = _eos_id(tokenizer, source)
    target_len = max_seq_len if fmt == "text" else max_target_len
    stats, examples = DataStats(rows=len(rows)), []
    for i, row in enumerate(rows):
        for segments in render_all(row, fmt, tokenizer, lambda: where(rows, i, source), chat_format):
            example = _example(tokenizer, segments, prefix, eos, (max_source_len, target_len, max_seq_len),
                               train_on_source, stats)
            if example is not None:
                examples.append(dict(example, row=i))
    stats.examples = len(examples)
    if not examples:
        if not stats.dropped:
            raise QloraError(f"{source}: all {len(rows)} rows have an empty answer; nothing to train on")
        raise QloraError(f"{source}: all {len(rows)} rows were truncated away; raise max_target_len/max_seq_len "
                         f"(now {max_target_len}/{max_seq_len}) or lower max_source_len ({max_source_len})")
    return examples, stats


def _example(tokenizer, segments, prefix, eos, limits, train_on_source: bool, stats: DataStats) -> dict | None:
    """One tokenized example with its labels, or None (counted in stats) when it has no answer left."""
    if not any(is_target for _, is_target in segments):
        stats.empty += 1
        return None
    pieces = _tokenize(tokenizer, segments, prefix, eos)
    ids, is_target, cut = _truncate(pieces, len(prefix), *limits)
    if not any(is_target):
        stats.dropped += 1
        return None
    for key, was_cut in cut.items():
        setattr(stats, f"truncated_{key}", getattr(stats, f"truncated_{key}") + was_cut)
    stats.truncated += any(cut.values())
    stats.tokens += len(ids)
    stats.target_tokens += sum(is_target)
    labels = ids if train_on_source else [t if m else IGNORE_INDEX for t, m in zip(ids, is_target)]
    return {"input_ids": ids, "labels": list(labels)}


def _tokenize(tokenizer, segments, prefix: list[int], eos: int) -> list[tuple[list[int], bool]]:
    """(token ids, is_target) per segment; BOS-like prefix glued to the first prompt piece, EOS closing each answer."""
    if not segments:
        return [(list(prefix), False)] if prefix else []
    ids = tokenizer([text for text, _ in segments], add_special_tokens=False, verbose=False)["input_ids"]
    pieces = [(list(p), t) for p, t in zip(ids, (t for _, t in segments))]
    if prefix and pieces[0][1]:
        pieces.insert(0, ([], False))  # text format: the BOS prefix gets a prompt piece of its own
    if prefix:
        pieces[0] = (prefix + pieces[0][0], False)
    return [(p + [eos] if t and (not p or p[-1] != eos) else p, t) for p, t in pieces]


def _truncate(pieces, n_prefix: int, max_source: int, max_target: int, max_seq: int):
    ids: list[int] = []
    mask: list[bool] = []
    cut = {"source": False, "target": False, "total": False}
    for k, (p, is_target) in enumerate(pieces):
        if is_target and len(p) > max_target:
            p, cut["target"] = p[:max_target], True
        elif not is_target and len(p) > max_source:
            keep = n_prefix if k == 0 else 0  # never cut the BOS prefix off the front
            p, cut["source"] = p[:keep] + p[len(p) - (max_source - keep):], True
        ids += p
        mask += [is_target] * len(p)
    if len(ids) > max_seq:
        ids, mask, cut["total"] = ids[:max_seq], mask[:max_seq], True
    return ids, mask, cut


def _prefix(fmt: str, chat_format: str, tokenizer) -> list[int]:
    # the tokenizer's chat template writes its own BOS; named templates and the other formats do not
    return [] if fmt == "chat" and chat_format == "tokenizer" else _special_prefix(tokenizer)


def _special_prefix(tokenizer) -> list[int]:
    """Tokens the tokenizer puts in front of any text by itself (Llama's BOS; nothing for ChatML models)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return list(full[:k])
    return []


def _eos_id(tokenizer, source: str) -> int:
    if tokenizer.eos_token_id is None:
        raise QloraError(f"{source}: the tokenizer has no EOS token, so answers cannot be terminated; "
                         "use a tokenizer that defines eos_token")
    return int(tokenizer.eos_token_id)


def prompt_and_reference(row: dict, fmt: str, tokenizer, source: str = "data",
                         chat_format: str = "auto") -> tuple[list[int], str]:
    """Prompt token ids for the row's last answer (exactly as training renders them) and that answer's text.

    For scoring generations, e.g. the demo task's held-out exact match.
    """
    if fmt not in FORMATS or fmt == "text":
        raise QloraError(f"{source}: format {fmt!r} has no prompt/answer split to evaluate")
    chat_format = resolve_chat_format(chat_format, tokenizer)
    segments = render(row, fmt, tokenizer, lambda: source, chat_format)
    last = max((i for i, (_, is_target) in enumerate(segments) if is_target), default=None)
    if last is None:
        raise QloraError(f"{source}: the row has no non-empty answer to evaluate")
    prompt = [t for ids, _ in _tokenize(tokenizer, segments[:last], [], _eos_id(tokenizer, source)) for t in ids]
    prefix = _prefix(fmt, chat_format, tokenizer)
    if fmt == "chat":  # the reference is the raw message, not its rendering with end-of-turn tokens
        reference = [m for m in row["messages"] if m["role"] == "assistant" and m["content"].strip()][-1]["content"]
    else:
        reference = segments[last][0]
    return prefix + prompt, reference.strip()


def split_train_val(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Hold out round(n * val_fraction) examples (at least 1 when the fraction is > 0 and n > 1),
    chosen by a seeded permutation; both parts keep the original order."""
    n = len(examples)
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    g = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(n, generator=g)[:n_val].tolist())
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    return train, val
