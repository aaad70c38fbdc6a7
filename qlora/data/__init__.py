"""Data: files -> rows -> format -> tokenized examples with target-only labels -> deterministic batches.

    rows, fmt = read_dataset("train.jsonl")                  # load_rows + detect_format + validate_rows
    examples, stats = build_examples(rows, fmt, tokenizer, 384, 256, 512)
    train, val = split_train_val(examples, 0.05, seed)
    plan = BatchPlan.for_examples(train, batch_size, seed, group_by_length=True)
    for epoch, index, batch in plan.iterate(): collate([train[i] for i in batch], pad_id)

Formats: alpaca (instruction, input, output), guanaco (text with '### Human:' / '### Assistant:'
turns), chat (messages: [{role, content}], rendered with the tokenizer's chat template),
completion (prompt, completion), text (text; every token is trained on).
"""

from .batching import MEGA_BATCH, BatchPlan, collate, epoch_batches
from .examples import IGNORE_INDEX, DataStats, build_examples, prompt_and_reference, read_dataset, split_train_val
from .formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, FORMATS, detect_format, render, validate_rows
from .load import Rows, load_rows

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "FORMATS", "IGNORE_INDEX", "MEGA_BATCH", "BatchPlan", "DataStats",
    "Rows", "build_examples", "collate", "detect_format", "epoch_batches", "load_rows", "prompt_and_reference",
    "read_dataset", "render", "split_train_val", "validate_rows",
]
