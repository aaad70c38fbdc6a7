"""Single-answer scores relative to a reference (the paper's "% of ChatGPT" on the Vicuna benchmark).

For each question a judge sees the reference answer and the system's answer and gives each an
overall score from 1 to 10 (the Vicuna evaluation prompt, as the QLoRA paper used it with GPT-4 and
ChatGPT as the reference). Each question is asked in both orders to cancel position bias, and the
result is the system's total score as a percentage of the reference's total:

    percent = 100 * sum(system scores) / sum(reference scores)
"""

from __future__ import annotations

import re
from collections.abc import Callable

SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
USER = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant 1's Answer]\n{answer_1}\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n[The End of Assistant 2's Answer]\n\n"
    "[System]\nWe would like to request your feedback on the performance of two AI assistants in response to "
    "the user question displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of details of "
    "their responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score "
    "indicates better overall performance.\nPlease first output a single line containing only two values "
    "indicating the scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the "
    "subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias "
    "and ensuring that the order in which the responses were presented does not affect your judgment."
)
_SCORE = r"(10(?:\.0+)?|[1-9](?:\.\d+)?)"
_PAIR = re.compile(rf"^\s*{_SCORE}\s*[ ,/]\s*{_SCORE}\s*$")


def messages(question: str, answer_1: str, answer_2: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER.format(question=question, answer_1=answer_1, answer_2=answer_2)}]


def parse_scores(text: str) -> tuple[float, float] | None:
    """The two 1-10 scores on the reply's first non-empty line ("8 6", "8.5, 6"); None if it has no such pair."""
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    m = _PAIR.match(first)
    return (float(m.group(1)), float(m.group(2))) if m else None


def score_all(system: dict[str, dict], reference: dict[str, dict], ask: Callable[[list[dict]], str],
              limit: int | None = None) -> dict:
    """Judge every question both answer files share (ids in file order of `system`), both orders.

    `ask(messages) -> reply text` is the judge (an OpenAI-compatible endpoint's chat completion)."""
    shared = [q for q in system if q in reference][:limit]
    rows, unparsed = [], 0
    for qid in shared:
        question = system[qid]["question"] or reference[qid]["question"] or ""
        mine, ref = system[qid]["answer"], reference[qid]["answer"]
        got = []
        for order in ("reference first", "system first"):
            pair = (ref, mine) if order == "reference first" else (mine, ref)
            scores = parse_scores(ask(messages(question, *pair)))
            if scores is None:
                unparsed += 1
                continue
            got.append(scores if order == "reference first" else scores[::-1])  # (reference, system)
        if got:
            rows.append({"question_id": qid, "reference": sum(r for r, _ in got) / len(got),
                         "system": sum(s for _, s in got) / len(got)})
    ref_total, sys_total = sum(r["reference"] for r in rows), sum(r["system"] for r in rows)
    return {"questions": len(shared), "scored": len(rows), "unparsed_replies": unparsed,
            "system_total": sys_total, "reference_total": ref_total,
            "percent_of_reference": round(100 * sys_total / ref_total, 2) if ref_total else None, "rows": rows}
