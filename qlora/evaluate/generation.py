"""Answers for a prompt set, written as JSONL with the settings that produced them.

Prompts: the Vicuna-bench shape (`question_id`, `category`, `turns[]`; turns after the first are
asked in the same conversation, after the model's previous answer) or any JSONL with `prompt`,
`question` or `instruction` (+ optional `input`). Each prompt goes through the model's chat
template; generation is qlora.generate (KV cache, greedy at temperature 0, seeded sampling).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

from ..errors import QloraError


def load_prompts(path: str, limit: int | None = None) -> list[dict]:
    """-> [{question_id, category, turns}] from either prompt shape."""
    from ..data.load import load_rows, where

    rows = load_rows(path)
    rows = rows[:limit] if limit else rows
    out = []
    for i, row in enumerate(rows):
        turns = row.get("turns")
        if turns is None:
            text = next((row[k] for k in ("prompt", "question", "instruction") if isinstance(row.get(k), str)), None)
            if text is None:
                raise QloraError(f"{where(rows, i, path)}: no prompt "
                                 "(expected 'turns', 'prompt', 'question' or 'instruction')")
            turns = [text + ("\n\n" + row["input"] if isinstance(row.get("input"), str) and row["input"] else "")]
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
            raise QloraError(f"{where(rows, i, path)}: 'turns' must be a non-empty list of strings")
        out.append(dict(question_id=row.get("question_id", i + 1), category=row.get("category"), turns=turns))
    return out


def answer_all(model, tokenizer, prompts: list[dict], settings, name: str, out_path: str | None = None,
               info: dict | None = None, progress: bool = True) -> list[dict]:
    """Answer every prompt (all turns); rows are written to `out_path` as they finish."""
    from tqdm.auto import tqdm

    from ..generate import generate

    rows, used = [], dict(asdict(settings), stop=list(settings.stop))  # as it reads back from JSON
    sink = open(out_path, "w", encoding="utf-8") if out_path else None
    try:
        for p in tqdm(prompts, desc="generating", unit="prompt", disable=not progress):
            conversation, answers = [], []
            start = time.perf_counter()
            for turn in p["turns"]:
                conversation.append({"role": "user", "content": turn})
                answer = generate(model, tokenizer, conversation, settings)
                conversation.append({"role": "assistant", "content": answer})
                answers.append(answer)
            row = dict(question_id=p["question_id"], category=p["category"], name=name, prompt="\n\n".join(p["turns"]),
                       turns=p["turns"], answers=answers, answer="\n\n".join(answers),
                       seconds=round(time.perf_counter() - start, 3), settings=used, **(info or {}))
            rows.append(row)
            if sink:
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()
    finally:
        if sink:
            sink.close()
    return rows
