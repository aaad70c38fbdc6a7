"""Packing: several examples per row, attention and positions restarting at each example.

A packed row holds examples back to back up to max_seq_len tokens. Each token carries its
example's number (`seq_ids`, 1-based; 0 on padding) and its position within that example, so
the model sees exactly what it would see unpacked: rotary positions restart at 0 and the
attention mask is block-diagonal causal (a token attends only to earlier tokens of its own
example). The loss of every packed example then equals its unpacked loss up to float rounding.
Packing saves the compute spent on pad tokens when rows are short (instruction data).
"""

from __future__ import annotations

import torch


def pack(examples: list[dict], max_len: int) -> list[dict]:
    """First-fit in order: each example goes into the first row with room (deterministic, no shuffle
    of its own: batch order is the BatchPlan's). An example longer than max_len gets a row to itself."""
    rows: list[dict] = []
    room: list[int] = []
    for e in examples:
        n = len(e["input_ids"])
        k = next((j for j, r in enumerate(room) if r >= n), None)
        if k is None:
            rows.append({"input_ids": [], "labels": [], "position_ids": [], "seq_ids": [], "rows": []})
            room.append(max_len)
            k = len(rows) - 1
        row = rows[k]
        row["input_ids"] += e["input_ids"]
        row["labels"] += e["labels"]
        row["position_ids"] += list(range(n))
        row["seq_ids"] += [len(row["rows"]) + 1] * n
        row["rows"].append(e.get("row"))
        room[k] -= n
    return rows


def block_causal_mask(seq_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask: 0 where query t may attend key s (same example, s <= t), else the
    dtype's most negative value (not -inf: a padding query, masked everywhere, must not give NaN)."""
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(seq_ids.shape[1], seq_ids.shape[1], dtype=torch.bool, device=seq_ids.device).tril()
    allowed = same & causal & (seq_ids[:, None, :] > 0)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def model_inputs(batch: dict, dtype: torch.dtype) -> dict:
    """Keyword arguments for the base model: the 2D padding mask, or for packed rows the positions
    and the block-diagonal mask (transformers takes a 4D mask as given)."""
    if "seq_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": block_causal_mask(batch["seq_ids"], dtype)}
