"""The chat format: `messages` rendered with a chat template, assistant turns learned.

The template is the tokenizer's own (`tokenizer`) or a named one for base models that ship none
(`guanaco`, `alpaca`, `chatml`); `auto` takes the tokenizer's when it has one, else guanaco, the
paper's format. Named templates render each turn to segments directly, so the mask is exact.
"""

from __future__ import annotations

from typing import get_args

from ..config import ChatFormat
from ..errors import QloraError
from .load import type_name

Segments = list[tuple[str, bool]]
CHAT_FORMATS = get_args(ChatFormat)  # the config's Literal is the one list
FALLBACK = "guanaco"  # what `auto` uses for a tokenizer without a chat template
ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
# name -> (system text -> prompt, user text -> prompt, the prompt that opens an answer, answer -> target)
_NAMED = {
    "guanaco": (lambda s: s, lambda u: f"### Human: {u}", "### Assistant:", lambda a: f" {a}"),
    "alpaca": (lambda s: s, lambda u: f"\n\n### Instruction:\n{u}", "\n\n### Response:\n", lambda a: a),
    "chatml": (lambda s: f"<|im_start|>system\n{s}<|im_end|>\n", lambda u: f"<|im_start|>user\n{u}<|im_end|>\n",
               "<|im_start|>assistant\n", lambda a: f"{a}<|im_end|>"),
}


def resolve_chat_format(name: str, tokenizer) -> str:
    """`auto` made concrete: the tokenizer's template when it has one, else the named fallback."""
    if name not in CHAT_FORMATS:
        raise QloraError(f"chat_format: {name!r} is not one of {', '.join(CHAT_FORMATS)}")
    if name == "auto":
        return "tokenizer" if getattr(tokenizer, "chat_template", None) else FALLBACK
    return name


def validate_chat(messages, loc) -> None:
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
