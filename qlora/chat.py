"""An interactive chat in the terminal: the model's chat template, the conversation as history,
answers streamed token by token. /reset forgets the conversation, /exit (or Ctrl-D) leaves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from .errors import QloraError
from .generate import GenerationSettings, context_length, encode_prompt, stream

HELP = "Type a message. /reset starts a new conversation, /exit quits (Ctrl-C stops an answer)."


def fit_history(tokenizer, messages: list[dict], limit: int | None, reserve: int) -> list[dict]:
    """Drop the oldest turns (never the system message, never the last one) until the rendered
    conversation plus `reserve` new tokens fits in `limit` tokens."""
    if limit is None:
        return messages
    system = [m for m in messages if m["role"] == "system"][:1]
    turns = [m for m in messages if m["role"] != "system"]
    while len(turns) > 1 and len(encode_prompt(tokenizer, system + turns)) + reserve > limit:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":  # start on a user turn, as templates expect
            turns = turns[1:]
    return system + turns


def repl(model, tokenizer, settings: GenerationSettings, system: str | None = None,
         read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """Run the conversation until /exit or end of input. Returns the number of answers given."""
    if not getattr(tokenizer, "chat_template", None):
        raise QloraError("this tokenizer has no chat template, so there is no chat format; use `qlora generate`")
    fresh = [{"role": "system", "content": system}] if system else []
    history, answers = list(fresh), 0
    print(HELP, file=out, flush=True)
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out, flush=True)
            return answers
        text = line.strip()
        if text in ("/exit", "/quit"):
            return answers
        if text == "/reset":
            history = list(fresh)
            print("(conversation cleared)", file=out, flush=True)
            continue
        if not text:
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {HELP}", file=out, flush=True)
            continue
        history.append({"role": "user", "content": line})
        history = fit_history(tokenizer, history, context_length(model), settings.max_new_tokens)
        answer = _answer(model, tokenizer, history, settings, out)
        if answer is None:
            history.pop()  # interrupted: forget the question too, so the history stays well-formed
        else:
            history.append({"role": "assistant", "content": answer})
            answers += 1


def _answer(model, tokenizer, history: list[dict], settings: GenerationSettings, out: TextIO) -> str | None:
    pieces = []
    print("assistant> ", end="", file=out, flush=True)
    try:
        for delta in stream(model, tokenizer, history, settings):
            pieces.append(delta.text)
            print(delta.text, end="", file=out, flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", file=out, flush=True)
        return None
    except QloraError as e:  # e.g. one message longer than the context: say so, keep chatting
        print(f"\nerror: {e}", file=out, flush=True)
        return None
    print(file=out, flush=True)
    return "".join(pieces)
