"""Zero-shot multiple choice: the choice with the highest log-likelihood given the context wins.

    acc      = mean[ argmax_i log P(choice_i | context_i) == gold ]
    acc_norm = mean[ argmax_i log P(choice_i | context_i) / len(choice_i) == gold ]

acc_norm divides by the length of the choice string in characters, exactly as lm-evaluation-harness
computes it (`len(choice)`; the same as bytes for ASCII text). Prompts follow the harness's tasks:
ARC and PIQA "Question: ...\\nAnswer:", HellaSwag "<activity>: <context>", each choice after a space;
WinoGrande scores the shared continuation after each filled-in context ("partial scoring").
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QloraError
from .scoring import loglikelihood


@dataclass
class Question:
    contexts: list[str]  # one per choice
    continuations: list[str]  # one per choice, scored after its context
    gold: int
    lengths: list[int]  # acc_norm divisors: len() of each choice string


@dataclass
class ChoiceResult:
    task: str
    acc: float
    acc_norm: float
    acc_stderr: float
    n: int
    correct: list[bool] = field(repr=False)
    correct_norm: list[bool] = field(repr=False)

    def to_dict(self, items: bool = False) -> dict:
        d = dict(task=self.task, acc=self.acc, acc_norm=self.acc_norm, acc_stderr=self.acc_stderr, n=self.n)
        if items:
            d.update(correct=self.correct, correct_norm=self.correct_norm)
        return d


def data_dir() -> Path:
    """Shared evaluation data: $QLORA_DATA, else ../shared/data beside the repository."""
    env = os.environ.get("QLORA_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def _same_context(context: str, choices: list[str], gold: int) -> Question:
    return Question([context] * len(choices), [" " + c for c in choices], gold, [len(c) for c in choices])


def _arc(row: dict) -> Question:
    query = row["query"] if row["query"].rstrip().endswith("Answer:") else row["query"] + "\nAnswer:"
    return _same_context(query, row["choices"], row["gold"])


def _query_choices_gold(row: dict) -> Question:
    return _same_context(row["query"], row["choices"], row["gold"])


def _piqa(row: dict) -> Question:
    return _same_context(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], row["label"])


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: dict) -> Question:
    context = _hellaswag_clean(f"{row['activity_label']}: {row['ctx']}")
    return _same_context(context, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


def _winogrande(row: dict) -> Question:
    options, cont = row["context_options"], row["continuation"]
    return Question(list(options), [" " + cont] * len(options), row["gold"], [len(cont)] * len(options))


# name -> (file under the data dir, row -> Question, keys the rows must have)
TASKS = {
    "arc_easy": ("eval/arc_easy_test.jsonl", _arc, ("query", "choices", "gold")),
    "arc_challenge": ("eval/arc_challenge_test.jsonl", _arc, ("query", "choices", "gold")),
    "piqa": ("eval/piqa_val.jsonl", _piqa, ("goal", "sol1", "sol2", "label")),
    "hellaswag": ("eval/hellaswag_val.jsonl", _hellaswag, ("activity_label", "ctx", "endings", "label")),
    "winogrande": ("eval/winogrande_dev.jsonl", _winogrande, ("context_options", "continuation", "gold")),
}
DEFAULT_TASKS = tuple(TASKS)


def load_task(task: str, limit: int | None = None) -> tuple[str, list[Question]]:
    """A task name (see TASKS) or a JSONL path with query/choices/gold rows -> (name, questions)."""
    from ..data.load import load_rows, where

    if task in TASKS:
        rel, build, keys = TASKS[task]
        path, name = data_dir() / rel, task
        if not path.is_file():
            raise QloraError(f"{path}: task data not found; set QLORA_DATA to the shared data directory "
                             "or pass a JSONL path")
    else:
        path, name, build, keys = Path(task), Path(task).stem, _query_choices_gold, ("query", "choices", "gold")
        if not path.is_file():
            raise QloraError(f"{task}: neither a task ({', '.join(TASKS)}) nor a file")
    rows = load_rows(str(path))
    rows = rows[:limit] if limit else rows
    questions = []
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise QloraError(f"{where(rows, i, str(path))}: missing key '{missing[0]}' (rows need {', '.join(keys)})")
        q = build(row)
        if not (isinstance(q.gold, int) and 0 <= q.gold < len(q.continuations)) or len(q.continuations) < 2:
            raise QloraError(f"{where(rows, i, str(path))}: gold must index one of >= 2 choices, got {q.gold!r}")
        questions.append(q)
    return name, questions


def evaluate_choice(model, tokenizer, questions: list[Question], task: str = "choice", batch_size: int = 8,
                    progress: bool = True) -> ChoiceResult:
    pairs = [(c, x) for q in questions for c, x in zip(q.contexts, q.continuations)]
    scores = iter(loglikelihood(model, tokenizer, pairs, batch_size, progress, desc=task))
    correct, correct_norm = [], []
    for q in questions:
        lls = [next(scores).logprob for _ in q.continuations]
        correct.append(_argmax(lls) == q.gold)
        correct_norm.append(_argmax([ll / max(n, 1) for ll, n in zip(lls, q.lengths)]) == q.gold)
    n = len(questions)
    acc = sum(correct) / n
    stderr = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else 0.0  # sample std / sqrt(n), as the harness
    return ChoiceResult(task, acc, sum(correct_norm) / n, stderr, n, correct, correct_norm)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first index on ties, like numpy
