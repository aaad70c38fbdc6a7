"""`qlora eval score`: answers scored 1-10 by a judge against a reference, as a % of the reference."""

from __future__ import annotations

import json
import os
import sys

from ..errors import QloraError


def register(verbs) -> None:
    p = verbs.add_parser("score", help="single-answer scores vs a reference answer file, as %% of the reference",
                         description="A judge (OpenAI-compatible endpoint, GPT-4 in the paper) scores each answer "
                         "and the reference answer to the same question 1-10, in both orders; the result is the "
                         "system's total as a percentage of the reference's (the paper's \"%% of ChatGPT\").")
    p.add_argument("answers", metavar="ANSWERS.jsonl", help="the system's answers (qlora eval generate)")
    p.add_argument("--reference", required=True, metavar="REF.jsonl", help="reference answers, same question ids")
    p.add_argument("--judge-url", required=True, help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1")
    p.add_argument("--judge-model", default="gpt-4", help="model name sent to the endpoint (default: gpt-4)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--limit", type=int, default=None, help="first N shared questions")
    p.add_argument("--output", metavar="FILE.json", help="write the scores (per question too) here")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluate.judge import ChatJudge
    from ..evaluate.pairwise import load_answers
    from ..evaluate.relative import score_all

    name, system = load_answers(args.answers)
    ref_name, reference = load_answers(args.reference)
    if not any(q in reference for q in system):
        raise QloraError(f"{args.answers}: no question id in common with {args.reference}")
    judge = ChatJudge(args.judge_url, args.judge_model, os.environ.get(args.api_key_env))
    result = dict(score_all(system, reference, judge.complete, args.limit), system=name, reference=ref_name)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    pct = result["percent_of_reference"]
    print(f"{name}: {'n/a' if pct is None else f'{pct:.1f}%'} of {ref_name} "
          f"({result['scored']} of {result['questions']} questions scored, {result['unparsed_replies']} replies "
          "without scores)")
    if result["unparsed_replies"]:
        print("some judge replies had no 'S1 S2' score line; they are left out", file=sys.stderr)
    return 0
