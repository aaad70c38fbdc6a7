"""Row shapes: detection, validation, and rendering to (text, is_target) segments.

A row renders to *segments*: `(text, is_target)` pieces in order. Prompt pieces get label -100,
target pieces are learned and end with EOS. Rendering to pieces (instead of one string plus
character offsets) keeps the mask exact, and matches inference, where the prompt is tokenized alone.
"""

from __future__ import annotations

from collections import Counter
from typing import get_args

from ..config import DataFormat
from ..errors import QloraError
from .chat import merge, render_chat, validate_chat
from .load import type_name, where
from .turns import ASSISTANT, HUMAN, MARKED, render_turns

FORMATS = tuple(f for f in get_args(DataFormat) if f != "auto")  # the config's Literal is the one list
Segments = list[tuple[str, bool]]
__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "ASSISTANT", "FORMATS", "HUMAN", "detect_format", "describe",
           "render", "render_all", "validate_rows"]

# Stanford Alpaca's prompt (Taori et al. 2023), as artidoro/qlora uses it.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# format -> (required keys, optional keys, what it is); the keys are strings except where noted.
SHAPES = {
    "alpaca": (("instruction", "output"), ("input",), "Stanford Alpaca"),
    "dolly": (("instruction", "response"), ("context",), "Databricks Dolly"),
    "input_output": (("input", "output"), (), "the paper's input-output format, Longform"),
    "completion": (("prompt", "completion"), (), "prompt + completion"),
    "flan": (("inputs", "targets"), (), "FLAN-style"),
    "unnatural": (("instruction", "instances"), (), "Unnatural Instructions; instances: [{input, output}]"),
    "chat": (("messages",), (), "messages: [{role, content}] with the tokenizer's chat template"),
    "guanaco": (("text",), (), "text with '### Human:' / '### Assistant:' turns"),
    "chip2": (("text",), (), "Chip2/OIG: text with '<human>:' / '<bot>:' turns"),
    "hh_rlhf": (("chosen",), ("rejected",),
                "Anthropic HH-RLHF: the chosen reply after '\\n\\nHuman:' / '\\n\\nAssistant:' turns"),
    "text": (("text",), (), "plain text, every token trained on"),
}
_TEXT_OF = {"guanaco": "text", "chip2": "text", "hh_rlhf": "chosen"}  # marked formats -> the key holding the turns


def describe(fmt: str) -> str:
    """'dolly (instruction, response, context: Databricks Dolly)': the one-line name of a format."""
    required, optional, what = SHAPES[fmt]
    return f"{fmt} ({', '.join(required + optional)}: {what})"


def _candidates(row: dict) -> frozenset[str]:
    """The formats a row fits, minus those another fit explains strictly more of (alpaca's
    instruction/input/output also fits input_output); plain text only when nothing structured fits."""
    fits = set()
    for fmt, (required, optional, _) in SHAPES.items():
        if fmt == "text" or not all(k in row for k in required):
            continue
        if fmt in MARKED and not (isinstance(row[_TEXT_OF[fmt]], str) and MARKED[fmt][0] in row[_TEXT_OF[fmt]]):
            continue
        fits.add(fmt)
    if not fits and "text" in row:
        fits.add("text")
    keys = {f: set(SHAPES[f][0] + SHAPES[f][1]) for f in fits}
    return frozenset(f for f in fits if not any(keys[f] < keys[g] for g in fits))


def detect_format(rows: list[dict], path: str) -> str:
    """The format most of the first 100 rows fit (so one broken row is reported, not misdetected).
    A shape that fits several formats equally is refused with the candidates named."""
    votes = Counter(c for c in map(_candidates, rows[:100]) if c)
    if not votes:
        keys = sorted({k for row in rows[:100] for k in row})
        shapes = "; ".join(describe(f) for f in SHAPES)
        raise QloraError(f"{path}: cannot tell the data format from the keys [{', '.join(keys)}]; expected one of "
                         f"{shapes} (rename the columns, map them with prompt_field/response_field, "
                         "or set data_format)")
    best = max(votes.values())
    top = sorted({f for c, n in votes.items() if n == best for f in c}, key=list(SHAPES).index)
    if len(top) > 1:
        i = next(i for i, row in enumerate(rows[:100]) if _candidates(row) & set(top))
        raise QloraError(f"{where(rows, i, path)}: ambiguous row shape, it fits {' and '.join(map(describe, top))}; "
                         f"set data_format to one of {', '.join(top)}")
    return top[0]


def validate_rows(rows: list[dict], fmt: str, source: str) -> None:
    """Raise on the first row that lacks a field of `fmt` or holds a wrong type there."""
    if fmt not in FORMATS:
        raise QloraError(f"{source}: unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    for i, row in enumerate(rows):
        loc = lambda: where(rows, i, source)  # noqa: E731 - built only when a row is bad
        if fmt == "chat":
            validate_chat(row.get("messages"), loc)
        elif fmt == "unnatural":
            _validate_unnatural(row, loc)
        else:
            required, optional, _ = SHAPES[fmt]
            _validate_strings(row, required, optional, fmt, loc)
        if fmt in MARKED and MARKED[fmt][0] not in row[_TEXT_OF[fmt]]:
            raise QloraError(f"{loc()}: key '{_TEXT_OF[fmt]}' has no {MARKED[fmt][0].strip()!r} turn ({fmt} format)")


def _validate_strings(row: dict, required, optional, fmt: str, loc) -> None:
    for key in required + optional:
        value = row.get(key)
        if key not in row and key in required:
            found = ", ".join(sorted(row)) or "none"
            raise QloraError(f"{loc()}: missing key '{key}' for the {fmt} format (keys found: {found})")
        if key in optional and value is None:
            continue
        if not isinstance(value, str):
            raise QloraError(f"{loc()}: key '{key}' must be a string, got {type_name(value)}")


def _validate_unnatural(row: dict, loc) -> None:
    _validate_strings(row, ("instruction",), (), "unnatural", loc)
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances:
        raise QloraError(f"{loc()}: key 'instances' must be a non-empty list of {{input, output}}, "
                         f"got {type_name(instances)}")
    for j, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise QloraError(f"{loc()}: instances[{j}] must be an object with input and output, got {type_name(inst)}")
        _validate_strings(inst, ("output",), ("input", "instruction_with_input", "constraints"), "unnatural",
                          lambda: f"{loc()}: instances[{j}]")


def render(row: dict, fmt: str, tokenizer, loc, chat_format: str = "auto") -> Segments:
    """The row's (first) example as (text, is_target) pieces; empty targets are left out."""
    return render_all(row, fmt, tokenizer, loc, chat_format)[0]


def render_all(row: dict, fmt: str, tokenizer, loc, chat_format: str = "auto") -> list[Segments]:
    """Every example of the row (one, except one per Unnatural Instructions instance)."""
    if fmt == "alpaca":
        return [_alpaca(row["instruction"], row.get("input"), row["output"])]
    if fmt == "dolly":
        return [_alpaca(row["instruction"], row.get("context"), row["response"])]
    if fmt == "unnatural":
        return [_unnatural(row["instruction"], inst) for inst in row["instances"]]
    if fmt in ("completion", "input_output", "flan"):
        prompt, answer = SHAPES[fmt][0]
        return [merge([(row[prompt], False), (row[answer], True)])]
    if fmt == "text":
        return [merge([(row["text"], True)])]
    if fmt in MARKED:
        return [merge(render_turns(row[_TEXT_OF[fmt]], fmt))]
    return [render_chat(row["messages"], tokenizer, loc, chat_format)]


def _alpaca(instruction: str, context: str | None, answer: str) -> Segments:
    template = ALPACA_PROMPT if context else ALPACA_PROMPT_NO_INPUT
    return merge([(template.format(instruction=instruction, input=context), False), (answer, True)])


def _unnatural(instruction: str, inst: dict) -> Segments:
    """An instance as an Alpaca example; its constraints (e.g. "answer 'True' or 'False'") join the instruction."""
    constraints = (inst.get("constraints") or "").strip()
    extra = f"\n{constraints}" if constraints and constraints.rstrip(".").lower() != "none" else ""
    if inst.get("instruction_with_input"):  # the dataset's own rendering of instruction and input together
        return _alpaca(inst["instruction_with_input"] + extra, None, inst["output"])
    return _alpaca(instruction + extra, inst.get("input"), inst["output"])
