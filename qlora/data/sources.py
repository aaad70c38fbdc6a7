"""Training data from one or several sources: files, saved datasets, hub names; mixed by weight or count.

    data: train.jsonl                                   one source, every example once
    data: [a.jsonl:0.7, b.jsonl:0.3]                    weights (a decimal point): shares of the mixture
    data: [a.jsonl:2000, org/name:train, c.jsonl]       counts (an integer): exactly that many examples;
                                                        no suffix: every example once

Weighted sources share as many examples as they hold together (a 0.7/0.3 mix of 1,000 + 9,000
examples has 7,000 + 3,000), sampled without replacement and cycled through fresh permutations
when a source is upsampled. Each source is split into train/validation first, so an upsampled
example never lands on both sides. Sampling is a pure function of (spec, seed): a resumed run
rebuilds the same mixture, and `digest` lets it check that it did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import QloraError
from .chat import trained_format
from .columns import column_map, map_rows
from .examples import build_examples, read_dataset, split_train_val
from .load import load_rows

_NUMBER = re.compile(r"^(\d+|\d*\.\d+|\d+\.\d*)$")


@dataclass(frozen=True)
class Source:
    path: str
    weight: float | None = None  # share of the weighted part of the mixture
    count: int | None = None  # exactly this many examples

    @property
    def spec(self) -> str:
        return self.path + (f":{self.weight}" if self.weight is not None else f":{self.count}" if self.count else "")


def parse_sources(data) -> list[Source]:
    """A path, a whitespace-separated string of specs, or a list of specs -> Sources."""
    if isinstance(data, str):
        entries = [data] if Path(data).exists() else data.split()
    else:
        entries = list(data)
    if not entries:
        raise QloraError("data: no source given")
    return [_parse_one(e) for e in entries]


def _parse_one(entry: str) -> Source:
    head, sep, tail = entry.rpartition(":")
    if not sep or Path(entry).exists() or not _NUMBER.match(tail):
        return Source(entry)  # a path, or a hub name with a split (org/name:test)
    if "." in tail:
        weight = float(tail)
        if not weight > 0:
            raise QloraError(f"data: {entry}: a weight must be > 0")
        return Source(head, weight=weight)
    if int(tail) <= 0:
        raise QloraError(f"data: {entry}: a count must be > 0 (weights are written with a decimal point, e.g. 0.5)")
    return Source(head, count=int(tail))


def read_sources(cfg) -> list[tuple[Source, list[dict], str]]:
    """Every source loaded, mapped or format-detected, and validated: before the model loads."""
    mapping = column_map(cfg.prompt_field, cfg.response_field, cfg.system_field, cfg.columns)
    if mapping and cfg.data_format not in ("auto", "chat"):
        raise QloraError(f"columns: a column mapping renders rows as chat; it cannot be combined with "
                         f"data_format={cfg.data_format} (drop one)")
    out = []
    for src in parse_sources(cfg.data):
        if mapping:
            rows, fmt = map_rows(load_rows(src.path), mapping, src.path), "chat"
        else:
            rows, fmt = read_dataset(src.path, cfg.data_format)
        out.append((src, rows, fmt))
    return out


def build_mixture(sources, tokenizer, cfg) -> tuple[list[dict], list[dict], dict]:
    """(train, validation, stats): each source tokenized and split, then the train parts mixed."""
    parts, info = [], []
    for k, (src, rows, fmt) in enumerate(sources):
        examples, stats = build_examples(
            rows, fmt, tokenizer, max_source_len=cfg.max_source_len, max_target_len=cfg.max_target_len,
            max_seq_len=cfg.max_seq_len, train_on_source=cfg.train_on_source, source=src.path,
            chat_format=cfg.chat_format)
        for e in examples:
            e["source"] = k
        train, val = split_train_val(examples, cfg.val_fraction, cfg.seed)
        parts.append((src, train, val))
        info.append(dict(dataclasses.asdict(stats), source=src.path, format=fmt))
        print(f"data: {src.path} ({fmt}): {stats.summary()}")
    wanted = _sizes([(src, len(train)) for src, train, _ in parts])
    train = [e for k, (_, t, _) in enumerate(parts) for e in _sample(t, wanted[k], cfg.seed, k)]
    val = [e for _, _, v in parts for e in v]
    if not train:
        raise QloraError(f"{cfg.data}: no training examples left after the validation split")
    for row, n in zip(info, wanted):
        row["used"] = n
    if len(sources) > 1:
        print("data mixture: " + ", ".join(f"{src.path} {n}" for (src, _, _), n in zip(sources, wanted))
              + f" = {len(train)} training examples")
    stats = dict(info[0]) if len(info) == 1 else {"sources": info}
    taught = trained_format([fmt for _, _, fmt in sources], cfg.chat_format, tokenizer)
    return train, val, dict(stats, digest=digest(train), chat_format=taught)


def _sizes(parts: list[tuple[Source, int]]) -> list[int]:
    weighted = [(src.weight, n) for src, n in parts if src.weight is not None]
    total_w, total_n = sum(w for w, _ in weighted), sum(n for _, n in weighted)
    return [src.count if src.count is not None else
            round(src.weight / total_w * total_n) if src.weight is not None else n for src, n in parts]


def _sample(examples: list[dict], n: int, seed: int, k: int) -> list[dict]:
    """n examples: whole seeded permutations of the source, the last one cut short."""
    if n == len(examples) or not examples:
        return examples  # a source taken whole keeps its order (one source: exactly the unmixed run)
    g = torch.Generator().manual_seed((seed * 1_000_003 + 7919 * (k + 1)) % 2**63)
    picked = []
    while len(picked) < n:
        picked += torch.randperm(len(examples), generator=g).tolist()
    return [examples[i] for i in picked[:n]]


def digest(examples: list[dict]) -> str:
    """sha256 of the training examples' tokens and labels, in order: what a resumed run must rebuild."""
    h = hashlib.sha256()
    for e in examples:
        h.update(torch.tensor(e["input_ids"] + [-1] + e["labels"], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]
