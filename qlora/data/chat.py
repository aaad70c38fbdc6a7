"""The chat format: `messages` rendered with the tokenizer's chat template, assistant turns learned."""

from __future__ import annotations

from ..errors import QloraError
from .load import type_name

Segments = list[tuple[str, bool]]


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


def render_chat(messages: list[dict], tokenizer, loc) -> Segments:
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
                         "use the completion or alpaca format")
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
