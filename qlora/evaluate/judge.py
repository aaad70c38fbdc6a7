"""Judges for pairwise comparison: given a question and answers A and B, say "A", "B" or "tie".

Three kinds, one call signature `judge(question, answer_a, answer_b) -> Verdict`:
- `ChatJudge`: any OpenAI-compatible chat endpoint (GPT-4 as in the paper, `qlora serve`, vLLM ...),
  asked with an MT-bench-style pairwise prompt that ends in "[[A]]", "[[B]]" or "[[C]]" (tie);
- `LocalJudge`: a model loaded through qlora; the verdict is the most likely of the tokens
  "A", "B", "C" after the same prompt and an opened "[[";
- `HumanJudge`: a person at a terminal.
Position bias is handled by the caller (`pairwise.judge_all` asks every pair in both orders).
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import QloraError

SYSTEM = (
    "You are an impartial judge. Compare the two AI assistant answers to the user question below and "
    "decide which one follows the instructions and answers the question better: consider helpfulness, "
    "relevance, accuracy, depth and level of detail. The order in which the answers appear and their "
    "length must not influence you, nor the assistants' names. Explain briefly, then give your final "
    'verdict in exactly this form: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, '
    '"[[C]]" for a tie.'
)
USER = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
_VERDICT = re.compile(r"\[\[([ABC])\]\]")
_WINNER = {"A": "A", "B": "B", "C": "tie"}


@dataclass
class Verdict:
    winner: str | None  # "A", "B", "tie"; None: the judge's reply had no verdict
    raw: str  # the judge's text, or its token log-probabilities


def messages(question: str, answer_a: str, answer_b: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER.format(question=question, answer_a=answer_a, answer_b=answer_b)}]


def parse_verdict(text: str) -> str | None:
    """The last "[[A]]"/"[[B]]"/"[[C]]" in the text (judges explain first, decide last)."""
    found = _VERDICT.findall(text)
    return _WINNER[found[-1]] if found else None


class ChatJudge:
    """POST {url}/chat/completions (or `url` itself when it already ends so), temperature 0."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 2, max_tokens: int = 512):
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.max_tokens = retries, max_tokens

    def __call__(self, question: str, answer_a: str, answer_b: str) -> Verdict:
        text = self.complete(messages(question, answer_a, answer_b))
        return Verdict(parse_verdict(text), text)

    def complete(self, msgs: list[dict]) -> str:
        """The endpoint's reply to any prompt (also the single-answer scorer's judge)."""
        body = dict(model=self.model, messages=msgs, temperature=0.0, max_tokens=self.max_tokens)
        return self._post(body)["choices"][0]["message"]["content"] or ""

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:200]
                if e.code in (429, 500, 502, 503) and attempt < self.retries:
                    time.sleep(2.0 * (attempt + 1))  # rate limit or busy server: back off and retry
                    continue
                raise QloraError(f"{self.url}: HTTP {e.code} from the judge endpoint ({detail})") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt < self.retries:
                    time.sleep(2.0 * (attempt + 1))
                    continue
                reason = getattr(e, "reason", e)
                raise QloraError(f"{self.url}: cannot reach the judge endpoint ({reason}); "
                                 "is the server running?") from None
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise QloraError(f"{self.url}: the judge endpoint did not answer JSON; "
                                 "is it OpenAI-compatible?") from None
        raise AssertionError("unreachable")


class LocalJudge:
    """The judging prompt through a local model's chat template, then "[[": compare P(A), P(B), P(C)."""

    def __init__(self, model, tokenizer):
        from .scoring import encode

        self.model, self.tokenizer = model, tokenizer
        probes = [encode(tokenizer, f"[[{L}") for L in "ABC"]
        if any(p[:-1] != probes[0][:-1] for p in probes) or len({p[-1] for p in probes}) != 3:
            raise QloraError("the judge model's tokenizer merges '[[' with the verdict letter; use another judge model")
        self.letters = [p[-1] for p in probes]

    def prompt_ids(self, question: str, answer_a: str, answer_b: str) -> list[int]:
        from .scoring import encode

        msgs = messages(question, answer_a, answer_b)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in msgs) + "\n\n"
        return encode(self.tokenizer, text + "Verdict: [[A")[:-1]

    def __call__(self, question: str, answer_a: str, answer_b: str) -> Verdict:
        from .scoring import next_token_logprobs, pad_token_id

        ids = self.prompt_ids(question, answer_a, answer_b)
        logp = next_token_logprobs(self.model, [ids], self.letters, pad_token_id(self.tokenizer), progress=False)[0]
        winner = "ABC"[int(logp.argmax())]
        return Verdict(_WINNER[winner], json.dumps({L: round(float(v), 4) for L, v in zip("ABC", logp)}))


class HumanJudge:
    """Show both answers, read a/b/t from the terminal. `ask` and `show` are injectable for tests."""

    def __init__(self, ask: Callable[[str], str] = input, show: Callable[[str], None] = print):
        self.ask, self.show = ask, show

    def __call__(self, question: str, answer_a: str, answer_b: str) -> Verdict:
        rule = "-" * 72
        self.show(f"{rule}\nQUESTION\n{question}\n{rule}\nANSWER A\n{answer_a}\n{rule}\nANSWER B\n{answer_b}\n{rule}")
        while True:
            reply = self.ask("Which answer is better? [a] A, [b] B, [t] tie, [q] quit: ").strip().lower()
            if reply in ("a", "b"):
                return Verdict(reply.upper(), reply)
            if reply in ("t", "tie", "c"):
                return Verdict("tie", reply)
            if reply in ("q", "quit"):
                raise KeyboardInterrupt
            self.show("please type a, b, t or q")
