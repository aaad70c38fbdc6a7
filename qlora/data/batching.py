"""Deterministic batch order (seeded shuffle, optional group-by-length) and right-padded collation.

The order of epoch e is a pure function of (lengths, batch_size, seed, e): the trainer stores only
(epoch, batch_index) as its data position, and a new process rebuilds the same batches from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .examples import IGNORE_INDEX

MEGA_BATCH = 50  # batches per length-sorted window: enough to group lengths, small enough to stay random


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """Batches (lists of example indices) of one epoch; every index appears exactly once.

    Group-by-length (as in HF's LengthGroupedSampler): shuffle, cut into windows of MEGA_BATCH
    batches, sort each window by token count, split into batches, then shuffle the batch order so
    the run is not ordered by length. The batch holding the longest example goes first, so a batch
    that does not fit in memory fails at step 1 rather than hours in.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    n = len(lengths)
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    order = torch.randperm(n, generator=g).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    window = MEGA_BATCH * batch_size
    batches = []
    for start in range(0, n, window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])  # stable: ties keep the shuffle
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def _epoch_seed(seed: int, epoch: int) -> int:
    # A fixed arithmetic mix (not Python's hash) so any process derives the same generator seed.
    return (seed * 1_000_003 + epoch) % (2**63)


@dataclass(frozen=True)
class BatchPlan:
    """The batch order of every epoch; positions are (epoch, batch_index) of the next batch to run."""

    lengths: tuple[int, ...]
    batch_size: int
    seed: int
    group_by_length: bool = True

    @classmethod
    def for_examples(cls, examples: list[dict], batch_size: int, seed: int, group_by_length: bool = True):
        return cls(tuple(len(e["input_ids"]) for e in examples), batch_size, seed, group_by_length)

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def epoch(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.lengths, self.batch_size, self.seed, epoch, self.group_by_length)

    def iterate(self, epoch: int = 0, batch: int = 0) -> Iterator[tuple[int, int, list[int]]]:
        """Endless (epoch, batch_index, indices) from position (epoch, batch); batch past the end rolls over."""
        if not self.lengths:
            raise ValueError("no examples to batch")
        epoch, batch = epoch + batch // self.batches_per_epoch, batch % self.batches_per_epoch
        while True:
            batches = self.epoch(epoch)
            for b in range(batch, len(batches)):
                yield epoch, b, batches[b]
            epoch, batch = epoch + 1, 0


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids (B, T), labels (B, T) with -100 on padding, attention_mask (B, T).

    pad_id only fills positions the mask hides and the labels skip (use pad_token_id, or eos when None).
    Packed rows (packing.pack) also get position_ids and seq_ids (0 on padding).
    """
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(e["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if "seq_ids" in examples[0]:
        for key in ("position_ids", "seq_ids"):
            out[key] = torch.zeros((len(examples), width), dtype=torch.long)
            for b, e in enumerate(examples):
                out[key][b, : len(e[key])] = torch.tensor(e[key], dtype=torch.long)
    return out
