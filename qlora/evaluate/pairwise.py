"""Pairwise comparison of answer files: every pair of systems, on every shared question, in both
orders (the paper found GPT-4 favours whichever answer it reads first; asking twice with the order
swapped cancels that bias and shows how often the judge contradicts itself).

Judgments are appended to a JSONL file as they are made, so an interrupted session (a human
judge going for coffee, a rate-limited API) resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import QloraError
from .elo import Match


@dataclass
class Judgment:
    question_id: str
    first: str  # the system shown as answer A
    second: str  # the system shown as answer B
    winner: str | None  # a system name, "tie", or None (no verdict parsed)
    raw: str = ""

    def key(self) -> tuple[str, str, str]:
        return (self.question_id, self.first, self.second)


def answer_text(row: dict) -> str | None:
    """The answer in our generation rows (`answer`), FastChat's (`choices[0].turns`), or `output`/`response`."""
    for key in ("answer", "output", "response", "completion"):
        if isinstance(row.get(key), str):
            return row[key]
    choices = row.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        turns = choices[0].get("turns")
        if isinstance(turns, list) and turns:
            return "\n\n".join(map(str, turns))
    return None


def question_text(row: dict) -> str | None:
    for key in ("prompt", "question", "instruction"):
        if isinstance(row.get(key), str):
            return row[key]
    turns = row.get("turns")
    return "\n\n".join(map(str, turns)) if isinstance(turns, list) and turns else None


def load_answers(path: str) -> tuple[str, dict[str, dict]]:
    """-> (system name, question id -> {question, answer}). The name is the rows' `name` or the file stem."""
    from ..data.load import load_rows, where

    rows = load_rows(path)
    out: dict[str, dict] = {}
    for i, row in enumerate(rows):
        qid = row.get("question_id", i)
        answer = answer_text(row)
        if answer is None:
            raise QloraError(f"{where(rows, i, path)}: no answer "
                             "(expected key 'answer', 'output' or FastChat 'choices')")
        out[str(qid)] = dict(question=question_text(row), answer=answer)
    name = rows[0].get("name") if isinstance(rows[0].get("name"), str) else Path(path).stem
    return name, out


def read_judgments(path: str | None) -> list[Judgment]:
    if not path or not Path(path).is_file():
        return []
    from ..data.load import load_rows

    return [Judgment(str(r["question_id"]), r["first"], r["second"], r.get("winner"), r.get("raw", ""))
            for r in load_rows(path)]


def judge_all(systems: dict[str, dict[str, dict]], judge: Callable, questions: dict[str, str] | None = None,
              log: str | None = None, both_orders: bool = True, limit: int | None = None,
              progress: bool = True) -> list[Judgment]:
    """Judge each pair of systems on each question they all answered; `log` is read and appended to."""
    from tqdm.auto import tqdm

    names = sorted(systems)
    if len(names) < 2:
        raise QloraError("pairwise judging needs at least two answer files with different names")
    shared = sorted(set.intersection(*(set(s) for s in systems.values())), key=_natural)
    if not shared:
        raise QloraError("the answer files share no question_id; were they generated from the same prompts?")
    shared = shared[:limit] if limit else shared
    done = {j.key(): j for j in read_judgments(log)}
    todo = [(q, a, b) for q in shared for x, y in itertools.combinations(names, 2)
            for a, b in ((x, y), (y, x))[: 2 if both_orders else 1]]
    out = []
    sink = open(log, "a", encoding="utf-8") if log else None
    try:
        for q, a, b in tqdm(todo, desc="judging", unit="pair", disable=not progress):
            if (q, a, b) in done:
                out.append(done[(q, a, b)])
                continue
            question = (questions or {}).get(q) or systems[a][q]["question"] or ""
            v = judge(question, systems[a][q]["answer"], systems[b][q]["answer"])
            winner = {"A": a, "B": b}.get(v.winner, v.winner)
            j = Judgment(q, a, b, winner, v.raw)
            out.append(j)
            if sink:
                sink.write(json.dumps(asdict(j), ensure_ascii=False) + "\n")
                sink.flush()
    finally:
        if sink:
            sink.close()
    return out


def to_matches(judgments: list[Judgment]) -> list[Match]:
    """Each judgment is one Elo match; judgments without a verdict are left out."""
    out = []
    for j in judgments:
        if j.winner is None:
            continue
        score = 1.0 if j.winner == j.first else 0.0 if j.winner == j.second else 0.5
        out.append(Match(j.first, j.second, score))
    return out


def consistency(judgments: list[Judgment]) -> dict:
    """How often the two orders of a pair agree, and how often the first-shown answer wins."""
    by_pair: dict[tuple, list[Judgment]] = {}
    for j in judgments:
        by_pair.setdefault((j.question_id, *sorted((j.first, j.second))), []).append(j)
    both = [v for v in by_pair.values() if len(v) == 2 and all(x.winner for x in v)]
    agree = sum(v[0].winner == v[1].winner for v in both)
    decided = [j for j in judgments if j.winner not in (None, "tie")]
    first = sum(j.winner == j.first for j in decided)
    return dict(pairs_both_orders=len(both), agree=agree, agreement=agree / len(both) if both else None,
                first_wins=first / len(decided) if decided else None,
                no_verdict=sum(j.winner is None for j in judgments))


def _natural(qid: str):
    return (0, int(qid), "") if qid.isdigit() else (1, 0, qid)


def tournament(judgments: list[Judgment], rounds: int = 10_000, seed: int = 0) -> tuple[dict, str]:
    """Elo (mean and 95% interval over `rounds` orders), win/tie/loss counts and judge consistency
    -> (JSON payload, markdown)."""
    from .elo import elo_tournament, win_table
    from .report import markdown_table

    matches = to_matches(judgments)
    if not matches:
        raise QloraError("no judgment has a verdict; nothing to rate (check the judge's replies in the judgments file)")
    elo = elo_tournament(matches, rounds, seed)
    wins = win_table(matches)
    ranked = sorted(elo.models, key=lambda m: -elo.mean[m])
    elo_md = markdown_table(["rank", "system", "Elo", "95% interval", "wins", "ties", "losses"], [
        [i + 1, m, f"{elo.mean[m]:.0f}", f"{elo.low[m]:.0f} – {elo.high[m]:.0f}",
         *[sum(cell[k] for cell in wins[m].values()) for k in range(3)]] for i, m in enumerate(ranked)])
    pair_md = markdown_table(["system", "opponent", "wins", "ties", "losses", "win rate"], [
        [m, o, *wins[m][o], f"{(wins[m][o][0] + 0.5 * wins[m][o][1]) / sum(wins[m][o]):.3f}"]
        for m in ranked for o in ranked if o in wins[m]])
    cons = consistency(judgments)
    note = (f"{len(matches)} matches ({cons['no_verdict']} judgments without a verdict left out); "
            f"the two orders agree on {cons['agree']}/{cons['pairs_both_orders']} pairs; "
            f"the answer shown first wins {_pct(cons['first_wins'])} of decided judgments.")
    payload = dict(elo.to_dict(), wins={m: {o: dict(zip(("wins", "ties", "losses"), c)) for o, c in row.items()}
                                        for m, row in wins.items()}, consistency=cons)
    return payload, f"{elo_md}\n\n{pair_md}\n\n{note}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"
