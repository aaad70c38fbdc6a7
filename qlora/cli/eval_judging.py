"""`qlora eval judge` and `qlora eval elo`: pairwise judging of answer files and Elo ratings.

Registered by qlora.cli.eval (its own file: that one is full); shares eval's public flag and output helpers.
"""

from __future__ import annotations

import argparse
import os

from ..errors import QloraError
from .eval import add_common, add_quant_args, finish, load


def register(verbs) -> None:
    _register_judge(verbs)
    _register_elo(verbs)


# ---- pairwise judging and Elo ----

def _register_judge(verbs) -> None:
    p = verbs.add_parser("judge", help="judge answer files pairwise (both orders) and rate them with Elo",
                         description="Every pair of systems on every shared question, each pair in both orders. "
                         "Judges: an OpenAI-compatible endpoint (--judge api), a local model through qlora "
                         "(--judge local: the model flags pick it), or you (--judge human).")
    p.add_argument("answers", nargs="+", metavar="ANSWERS.jsonl", help="two or more answer files (qlora eval generate)")
    p.add_argument("--judge", choices=("api", "local", "human"), default="local", help="who judges (default: local)")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL for --judge api, e.g. https://api.openai.com/v1")
    p.add_argument("--judge-model", default="gpt-4", help="model name sent to the endpoint (default: gpt-4)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default: OPENAI_API_KEY)")
    p.add_argument("--judgments", metavar="FILE.jsonl",
                   help="append each judgment here and skip those already in it "
                   "(default: OUTPUT.judgments.jsonl with --output)")
    p.add_argument("--one-order", action="store_true", help="judge each pair once, not in both orders")
    add_elo_args(p)
    add_quant_args(p)
    add_common(p, "first N shared questions", batch_size=None)  # a local judge answers one pair at a time
    p.set_defaults(func=_run_judge)


def add_elo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=10_000, help="random match orders for Elo (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the match orders (default: 0)")
    p.add_argument("--markdown", metavar="FILE.md", help="also write the tables as markdown")


def _judge_from(args):
    from ..evaluate.judge import ChatJudge, HumanJudge, LocalJudge

    if args.judge == "api":
        if not args.judge_url:
            raise QloraError("--judge api needs --judge-url (an OpenAI-compatible base URL)")
        return ChatJudge(args.judge_url, args.judge_model, os.environ.get(args.api_key_env))
    if args.judge == "human":
        return HumanJudge()
    return LocalJudge(*load(args))


def _run_judge(args) -> int:
    from ..evaluate.pairwise import judge_all, load_answers, tournament

    if args.rounds < 1:
        raise QloraError(f"--rounds must be >= 1, got {args.rounds}")
    systems = {}
    for path in args.answers:
        name, answers = load_answers(path)
        if name in systems:
            raise QloraError(f"{path}: system name '{name}' is used by two answer files; rename one (key 'name')")
        systems[name] = answers
    log = args.judgments or (f"{args.output.removesuffix('.json')}.judgments.jsonl" if args.output else None)
    judge = _judge_from(args)
    judgments = judge_all(systems, judge, log=log, both_orders=not args.one_order, limit=args.limit,
                          progress=args.progress and args.judge != "human")
    payload, table = tournament(judgments, args.rounds, args.seed)
    payload.update(judge=args.judge, judge_model=args.judge_model if args.judge == "api" else None,
                   judgments_file=log, answers=args.answers)
    _write_md(args, table)
    return finish(args, payload, table)


def _write_md(args, table: str) -> None:
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table + "\n")


def _register_elo(verbs) -> None:
    p = verbs.add_parser("elo", help="Elo ratings and win/tie/loss tables from judgment files",
                         description="Elo as in the paper: start 1000, K=32, mean and 95% interval "
                         "over random match orders.")
    p.add_argument("judgments", nargs="+", metavar="JUDGMENTS.jsonl", help="files written by `qlora eval judge`")
    add_elo_args(p)
    p.add_argument("--output", metavar="FILE.json", help="also write the results as JSON")
    p.set_defaults(func=_run_elo)


def _run_elo(args) -> int:
    from ..evaluate.pairwise import read_judgments, tournament

    if args.rounds < 1:
        raise QloraError(f"--rounds must be >= 1, got {args.rounds}")
    judgments = []
    for path in args.judgments:
        if not os.path.isfile(path):
            raise QloraError(f"{path}: no such judgments file")
        judgments += read_judgments(path)
    payload, table = tournament(judgments, args.rounds, args.seed)
    _write_md(args, table)
    return finish(args, dict(payload, judgments_files=args.judgments), table)
