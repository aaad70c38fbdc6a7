"""Row shapes (alpaca, guanaco, chat, completion, text): detection, validation, and rendering.

A row renders to *segments*: `(text, is_target)` pieces in order. Prompt pieces get label -100,
target pieces are learned and end with EOS. Rendering to pieces (instead of one string plus
character offsets) keeps the mask exact, and matches inference, where the prompt is tokenized alone.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import get_args

from ..config import DataFormat
from ..errors import QloraError
from .load import type_name, where

FORMATS = tuple(f for f in get_args(DataFormat) if f != "auto")  # the config's Literal is the one list
Segments = list[tuple[str, bool]]

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
HUMAN, ASSISTANT = "### Human:", "### Assistant:"
_TURN = re.compile(r"(### Human:|### Assistant:)")

# format -> (required string keys, optional string keys); chat is checked separately.
_KEYS = {
    "alpaca": (("instruction", "output"), ("input",)),
    "completion": (("prompt", "completion"), ()),
    "guanaco": (("text",), ()),
    "text": (("text",), ()),
}
_SHAPES = "alpaca (instruction, input, output), guanaco or text (text), chat (messages), completion (prompt, completion)"


def _row_format(row: dict) -> str | None:
    if "messages" in row:
        return "chat"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "completion"
    if "text" in row:
        text = row["text"]
        return "guanaco" if isinstance(text, str) and ASSISTANT in text else "text"
    return None


def detect_format(rows: list[dict], path: str) -> str:
    """The format most of the first 100 rows fit (so one broken row is reported, not misdetected)."""
    votes = Counter(f for f in map(_row_format, rows[:100]) if f)
    if not votes:
        keys = sorted({k for row in rows[:100] for k in row})
        raise QloraError(
            f"{path}: cannot tell the data format from the keys [{', '.join(keys)}]; "
            f"expected {_SHAPES} (rename the columns or set data_format)"
        )
    return max(FORMATS, key=lambda f: (votes[f], -FORMATS.index(f)))


def validate_rows(rows: list[dict], fmt: str, source: str) -> None:
    """Raise on the first row that lacks a field of `fmt` or holds a wrong type there."""
    if fmt not in FORMATS:
        raise QloraError(f"{source}: unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    for i, row in enumerate(rows):
        if fmt == "chat":
            _validate_chat(row.get("messages"), lambda: where(rows, i, source))
            continue
        required, optional = _KEYS[fmt]
        for key in required + optional:
            value = row.get(key)
            if key not in row and key in required:
                found = ", ".join(sorted(row)) or "none"
                raise QloraError(f"{where(rows, i, source)}: missing key '{key}' for the {fmt} format (keys found: {found})")
            if key in optional and value is None:
                continue
            if not isinstance(value, str):
                raise QloraError(f"{where(rows, i, source)}: key '{key}' must be a string, got {type_name(value)}")
        if fmt == "guanaco" and ASSISTANT not in row["text"]:
            raise QloraError(f"{where(rows, i, source)}: key 'text' has no '{ASSISTANT}' turn (guanaco format)")


def _validate_chat(messages, loc) -> None:
    if not isinstance(messages, list) or not messages:
        raise QloraError(f"{loc()}: key 'messages' must be a non-empty list of {{role, content}}, got {type_name(messages)}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise QloraError(f"{loc()}: messages[{j}] must be an object with role and content, got {type_name(m)}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else type_name(m[key])
                raise QloraError(f"{loc()}: messages[{j}].{key} must be a string, got {got}")
    if not any(m["role"] == "assistant" for m in messages):
        raise QloraError(f"{loc()}: key 'messages' has no assistant message to learn from")


def render(row: dict, fmt: str, tokenizer, loc) -> Segments:
    """The row as (text, is_target) pieces; empty targets are left out (the caller counts rows without any)."""
    if fmt == "alpaca":
        template = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=row["instruction"], input=row.get("input"))
        return _merge([(prompt, False), (row["output"], True)])
    if fmt == "completion":
        return _merge([(row["prompt"], False), (row["completion"], True)])
    if fmt == "text":
        return _merge([(row["text"], True)])
    if fmt == "guanaco":
        return _render_guanaco(row["text"])
    return _render_chat(row["messages"], tokenizer, loc)


def _render_guanaco(text: str) -> Segments:
    """'### Human: q### Assistant: a### Human: ...': every assistant answer is a target.

    The space after 'Assistant:' stays in the target, as at inference the prompt ends with the colon.
    """
    pieces = _TURN.split(text)  # [preamble, marker, body, marker, body, ...]
    segments: Segments = [(pieces[0], False)]
    for marker, body in zip(pieces[1::2], pieces[2::2]):
        if marker == ASSISTANT and body.strip():
            segments += [(marker, False), (body, True)]
        else:
            segments.append((marker + body, False))
    return _merge(segments)


def _render_chat(messages: list[dict], tokenizer, loc) -> Segments:
    """Render with the tokenizer's chat template; each assistant turn (and its end-of-turn token) is a target.

    Prompt pieces are the template's text up to each assistant turn, rendered with the generation
    prompt, i.e. exactly what the model sees at inference. Templates whose rendering of a prefix of
    the conversation is not a prefix of the whole (some strip earlier reasoning) fall back to
    learning the last assistant turn only.
    """
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"].strip()]
    if not turns:
        return []
    full = _apply_template(tokenizer, messages, False, loc)
    segments = _chat_segments(messages, turns, full, tokenizer, loc)
    if segments is None:
        segments = _chat_segments(messages, turns[-1:], full, tokenizer, loc)
    if segments is None:
        raise QloraError(f"{loc()}: the tokenizer's chat template does not render this conversation "
                         "prefix-consistently; use the completion format")
    return segments


def _chat_segments(messages, turns, full, tokenizer, loc) -> Segments | None:
    segments: Segments = []
    done = 0  # characters of `full` already assigned to segments
    for i in turns:
        prompt = _apply_template(tokenizer, messages[:i], True, loc)
        upto = _apply_template(tokenizer, messages[: i + 1], False, loc)
        if not (prompt.startswith(full[:done]) and upto.startswith(prompt) and full.startswith(upto)):
            return None
        target = upto[len(prompt) :].rstrip()  # the newline after the end-of-turn token belongs to the next prompt
        segments += [(prompt[done:], False), (target, True)]
        done = len(prompt) + len(target)
    return _merge(segments)


def _apply_template(tokenizer, messages, generation_prompt: bool, loc) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise QloraError(f"{loc()}: the chat format needs a tokenizer with a chat template, and this one has none; "
                         "use the completion or alpaca format")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises TemplateError for e.g. roles the template rejects
        reason = " ".join(str(e).split())[:200]
        raise QloraError(f"{loc()}: the chat template rejected this conversation ({reason})") from None


def _merge(segments: Segments) -> Segments:
    """Join neighbouring prompt pieces and drop empty ones, so each prompt run is tokenized once."""
    out: Segments = []
    for text, is_target in segments:
        if not text or (is_target and not text.strip()):
            continue  # a blank answer teaches nothing; rows left without a target are counted and skipped
        if out and not is_target and not out[-1][1]:
            out[-1] = (out[-1][0] + text, False)
        else:
            out.append((text, is_target))
    return out
