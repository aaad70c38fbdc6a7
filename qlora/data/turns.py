"""Conversations written as one string with turn markers: guanaco, Chip2/OIG and Anthropic HH-RLHF.

    guanaco  '### Human: q### Assistant: a### Human: ...'    every assistant answer is a target
    chip2    '<human>: q\\n<bot>: a\\n<human>: ...'           every bot answer is a target
    hh_rlhf  '\\n\\nHuman: q\\n\\nAssistant: a ...' (chosen)    the last (chosen) reply is the target

Markers stay in the prompt (the model sees them at inference, where the prompt ends with the
assistant marker); each target ends where its text ends, so the EOS the tokenizer step appends
follows the answer directly.
"""

from __future__ import annotations

import re

Segments = list[tuple[str, bool]]

HUMAN, ASSISTANT = "### Human:", "### Assistant:"
CHIP2_HUMAN, CHIP2_BOT = "<human>:", "<bot>:"
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"

_GUANACO = re.compile(r"(### Human:|### Assistant:)")
_CHIP2 = re.compile(r"(<human>:|<bot>:)")
_HH = re.compile(r"(\n\nHuman:|\n\nAssistant:)")

# format -> (the assistant marker a row must hold, splitter): the one table detection and validation read
MARKED = {
    "guanaco": (ASSISTANT, _GUANACO),
    "chip2": (CHIP2_BOT, _CHIP2),
    "hh_rlhf": (HH_ASSISTANT, _HH),
}


def render_turns(text: str, fmt: str) -> Segments:
    """(text, is_target) pieces of a marked conversation; see the module docstring for which turns learn."""
    marker, splitter = MARKED[fmt]
    pieces = splitter.split(text)  # [preamble, marker, body, marker, body, ...]
    turns = list(zip(pieces[1::2], pieces[2::2]))
    answers = [k for k, (m, body) in enumerate(turns) if m == marker and body.strip()]
    if fmt == "hh_rlhf":
        answers = answers[-1:]  # the earlier replies are context shared with the rejected reply
    segments: Segments = [(pieces[0], False)]
    for k, (m, body) in enumerate(turns):
        if k not in answers:
            segments.append((m + body, False))
        elif fmt == "guanaco":
            # the guanaco files' turns run into the next marker with no separator: keep the body whole
            segments += [(m, False), (body, True)]
        else:
            answer = body.rstrip()  # the newline before the next turn belongs to that turn's prompt
            segments += [(m, False), (answer, True), (body[len(answer):], False)]
    return segments
