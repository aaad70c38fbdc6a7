"""`qlora generate`: answer one prompt, or every prompt of a JSONL file, with a 4-bit base and
live adapters."""

from __future__ import annotations

import json
import sys

from ..errors import QloraError
from .options import add_chat_format_arg, add_model_args, add_sampling_args, load_from, settings_from


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text from a prompt (4-bit base + live adapters)",
        description="Generate an answer for PROMPT, or for each line of a JSONL file: "
        '{"prompt": "..."} or {"messages": [{"role": ..., "content": ...}, ...]}. Prompts go through the '
        "model's chat template unless --raw; output lines repeat the input with a \"completion\" added.",
    )
    p.add_argument("prompt", nargs="?", help="the prompt text")
    p.add_argument("--prompts", metavar="FILE.jsonl", help="one prompt per line (prompt or messages)")
    p.add_argument("--output", metavar="FILE.jsonl", help="write results here (default: stdout)")
    p.add_argument("--raw", action="store_true", help="feed prompt text as-is, without the chat template")
    p.add_argument("--system", metavar="TEXT",
                   help="system message before each prompt (a \"messages\" row with its own system message keeps it)")
    add_model_args(p)
    add_sampling_args(p)
    add_chat_format_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if (args.prompt is None) == (args.prompts is None):
        raise QloraError("give either a PROMPT or --prompts FILE.jsonl (exactly one)")
    if args.system is not None and args.raw:
        raise QloraError("--system needs the chat template; drop --raw, or write the system text into the prompt")
    settings = settings_from(args)
    rows = [{"prompt": args.prompt}] if args.prompts is None else read_prompts(args.prompts)
    model, tokenizer = load_from(args)
    from ..generate import generate, stream

    if args.prompts is None and args.output is None:  # one prompt to the terminal: stream it
        for delta in stream(model, tokenizer, _prompt(rows[0], args.raw, tokenizer, args.system), settings):
            print(delta.text, end="", flush=True)
        print()
        return 0
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for i, row in enumerate(rows):
            text = generate(model, tokenizer, _prompt(row, args.raw, tokenizer, args.system), settings)
            out.write(json.dumps({**row, "completion": text}, ensure_ascii=False) + "\n")
            out.flush()
            if args.output:
                print(f"{i + 1}/{len(rows)}", file=sys.stderr, flush=True)
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _prompt(row: dict, raw: bool, tokenizer, system: str | None = None):
    # without a system message some templates (SmolLM2's) insert their own default one
    head = [{"role": "system", "content": system}] if system is not None else []
    if "messages" in row:
        messages = row["messages"]
        return messages if messages[0]["role"] == "system" else head + messages
    if raw or not getattr(tokenizer, "chat_template", None):
        if system is not None:
            raise QloraError("--system needs a chat template, and this tokenizer has none")
        return row["prompt"]
    return head + [{"role": "user", "content": row["prompt"]}]


def read_prompts(path: str) -> list[dict]:
    """Rows of a JSONL file, each with a string "prompt" or a list of {role, content} "messages"."""
    rows = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except UnicodeDecodeError:
        raise QloraError(f"{path}: not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise QloraError(f"{path}:{n}: invalid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise QloraError(f"{path}:{n}: expected a JSON object with \"prompt\" or \"messages\"")
        if isinstance(row.get("prompt"), str):
            rows.append(row)
        elif _valid_messages(row.get("messages")):
            rows.append(row)
        else:
            raise QloraError(f"{path}:{n}: needs a string \"prompt\", or \"messages\": a list of "
                             "{\"role\": ..., \"content\": ...} with string values")
    if not rows:
        raise QloraError(f"{path}: no prompts in the file")
    return rows


def _valid_messages(messages) -> bool:
    if not isinstance(messages, list) or not messages:
        return False
    return all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in messages)
