"""Sampling with a KV cache: one prompt in, text out, token by token.

The loop is ours rather than `model.generate` so that streaming needs no thread, stop strings never
leak into the output, and a seed fixes the result: sampling draws from a private torch.Generator,
never the global RNG. The prompt is run once through the model's forward; then each step feeds
one token, through qlora/decoder.py's compiled step and its own KV cache for llama-family 4-bit
models, else through the model's forward again with the cache it returned (a transformers Cache).

    prompt (text | chat messages | token ids) -> ids -> prefill -> [pick, decode, step]* -> text
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .decoder import decoder as llama_decoder
from .errors import QloraError

Prompt = str | list[dict] | list[int]


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    """Most tokens to generate."""
    temperature: float = 0.0
    """Softmax temperature; 0 = greedy (always the most likely token)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    stop: tuple[str, ...] = ()
    """Strings that end the answer; they are not included in it."""
    seed: int | None = None
    """Seed of the sampler (same seed, same prompt, same model -> same text). None: random."""

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0, "max_new_tokens must be an integer > 0"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise QloraError(f"generation settings: {message}")


@dataclass
class Delta:
    """A piece of generated text. The last one has `finish_reason` ("stop" or "length") and the counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def load_model(model: str | None = None, adapters=(), quant_type: str | None = None,
               compute_dtype: torch.dtype | str = torch.bfloat16, device: str = "cpu", *,
               blocksize: int | None = None, double_quant: bool | None = None):
    """The one loader for inference (generate, chat, serve, eval, merge, export): a 4-bit base with
    adapters applied live. The base is quantized as the (first) adapter was trained on
    (adapters.recorded_quant), each setting given here (not None) replacing the recorded one.
    `compute_dtype`: a torch dtype, a name or alias, or "auto" (qlora.precision)."""
    from . import hf
    from .adapters import recorded_lora_init, recorded_quant

    quant = recorded_quant(adapters).replace(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    try:
        quant.check()
    except ValueError as e:
        raise QloraError(str(e)) from None
    # LoftQ / PiSSA: re-derive, from the original weights, the base the adapter trained on
    return hf.load(model, quant, compute_dtype=compute_dtype, adapters=list(adapters), device=device,
                   lora_init=recorded_lora_init(adapters))


def context_length(model) -> int | None:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Text is tokenized as training tokenizes a prompt (with the tokenizer's BOS if it adds one);
    messages go through the chat template with the assistant turn opened; ids pass through."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise QloraError("chat messages need a tokenizer with a chat template, and this one has none; send plain text")
    try:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja TemplateError, e.g. a role the template rejects
        raise QloraError(f"the chat template rejected these messages ({' '.join(str(e).split())[:200]})") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate(model, tokenizer, prompt: Prompt, settings: GenerationSettings | None = None) -> str:
    """The whole answer as one string."""
    return "".join(d.text for d in stream(model, tokenizer, prompt, settings))


def stream(model, tokenizer, prompt: Prompt, settings: GenerationSettings | None = None,
           cancel: Callable[[], bool] | None = None) -> Iterator[Delta]:
    """Yield the answer piece by piece; the last Delta carries finish_reason and token counts.
    `cancel()` is polled between tokens (a server shutting down, a client gone)."""
    s = settings or GenerationSettings()
    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise QloraError("the prompt is empty")
    budget = s.max_new_tokens
    limit = context_length(model)
    if limit is not None:
        if len(ids) >= limit:
            raise QloraError(f"the prompt has {len(ids)} tokens; this model's context is {limit}: shorten it")
        budget = min(budget, limit - len(ids))
    eos = _eos_ids(model, tokenizer)
    decoder = _Detokenizer(tokenizer, s.stop)
    finish, n = "length", 0
    for token in sample(model, ids, s, budget, cancel):
        if token in eos:
            finish = "stop"
            break
        n += 1
        text, stopped = decoder.push(token)
        if text:
            yield Delta(text)
        if stopped:
            finish = "stop"
            break
    yield Delta(decoder.flush(), finish, len(ids), n)


def sample(model, ids: list[int], s: GenerationSettings, budget: int,
           cancel: Callable[[], bool] | None = None) -> Iterator[int]:
    """Up to `budget` token ids after `ids`: the prompt runs once, then one token per step against
    the KV cache. The next step is computed only when the caller asks for the next token."""
    with torch.inference_mode():  # entered around each forward only: a yield must not leak the mode to the caller
        out = model(input_ids=torch.tensor([ids], device=_device(model)), use_cache=True, logits_to_keep=1)
    yield from _continue(model, out, 0, len(ids), s, budget, cancel)


def sample_many(model, prompts: list[list[int]], s: GenerationSettings, budget: int,
                batch: int = 16) -> Iterator[tuple[int, Iterator[int]]]:
    """(index, tokens) for every prompt, the tokens as `sample(model, prompts[index], ...)` gives them,
    prompts of one length prefilled together (one forward over the weights for up to `batch` of
    them: the 4-bit weights are dequantized once, and the per-call overhead is paid once). Indices
    come grouped by length; read each token iterator before asking for the next pair. Batched
    matmuls may round differently from one prompt's, so a greedy near-tie can go the other way."""
    if llama_decoder(model, 2) is None:  # the model's own decode continues from its cache: one row each
        for i, ids in enumerate(prompts):
            yield i, sample(model, ids, s, budget)
        return
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    for length, indices in by_length.items():
        for start in range(0, len(indices), batch):
            chunk = indices[start : start + batch]
            with torch.inference_mode():
                out = model(input_ids=torch.tensor([prompts[i] for i in chunk], device=_device(model)),
                            use_cache=True, logits_to_keep=1)
            for row, i in enumerate(chunk):
                yield i, _continue(model, out, row, length, s, budget, None)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _continue(model, out, row: int, length: int, s: GenerationSettings, budget: int,
              cancel: Callable[[], bool] | None) -> Iterator[int]:
    """The tokens after a prefilled prompt: row `row` of the forward output `out` (logits and cache)."""
    device = _device(model)
    gen = torch.Generator(device=device)
    if s.seed is None:
        gen.seed()  # nondeterministic, and leaves the global RNG alone
    else:
        gen.manual_seed(s.seed)
    with torch.inference_mode():
        step = llama_decoder(model, length + budget) if budget > 1 else None  # None: the model's forward
        if step is not None:
            step.load(out.cache, length, row)
    logits, token = out.logits[row, -1], None
    for i in range(budget):
        if cancel and cancel():
            return
        token = pick(logits, s, gen) if logits is not None else token
        yield token
        if i + 1 < budget:
            with torch.inference_mode():
                if step is not None and s.temperature <= 0:
                    logits, token = None, step.greedy(token)  # the argmax, without all the logits
                elif step is not None:
                    logits = step.step(token)
                else:
                    out = model(input_ids=torch.tensor([[token]], device=device), cache=out.cache, use_cache=True)
                    logits = out.logits[0, -1]


def pick(logits: torch.Tensor, s: GenerationSettings, gen: torch.Generator) -> int:
    """Next token from a (vocab,) logit row: greedy at temperature 0, else temperature -> top-k ->
    top-p -> sample (the order transformers applies them in)."""
    if s.temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / s.temperature
    if 0 < s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= s.top_p  # the more likely tokens already hold >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


class _Detokenizer:
    """Incremental decoding: text of the tokens so far, released only when it is final.

    Decoding a window [prefix, new) and subtracting the prefix's text keeps leading spaces right
    for SentencePiece vocabularies; a trailing U+FFFD means a multi-byte character is incomplete.
    Text that could be the start of a stop string is held back until it cannot be."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0  # token offsets of the decode window
        self.pending = ""  # decoded, not yet released
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> tuple[str, bool]:
        """-> (text to release now, whether a stop string was hit)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return "", False
        self.pending += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def _release(self, final: bool = False) -> tuple[str, bool]:
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            text, self.pending = self.pending[: min(hits)], ""
            return text, True
        partial = (k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k]))
        hold = 0 if final else max(partial, default=0)
        cut = len(self.pending) - hold
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False

    def flush(self) -> str:
        """Everything not yet released, at the end: held-back text, an incomplete character."""
        if self.stopped:
            return ""
        self.pending += self._decode(self.ids[self.prefix:])[len(self._decode(self.ids[self.prefix:self.read])):]
        self.read = len(self.ids)
        return self._release(final=True)[0]
