import json

import pytest
import torch

from qlora.errors import QloraError
from qlora.evaluate.mmlu import answer_tokens, evaluate_mmlu, format_example, load_mmlu, prompt

from .helpers import Bigram

V = 260


def _row(subject, q, answer):
    return {"subject": subject, "question": q, "choices": ["w", "x", "y", "z"], "answer": answer}


def test_prompt_is_the_papers_format():
    dev = [_row("high_school_physics", "Dev?", 3)]
    text = prompt("high_school_physics", dev, _row("high_school_physics", "Test?", 0))
    assert text == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Dev?\nA. w\nB. x\nC. y\nD. z\nAnswer: D\n\n"
        "Test?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    )
    assert format_example(dev[0], False).endswith("\nAnswer:")


def test_answer_tokens_of_a_byte_tokenizer(byte_tokenizer):
    # byte-level: " A" is two tokens, space then "A"; the letter is the last one
    ids = answer_tokens(byte_tokenizer)
    assert ids == [byte_tokenizer(L, add_special_tokens=False)["input_ids"][0] for L in "ABCD"]


def _write(tmp_path, dev, test):
    (tmp_path / "eval").mkdir()
    for name, rows in (("mmlu_dev.jsonl", dev), ("mmlu_test.jsonl", test)):
        (tmp_path / "eval" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_argmax_over_letters_and_per_subject_accuracy(tmp_path, monkeypatch, byte_tokenizer):
    dev = [_row(s, f"d{i}", i % 4) for s in ("algebra", "law") for i in range(5)]
    test = [_row("algebra", "q1", 2), _row("algebra", "q2", 0), _row("law", "q3", 2), _row("law", "q4", 2),
            _row("law", "q5", 1)]
    _write(tmp_path, dev, test)
    monkeypatch.setenv("QLORA_DATA", str(tmp_path))
    dev_by_subject, rows = load_mmlu()
    assert len(rows) == 5 and len(dev_by_subject["law"]) == 5
    c = byte_tokenizer("C", add_special_tokens=False)["input_ids"][0]
    probs = torch.full((V, V), 1.0)
    probs[:, c] = 5.0  # the model always answers C
    model = Bigram(probs / probs.sum(-1, keepdim=True))
    r = evaluate_mmlu(model, byte_tokenizer, dev_by_subject, rows, progress=False)
    assert r.correct == [True, False, True, True, False]
    assert r.subjects == {"algebra": {"accuracy": 0.5, "n": 2}, "law": {"accuracy": pytest.approx(2 / 3), "n": 3}}
    assert r.accuracy == pytest.approx(3 / 5) and r.subject_mean == pytest.approx((0.5 + 2 / 3) / 2)
    _, limited = load_mmlu(limit=1, subjects=["law"])
    assert [x["question"] for x in limited] == ["q3"]
    with pytest.raises(QloraError, match="unknown MMLU subject"):
        load_mmlu(subjects=["astrology"])
