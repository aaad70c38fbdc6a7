"""`qlora generate`: answer one prompt, or every prompt of a JSONL file, with a 4-bit base and
live adapters. Also home of the model and sampling flags that chat and serve share."""

from __future__ import annotations

import argparse
import json
import sys
import typing

from ..config import QuantType
from ..data.chat import CHAT_FORMATS, install
from ..errors import QloraError
from ..generate import GenerationSettings
from ..precision import CHOICES as DTYPE_CHOICES, spelled

QUANT_CHOICES = typing.get_args(QuantType)
DTYPE_HELP = ("compute dtype of the matmuls; auto = bfloat16 where the hardware multiplies bf16 natively, "
              "else float32 (default: auto)")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    """--dtype (alias --compute-dtype), as `qlora train --compute-dtype`: auto, or a dtype name (bf16 etc. too)."""
    p.add_argument("--dtype", "--compute-dtype", dest="dtype", choices=DTYPE_CHOICES, default="auto",
                   type=spelled, help=DTYPE_HELP)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local HF directory, GGUF file, or hub name (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="DIR",
                   help="PEFT-format LoRA adapter directory, applied live on the 4-bit base (repeat to stack)")
    p.add_argument("--quant-type", choices=QUANT_CHOICES, default=None,
                   help="4-bit type of the base (default: the one the adapter was trained on, else nf4; bf16 = unquantized)")
    add_dtype_arg(p)
    # chat formats (issue 16): how messages are rendered for a base without (or instead of) a template
    p.add_argument("--chat-format", choices=CHAT_FORMATS, default="auto",
                   help="auto (the adapter's recorded format, else the tokenizer's template, else guanaco), "
                   "tokenizer, guanaco, alpaca or chatml (default: auto)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    d = GenerationSettings()
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"most tokens to generate (default: {d.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"sampling temperature, 0 = greedy (default: {d.temperature})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"nucleus sampling mass, 1 = off (default: {d.top_p})")
    p.add_argument("--top-k", type=int, default=d.top_k,
                   help=f"sample among the k most likely tokens, 0 = off (default: {d.top_k})")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string, not included in the answer (repeatable)")
    p.add_argument("--seed", type=int, default=d.seed, help="sampler seed: same seed, same text (default: random)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named sampling settings: vicuna = the paper's Vicuna-benchmark generation, nucleus "
                   "sampling top-p 0.9 at temperature 0.7 (--temperature/--top-p other than their defaults win)")


# The QLoRA paper's generation settings for the Vicuna benchmark (Sec. 5.3): nucleus sampling.
PRESETS = {"vicuna": {"temperature": 0.7, "top_p": 0.9}}


def settings_from(args) -> GenerationSettings:
    d, chosen = GenerationSettings(), {"temperature": args.temperature, "top_p": args.top_p}
    for key, value in PRESETS.get(getattr(args, "preset", None), {}).items():
        if chosen[key] == getattr(d, key):  # a flag left at its default takes the preset's value
            chosen[key] = value
    return GenerationSettings(max_new_tokens=args.max_new_tokens, top_k=args.top_k, stop=tuple(args.stop),
                              seed=args.seed, **chosen)


def load_from(args):
    """(model, tokenizer) for the model flags, with a line on stderr saying what was loaded."""
    from ..generate import load_model
    from ..precision import resolve, torch_dtype

    args.dtype = resolve(args.dtype, "cpu")
    model, tokenizer = load_model(args.model, args.adapters, args.quant_type, torch_dtype(args.dtype))
    chat_format = install(tokenizer, args.chat_format, args.adapters)
    quant = model.qlora_quant["quant_type"]
    adapters = f" + {len(args.adapters)} adapter(s)" if args.adapters else ""
    print(f"loaded {model.qlora_source} ({quant}{adapters}, {args.dtype}, chat format {chat_format})",
          file=sys.stderr, flush=True)
    return model, tokenizer


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
