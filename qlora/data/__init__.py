"""Data: files -> rows -> format -> tokenized examples with target-only labels -> deterministic batches.

    rows, fmt = read_dataset("train.jsonl")                  # load_rows + detect_format + validate_rows
    examples, stats = build_examples(rows, fmt, tokenizer, 384, 256, 512)
    train, val = split_train_val(examples, 0.05, seed)
    plan = BatchPlan.for_examples(train, batch_size, seed, group_by_length=True)
    for epoch, index, batch in plan.iterate(): collate([train[i] for i in batch], pad_id)

Formats (formats.SHAPES is the list, detected from the keys or set with data_format): alpaca,
dolly, input_output, completion, flan, unnatural, chat (tokenizer chat template), guanaco, chip2,
hh_rlhf (marked turns in one string: turns.py), text (every token trained on).
"""

from .batching import MEGA_BATCH, BatchPlan, collate, epoch_batches
from .examples import IGNORE_INDEX, DataStats, build_examples, prompt_and_reference, read_dataset, split_train_val
from .formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, FORMATS, detect_format, render, validate_rows
from .load import Rows, load_rows
from .packing import block_causal_mask, model_inputs, pack
from .sources import build_mixture, parse_sources, read_sources

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "FORMATS", "IGNORE_INDEX", "MEGA_BATCH", "BatchPlan", "DataStats",
    "Rows", "build_examples", "collate", "detect_format", "epoch_batches", "load_rows", "prompt_and_reference",
    "read_dataset", "render", "split_train_val", "validate_rows", "pack", "block_causal_mask", "model_inputs",
    "build_mixture", "parse_sources", "read_sources",
]
