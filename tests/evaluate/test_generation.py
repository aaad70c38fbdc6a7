import json

import pytest

from qlora.errors import QloraError
from qlora.evaluate import generation
from qlora.evaluate.pairwise import answer_text, load_answers, question_text
from qlora.generate import GenerationSettings


def test_load_prompts_accepts_both_shapes(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question_id": 7, "category": "math", "turns": ["a", "b"]}\n'
                    '{"instruction": "Sum", "input": "1 2"}\n{"prompt": "hi"}\n')
    rows = generation.load_prompts(str(path))
    assert rows == [dict(question_id=7, category="math", turns=["a", "b"]),
                    dict(question_id=2, category=None, turns=["Sum\n\n1 2"]),
                    dict(question_id=3, category=None, turns=["hi"])]
    path.write_text('{"text": "no prompt here"}\n')
    with pytest.raises(QloraError, match="p.jsonl:1: no prompt"):
        generation.load_prompts(str(path))


def test_later_turns_see_the_earlier_answers(tmp_path, monkeypatch):
    seen = []

    def fake_generate(model, tokenizer, conversation, settings):
        seen.append([m["content"] for m in conversation])
        return f"answer{len(seen)}"

    monkeypatch.setattr("qlora.generate.generate", fake_generate)
    out = tmp_path / "answers.jsonl"
    prompts = [dict(question_id=1, category="c", turns=["q1", "q2"])]
    rows = generation.answer_all(None, None, prompts, GenerationSettings(max_new_tokens=5), "sys", str(out),
                                 info={"model": "m"}, progress=False)
    assert seen == [["q1"], ["q1", "answer1", "q2"]]
    saved = json.loads(out.read_text())
    assert saved == rows[0] and saved["answers"] == ["answer1", "answer2"] and saved["settings"]["max_new_tokens"] == 5
    assert (saved["name"], saved["model"], answer_text(saved), question_text(saved)) == \
        ("sys", "m", "answer1\n\nanswer2", "q1\n\nq2")
    name, answers = load_answers(str(out))
    assert name == "sys" and answers == {"1": {"question": "q1\n\nq2", "answer": "answer1\n\nanswer2"}}


def test_fastchat_answer_rows():
    row = {"question_id": 1, "model_id": "vicuna", "choices": [{"index": 0, "turns": ["x", "y"]}]}
    assert answer_text(row) == "x\n\ny" and question_text(row) is None
