"""The OpenAI wire format: validate a request body into prompt + settings, shape the replies.

Pure functions, no sockets: every bad request becomes an ApiError with an HTTP status and a
message naming the field, which the server sends as {"error": {"message", "type", "param", "code"}}.
Fields that would change the answer in ways we do not implement (n > 1, logprobs, penalties) are
refused rather than ignored; fields that don't (user, metadata, ...) are ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from ..errors import QloraError
from ..generate import GenerationSettings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Request:
    kind: str  # "chat" or "completion"
    prompt: str | list[dict]
    settings: GenerationSettings
    max_tokens_given: bool
    stream: bool
    include_usage: bool


def parse(body: bytes, kind: str, model_id: str, max_tokens_cap: int) -> Request:
    """Validate a /v1/chat/completions (kind "chat") or /v1/completions body."""
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(req, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_type(req)}")
    model = req.get("model", model_id)
    if not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string, got {_type(model)}", param="model")
    if model != model_id:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{model_id}' (GET /v1/models)",
                       param="model", code="model_not_found")
    _refuse_unsupported(req)
    prompt = _messages(req) if kind == "chat" else _completion_prompt(req)
    max_key = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in req else "max_tokens"
    max_tokens = _get(req, max_key, int, None)
    if max_tokens is not None and not 1 <= max_tokens <= max_tokens_cap:
        raise ApiError(400, f"'{max_key}' must be between 1 and {max_tokens_cap}, got {max_tokens}", param=max_key)
    stream = _get(req, "stream", bool, False)
    options = _get(req, "stream_options", dict, {}) or {}
    try:
        settings = GenerationSettings(
            max_new_tokens=max_tokens or min(GenerationSettings.max_new_tokens, max_tokens_cap),
            temperature=_number(req, "temperature", GenerationSettings.temperature, 0, 2),
            top_p=_number(req, "top_p", GenerationSettings.top_p, 0, 1),
            top_k=_get(req, "top_k", int, GenerationSettings.top_k),
            stop=_stop(req), seed=_get(req, "seed", int, None),
        )
    except QloraError as e:
        raise ApiError(400, str(e).removeprefix("generation settings: ")) from None
    return Request(kind, prompt, settings, max_tokens is not None, stream, bool(options.get("include_usage")))


def _refuse_unsupported(req: dict) -> None:
    if req.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    for key in ("logprobs", "echo"):
        if req.get(key):
            raise ApiError(400, f"'{key}' is not supported by this server", param=key)
    for key in ("presence_penalty", "frequency_penalty"):
        if req.get(key, 0) not in (0, 0.0, None):
            raise ApiError(400, f"'{key}' is not supported by this server (send 0 or leave it out)", param=key)


def _messages(req: dict) -> list[dict]:
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "missing" if messages is None else _type(messages) if not isinstance(messages, list) else "empty"
        raise ApiError(400, f"'messages' must be a non-empty array of {{role, content}} objects, got {got}",
                       param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object, got {_type(m)}", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {', '.join(ROLES)}, got {json.dumps(role)}",
                           param=f"{where}.role")
        out.append({"role": ROLES[role], "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(content, where: str) -> str:
    """A string, or the array form [{"type": "text", "text": ...}, ...] (text parts only)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"),
                                                                                                        str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"'{where}' must be a string or an array of text parts, got {_type(content)}", param=where)


def _completion_prompt(req: dict) -> str:
    prompt = req.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        got = ("missing" if prompt is None else "an array (one prompt per request)" if isinstance(prompt, list)
               else _type(prompt))
        raise ApiError(400, f"'prompt' must be a non-empty string, got {got}", param="prompt")
    return prompt


def _stop(req: dict) -> tuple[str, ...]:
    stop = req.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' must be a non-empty string or an array of up to {MAX_STOP_STRINGS} of them",
                       param="stop")
    return tuple(stop)


def _get(req: dict, key: str, kind: type, default):
    value = req.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, f"'{key}' must be {_NAMES[kind]}, got {_type(value)}", param=key)
    return value


def _number(req: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = req.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ApiError(400, f"'{key}' must be a number between {lo} and {hi}, got {json.dumps(value)}", param=key)
    return float(value)


_NAMES = {int: "an integer", bool: "a boolean", dict: "an object", str: "a string"}


def _type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# ---- replies ----


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def reply(kind: str, rid: str, model_id: str, text: str, finish: str, prompt_tokens: int,
          completion_tokens: int) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model_id, "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}


def chunk(kind: str, rid: str, model_id: str, text: str | None, finish: str | None, first: bool = False) -> dict:
    """One server-sent event of a streamed reply (text None: no choice, for the usage chunk)."""
    if kind == "chat":
        delta = ({"role": "assistant", "content": text} if first else {"content": text}) if text is not None else {}
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model_id, "choices": choices}


def models(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "qlora"}]}
