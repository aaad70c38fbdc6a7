"""MMLU 5-shot (Hendrycks et al. 2021), in the format the QLoRA paper evaluates with:

    The following are multiple choice questions (with answers) about {subject}.

    {dev question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {letter}\\n\\n   (x 5, the subject's dev set)
    {test question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:

The prediction is the argmax over the logits of the four answer-letter tokens at the next position
(for SmolLM2 " A", " B", " C", " D" are single tokens). Tokenizers that split " A" into several
tokens are handled by scoring the letter's last token after the shared prefix (e.g. "Ġ" then "A"
for a byte-level tokenizer). Reported: accuracy over all questions (as Hendrycks' "average") and
the mean of per-subject accuracies.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from ..errors import QloraError
from .choice import data_dir
from .scoring import encode, max_length, next_token_logprobs, pad_token_id

LETTERS = ("A", "B", "C", "D")


@dataclass
class MMLUResult:
    accuracy: float  # over all questions
    subject_mean: float  # mean of per-subject accuracies
    n: int
    subjects: dict[str, dict] = field(default_factory=dict)  # subject -> {accuracy, n}
    correct: list[bool] = field(default_factory=list, repr=False)

    def to_dict(self, items: bool = False) -> dict:
        d = dict(accuracy=self.accuracy, subject_mean=self.subject_mean, n=self.n, subjects=self.subjects)
        return {**d, "correct": self.correct} if items else d


def format_example(row: dict, answer: bool) -> str:
    lines = [row["question"]] + [f"{L}. {c}" for L, c in zip(LETTERS, row["choices"])]
    text = "\n".join(lines) + "\nAnswer:"
    return text + f" {LETTERS[row['answer']]}\n\n" if answer else text


def prompt(subject: str, shots: list[dict], row: dict) -> str:
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return head + "".join(format_example(s, True) for s in shots) + format_example(row, False)


def answer_tokens(tokenizer) -> list[int]:
    """The token id that ends each of "Answer: A" .. "Answer: D" (all four share what precedes it)."""
    probes = [encode(tokenizer, f"Answer: {L}") for L in LETTERS]
    if any(p[:-1] != probes[0][:-1] for p in probes) or len({p[-1] for p in probes}) != 4:
        raise QloraError("this tokenizer merges the answer letters with their neighbours; MMLU letter scoring needs "
                         "' A'..' D' to end in one distinct token each")
    return [p[-1] for p in probes]


def load_mmlu(limit: int | None = None, subjects: list[str] | None = None) -> tuple[dict, list[dict]]:
    """-> (subject -> dev rows, test rows); `limit` = questions per subject."""
    from ..data.load import load_rows

    root = data_dir() / "eval"
    for name in ("mmlu_dev.jsonl", "mmlu_test.jsonl"):
        if not (root / name).is_file():
            raise QloraError(f"{root / name}: MMLU data not found; set QLORA_DATA to the shared data directory")
    dev: dict[str, list[dict]] = defaultdict(list)
    for row in load_rows(str(root / "mmlu_dev.jsonl")):
        dev[row["subject"]].append(row)
    test, seen = [], defaultdict(int)
    for row in load_rows(str(root / "mmlu_test.jsonl")):
        s = row["subject"]
        if (subjects and s not in subjects) or (limit and seen[s] >= limit):
            continue
        seen[s] += 1
        test.append(row)
    if subjects and set(subjects) - set(seen):
        raise QloraError(f"unknown MMLU subject(s): {', '.join(sorted(set(subjects) - set(seen)))}")
    return dev, test


def evaluate_mmlu(model, tokenizer, dev: dict[str, list[dict]], test: list[dict], shots: int = 5,
                  batch_size: int = 4, progress: bool = True) -> MMLUResult:
    letters = answer_tokens(tokenizer)
    limit = max_length(model)
    seqs = []
    for row in test:
        k = shots
        while True:  # drop shots until the prompt fits (Hendrycks' rule)
            # the prompt's tokens up to the letter, shared prefix (e.g. a lone space token) included
            ids = encode(tokenizer, prompt(row["subject"], dev[row["subject"]][:k], row) + " A")[:-1]
            if len(ids) <= limit or k == 0:
                break
            k -= 1
        seqs.append(ids[-limit:])
    logp = next_token_logprobs(model, seqs, letters, pad_token_id(tokenizer), batch_size, progress, desc="mmlu")
    pred = logp.argmax(-1).tolist()
    correct = [p == row["answer"] for p, row in zip(pred, test)]
    per: dict[str, list[bool]] = defaultdict(list)
    for ok, row in zip(correct, test):
        per[row["subject"]].append(ok)
    subjects = {s: dict(accuracy=sum(v) / len(v), n=len(v)) for s, v in sorted(per.items())}
    mean = sum(d["accuracy"] for d in subjects.values()) / len(subjects)
    return MMLUResult(sum(correct) / len(correct), mean, len(correct), subjects, correct)
