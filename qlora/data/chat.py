"""The chat format: `messages` rendered with a chat template, assistant turns learned.

The template is the tokenizer's own (`tokenizer`) or a named one for base models that ship none
(`guanaco`, `alpaca`, `chatml`); `auto` takes the tokenizer's when it has one, else guanaco, the
paper's format. Named templates render each turn to segments directly, so the mask is exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

from ..config import ChatFormat
from ..errors import QloraError
from .load import type_name

Segments = list[tuple[str, bool]]
CHAT_FORMATS = get_args(ChatFormat)  # the config's Literal is the one list
FALLBACK = "guanaco"  # what `auto` uses for a tokenizer without a chat template
ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
# name -> (system text -> prompt, user text -> prompt, the prompt that opens an answer, answer -> target)
_NAMED = {
    "guanaco": (lambda s: s, lambda u: f"### Human: {u}", "### Assistant:", lambda a: f" {a}"),
    "alpaca": (lambda s: s, lambda u: f"\n\n### Instruction:\n{u}", "\n\n### Response:\n", lambda a: a),
    "chatml": (lambda s: f"<|im_start|>system\n{s}<|im_end|>\n", lambda u: f"<|im_start|>user\n{u}<|im_end|>\n",
               "<|im_start|>assistant\n", lambda a: f"{a}<|im_end|>"),
}


# The same named templates in Jinja, installed on a tokenizer for inference (generate, chat, serve,
# eval generate) so every consumer of tokenizer.apply_chat_template renders what training rendered;
# {prefix} is the text of the tokens the tokenizer puts in front of any text (LLaMA's BOS).
_ROLE = "{{% set r = m['role'] if m['role'] in ['system', 'assistant'] else 'user' %}}"
_EOS = "{{{{ eos_token if eos_token and not m['content'].endswith(eos_token) else '' }}}}"
_NL = "{{{{ '\\n' }}}}"  # newlines as Jinja strings: HF renders with trim_blocks, which eats one after a tag
_JINJA = {
    "guanaco": ("{prefix}{{% for m in messages %}}" + _ROLE + "{{% if r == 'system' %}}{{{{ m['content'] }}}}"
                "{{% elif r == 'assistant' %}}### Assistant: {{{{ m['content'] }}}}" + _EOS +
                "{{% else %}}### Human: {{{{ m['content'] }}}}{{% endif %}}{{% endfor %}}"
                "{{% if add_generation_prompt %}}### Assistant:{{% endif %}}"),
    "alpaca": ("{prefix}{{% if not (messages | selectattr('role', 'equalto', 'system') | list) %}}{system}{{% endif %}}"
               "{{% for m in messages %}}" + _ROLE + "{{% if r == 'system' %}}{{{{ m['content'] }}}}"
               "{{% elif r == 'assistant' %}}" + _NL * 2 + "### Response:" + _NL + "{{{{ m['content'] }}}}" + _EOS +
               "{{% else %}}" + _NL * 2 + "### Instruction:" + _NL + "{{{{ m['content'] }}}}{{% endif %}}{{% endfor %}}"
               "{{% if add_generation_prompt %}}" + _NL * 2 + "### Response:" + _NL + "{{% endif %}}"),
    "chatml": ("{prefix}{{% for m in messages %}}" + _ROLE + "<|im_start|>{{{{ r }}}}" + _NL + "{{{{ m['content'] }}}}"
               "<|im_end|>{{% if r == 'assistant' %}}"
               "{{{{ eos_token if eos_token and eos_token != '<|im_end|>' else '' }}}}"
               "{{% else %}}" + _NL + "{{% endif %}}{{% endfor %}}"
               "{{% if add_generation_prompt %}}<|im_start|>assistant" + _NL + "{{% endif %}}"),
}
RECORD = "qlora_chat_format.json"  # beside an adapter: the chat format it was trained with
# data formats whose prompts are a named chat format: inference should speak it too
_IMPLIED = {"guanaco": "guanaco", "alpaca": "alpaca", "dolly": "alpaca", "unnatural": "alpaca"}


def jinja_template(name: str, prefix: str = "") -> str:
    """The named template as a Jinja chat template (what install() puts on a tokenizer)."""
    return _JINJA[name].format(prefix=prefix.replace("{", "{{").replace("}", "}}"), system=ALPACA_SYSTEM)


def trained_format(formats: list[str], chat_format: str, tokenizer) -> str | None:
    """The chat format a run's data taught, to record with its adapter (None: no single one)."""
    implied = {resolve_chat_format(chat_format, tokenizer) if f == "chat" else _IMPLIED.get(f) for f in formats}
    return implied.pop() if len(implied) == 1 and None not in implied else None


def recorded(adapters) -> str | None:
    """The chat format recorded beside the first adapter that has one."""
    for a in adapters:
        p = Path(a) / RECORD
        if p.is_file():
            try:
                name = json.loads(p.read_text(encoding="utf-8")).get("chat_format")
            except (ValueError, AttributeError):
                raise QloraError(f"{p}: invalid JSON; expected {{\"chat_format\": NAME}}") from None
            if name not in CHAT_FORMATS:
                raise QloraError(f"{p}: chat_format {name!r} is not one of {', '.join(CHAT_FORMATS)}")
            return name
    return None


def install(tokenizer, chat_format: str = "auto", adapters=()) -> str:
    """Make the tokenizer render chats as asked: the flag, else what the adapter was trained with, else
    the tokenizer's own template, else guanaco. Returns the format used (for the load line)."""
    name = chat_format if chat_format != "auto" else recorded(adapters) or "auto"
    name = resolve_chat_format(name, tokenizer)
    if name != "tokenizer":
        from .examples import _special_prefix

        tokenizer.chat_template = jinja_template(name, tokenizer.decode(_special_prefix(tokenizer)))
    elif not getattr(tokenizer, "chat_template", None):
        raise QloraError("chat_format tokenizer: this tokenizer has no chat template; use guanaco, alpaca or chatml")
    return name


def resolve_chat_format(name: str, tokenizer) -> str:
    """`auto` made concrete: the tokenizer's template when it has one, else the named fallback."""
    if name not in CHAT_FORMATS:
        raise QloraError(f"chat_format: {name!r} is not one of {', '.join(CHAT_FORMATS)}")
    if name == "auto":
        return "tokenizer" if getattr(tokenizer, "chat_template", None) else FALLBACK
    return name


def validate_chat(messages, loc) -> None:
    if not isinstance(messages, list) or not messages:
        raise QloraError(f"{loc()}: key 'messages' must be a non-empty list of {{role, content}}, "
                         f"got {type_name(messages)}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise QloraError(f"{loc()}: messages[{j}] must be an object with role and content, got {type_name(m)}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else type_name(m[key])
                raise QloraError(f"{loc()}: messages[{j}].{key} must be a string, got {got}")
    if not any(m["role"] == "assistant" for m in messages):
        raise QloraError(f"{loc()}: key 'messages' has no assistant message to learn from")


def render_chat(messages: list[dict], tokenizer, loc, chat_format: str = "auto") -> Segments:
    """Render with a named template, or (chat_format 'tokenizer') with the tokenizer's; see render_template."""
    chat_format = resolve_chat_format(chat_format, tokenizer)
    if chat_format != "tokenizer":
        return render_named(messages, chat_format)
    return render_template(messages, tokenizer, loc)


def render_named(messages: list[dict], name: str, generation_prompt: bool = False) -> Segments:
    """Segments of a named template; every non-empty assistant turn is a target (its EOS is added later).
    With generation_prompt, the prompt for the next answer follows (for inference)."""
    system, user, opener, answer = _NAMED[name]
    has_system = any(m["role"] == "system" for m in messages)
    segments: Segments = [] if has_system or name != "alpaca" else [(ALPACA_SYSTEM, False)]
    for m in messages:
        if m["role"] == "system":
            segments.append((system(m["content"]), False))
        elif m["role"] == "assistant":
            segments += [(opener, False), (answer(m["content"]), bool(m["content"].strip()))]
        else:  # user, or any other role the data names: it speaks to the model
            segments.append((user(m["content"]), False))
    if generation_prompt:
        segments.append((opener, False))
    return merge(segments)


def render_template(messages: list[dict], tokenizer, loc) -> Segments:
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
    return merge(segments)


def _apply_template(tokenizer, messages, generation_prompt: bool, loc) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise QloraError(f"{loc()}: the chat format needs a tokenizer with a chat template, and this one has none; "
                         "set chat_format to guanaco, alpaca or chatml (or use the completion or alpaca data format)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises TemplateError for e.g. roles the template rejects
        reason = " ".join(str(e).split())[:200]
        raise QloraError(f"{loc()}: the chat template rejected this conversation ({reason})") from None


def merge(segments: Segments) -> Segments:
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
