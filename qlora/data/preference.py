"""Preference rows -> tokenized (chosen, rejected) pairs for DPO and ORPO.

Row shapes (one per row, mixed files allowed):

- `prompt`, `chosen`, `rejected` strings: the prompt is tokenized as in the completion format;
- `prompt` a list of chat messages, `chosen` / `rejected` strings or lists of assistant messages:
  rendered with the tokenizer's chat template, as in the chat format;
- `chosen`, `rejected` without a prompt (HH-RLHF): two strings of "\\n\\nHuman: ... \\n\\nAssistant: ..."
  turns, or two message lists; the shared prompt (up to the last "\\n\\nAssistant:" / the last message
  both share) is split off, and what follows is the answer.

A pair example is {"chosen": {input_ids, labels}, "rejected": {...}, "row": i, "targets": 1}: only
the final answer is learned, and a pair counts once in the loss (DPO and ORPO are means over pairs).
"""

from __future__ import annotations

import dataclasses

from ..errors import QloraError
from .batching import collate
from .examples import IGNORE_INDEX, DataStats, _eos_id, _special_prefix, _tokenize, _truncate
from .chat import merge as _merge
from .formats import render
from .load import load_rows, type_name, where
from .examples import split_train_val
from .sources import digest, parse_sources

HH_ASSISTANT = "\n\nAssistant:"


def read_pairs(path: str) -> list[dict]:
    """Load a preference file and check every row's shape (FILE:LINE errors)."""
    rows = load_rows(path)
    validate_pairs(rows, path)
    return rows


def read_sources(data, given: list[dict] | None = None) -> list:
    """[(source, rows, "preference")] for one preference file (or rows given in memory), validated."""
    sources = parse_sources(data)
    if len(sources) != 1 or sources[0].weight is not None or sources[0].count is not None:
        raise QloraError(f"data: preference objectives read one file, got {data!r}")
    rows = read_pairs(sources[0].path) if given is None else given
    validate_pairs(rows, sources[0].path)
    return [(sources[0], rows, "preference")]


def build_sets(sources: list, tokenizer, cfg) -> tuple[list[dict], list[dict], dict]:
    """(train pairs, validation pairs, stats) as data.build_mixture gives them for SFT examples."""
    (src, rows, fmt), = sources
    pairs, stats = build_pairs(rows, tokenizer, cfg.max_source_len, cfg.max_target_len, cfg.max_seq_len, src.path)
    train, val = split_train_val(pairs, cfg.val_fraction, cfg.seed)
    if not train:
        raise QloraError(f"{src.path}: no training pairs left after the validation split")
    print(f"data: {src.path} ({fmt}): {stats.summary()}")
    sides = [p[side] for side in ("chosen", "rejected") for p in train]
    return train, val, dict(dataclasses.asdict(stats), source=src.path, format=fmt, digest=digest(sides))


def validate_pairs(rows: list, source: str) -> None:
    if not rows:
        raise QloraError(f"{source}: no rows")
    for i, row in enumerate(rows):
        split(row, lambda i=i: where(rows, i, source))


def split(row, loc) -> tuple[object, object, object]:
    """(prompt, chosen, rejected): strings, or a message list and two assistant-message lists."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        got = sorted(row) if isinstance(row, dict) else type_name(row)
        raise QloraError(f"{loc()}: a preference row needs 'chosen' and 'rejected' (and 'prompt' unless they are "
                         f"HH-RLHF dialogues sharing their prompt); got {got}")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" not in row:
        return _shared_prompt(chosen, rejected, loc)
    prompt = row["prompt"]
    if isinstance(prompt, str):
        for key in ("chosen", "rejected"):
            if not isinstance(row[key], str):
                raise QloraError(f"{loc()}: '{key}' must be a string when 'prompt' is, got {type_name(row[key])}")
        return prompt, chosen, rejected
    _check_messages(prompt, "prompt", loc)
    answers = [[{"role": "assistant", "content": a}] if isinstance(a, str) else a for a in (chosen, rejected)]
    for key, a in zip(("chosen", "rejected"), answers):
        _check_messages(a, key, loc)
    return prompt, answers[0], answers[1]


def _check_messages(messages, key: str, loc) -> None:
    if not isinstance(messages, list) or not messages:
        raise QloraError(f"{loc()}: '{key}' must be a string or a non-empty list of messages, "
                         f"got {type_name(messages)}")
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise QloraError(f"{loc()}: {key}[{j}] must be an object with string role and content, got {type_name(m)}")
    if key != "prompt" and messages[-1]["role"] != "assistant":
        raise QloraError(f"{loc()}: '{key}' must end with an assistant message, got role {messages[-1]['role']!r}")


def _shared_prompt(chosen, rejected, loc):
    if isinstance(chosen, str) and isinstance(rejected, str):
        common = next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        cut = chosen.rfind(HH_ASSISTANT, 0, common)  # the last marker inside the shared prefix
        if cut < 0:
            raise QloraError(f"{loc()}: 'chosen' and 'rejected' share no prompt ending in {HH_ASSISTANT.strip()!r}; "
                             "give the prompt as 'prompt'")
        cut += len(HH_ASSISTANT)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    _check_messages(chosen, "chosen", loc)
    _check_messages(rejected, "rejected", loc)
    n = next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    if n == 0 or n == len(chosen) or n == len(rejected):
        raise QloraError(f"{loc()}: 'chosen' and 'rejected' must share their first message(s) and then differ; "
                         "give the prompt as 'prompt'")
    return chosen[:n], chosen[n:], rejected[n:]


def build_pairs(rows: list[dict], tokenizer, max_source_len: int, max_target_len: int, max_seq_len: int,
                source: str = "data") -> tuple[list[dict], DataStats]:
    """Tokenize preference rows (truncation as build_examples: prompt from the left, answers from the
    right, then max_seq_len); a pair whose chosen or rejected answer is empty or cut away is skipped."""
    eos = _eos_id(tokenizer, source)
    stats, pairs = DataStats(rows=len(rows)), []
    for i, row in enumerate(rows):
        loc = lambda i=i: where(rows, i, source)  # noqa: E731
        prompt, *answers = split(row, loc)
        sides = [_side(prompt, a, tokenizer, eos, loc, (max_source_len, max_target_len, max_seq_len)) for a in answers]
        if any(s is None for s in sides):
            stats.empty += 1
            continue
        if any(not any(t != IGNORE_INDEX for t in s[0]["labels"]) for s in sides):
            stats.dropped += 1
            continue
        stats.truncated += any(s[1] for s in sides)
        stats.tokens += sum(len(s[0]["input_ids"]) for s in sides)
        stats.target_tokens += sum(sum(t != IGNORE_INDEX for t in s[0]["labels"]) for s in sides)
        pairs.append({"chosen": sides[0][0], "rejected": sides[1][0], "row": i, "targets": 1})
    stats.examples = len(pairs)
    if not pairs:
        raise QloraError(f"{source}: no preference pair left ({stats.empty} with an empty answer, {stats.dropped} "
                         f"truncated away; max_target_len/max_seq_len are {max_target_len}/{max_seq_len})")
    return pairs, stats


def _side(prompt, answer, tokenizer, eos: int, loc, limits) -> tuple[dict, bool] | None:
    """One sequence of a pair: prompt + answer, only the final answer a target. None if it is blank."""
    final = answer if isinstance(answer, str) else answer[-1]["content"] if answer[-1]["role"] == "assistant" else ""
    if not final.strip():
        return None
    if isinstance(prompt, str):
        segments, prefix = render({"prompt": prompt, "completion": answer}, "completion", tokenizer, loc), \
            _special_prefix(tokenizer)
    else:
        segments, prefix = render({"messages": prompt + answer}, "chat", tokenizer, loc), []
    last = max(k for k, (_, t) in enumerate(segments) if t)  # the final answer; earlier assistant turns are prompt
    segments = _merge([(text, is_target and k == last) for k, (text, is_target) in enumerate(segments)])
    ids, is_target, cut = _truncate(_tokenize(tokenizer, segments, prefix, eos), len(prefix), *limits)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, is_target)]
    return {"input_ids": ids, "labels": labels}, any(cut.values())


def length(example: dict) -> int:
    """Tokens of an example's longest sequence (for length grouping): a pair's longer side."""
    if "chosen" in example:
        return max(len(example["chosen"]["input_ids"]), len(example["rejected"]["input_ids"]))
    return len(example["input_ids"])


def collate_pairs(pairs: list[dict], pad_id: int) -> dict:
    """P pairs as one batch of 2P rows, chosen answers first (qlora.objectives.split_pairs)."""
    return collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)
