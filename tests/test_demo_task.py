"""qlora.demo_task: deterministic rows, held-out values never seen in training, exact-match scoring."""

from __future__ import annotations

import json
import re

import pytest

from qlora.data import build_examples, prompt_and_reference, read_dataset
from qlora.demo_task import (CITIES, FIRST_NAMES, INSTRUCTION, SURNAMES, can_still_match, exact_match, make_demo_task,
                             write_demo_task)
from tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def task():
    return make_demo_task(n_train=500, n_test=100, seed=0)


def _record(row) -> dict:
    return json.loads(row["messages"][-1]["content"])


def test_same_seed_same_rows_and_sizes(task):
    train, test = task
    assert (len(train), len(test)) == (500, 100)
    assert make_demo_task(n_train=500, n_test=100, seed=0) == task
    assert make_demo_task(n_train=500, n_test=100, seed=1)[0] != train
    # the first row is pinned so a change to the generator shows up as a test failure
    assert train[0]["messages"][1:] == [
        {"role": "user", "content": "Felix Vudraitro is 55 and has lived in Shustir since 1998."},
        {"role": "assistant", "content": '{"name":"Felix Vudraitro","age":55,"city":"Shustir","year":1998}'},
    ]


def test_about_half_the_training_values_are_invented(task):
    from qlora.demo_task import _REAL

    train, test = task
    slots = [v for r in train for v in (*_record(r)["name"].split(), _record(r)["city"])]
    invented = sum(v not in _REAL for v in slots) / len(slots)
    assert 0.4 < invented < 0.6
    assert all(v in _REAL for r in test for v in (*_record(r)["name"].split(), _record(r)["city"]))


def test_rows_are_chat_with_a_compact_json_answer_copied_from_the_sentence(task):
    for row in task[0] + task[1]:
        system, user, assistant = row["messages"]
        assert (system, user["role"], assistant["role"]) == ({"role": "system", "content": INSTRUCTION}, "user",
                                                             "assistant")
        record = _record(row)
        assert list(record) == ["name", "age", "city", "year"]
        assert assistant["content"] == json.dumps(record, separators=(",", ":"))
        sentence = user["content"]
        assert record["name"] in sentence and record["city"] in sentence
        assert re.search(rf"\b{record['age']}\b", sentence) and str(record["year"]) in sentence
        assert 19 <= record["age"] <= 88 and 1995 <= record["year"] <= 2024


def test_held_out_names_and_cities_never_occur_in_training(task):
    train, test = task
    def values(rows):
        recs = [_record(r) for r in rows]
        return ({r["name"].split()[0] for r in recs}, {r["name"].split()[1] for r in recs}, {r["city"] for r in recs})

    for seen, held in zip(values(train), values(test)):
        assert not seen & held and held
    train_text = " ".join(r["messages"][1]["content"] for r in train)
    assert not any(re.search(rf"\b{re.escape(c)}\b", train_text) for c in values(test)[2])
    assert all(len(set(names)) == len(names) for names in (FIRST_NAMES, SURNAMES, CITIES))


def test_write_demo_task_round_trips_through_the_data_layer(tmp_path, task):
    train_path, test_path = write_demo_task(str(tmp_path / "demo"), n_train=500, n_test=100, seed=0)
    rows, fmt = read_dataset(train_path)
    assert fmt == "chat" and list(rows) == task[0]
    assert list(read_dataset(test_path)[0]) == task[1]
    tok = tiny_tokenizer()
    examples, stats = build_examples(rows[:20], fmt, tok, 384, 256, 512)
    assert stats.examples == 20 and stats.truncated == 0
    answer = rows[0]["messages"][-1]["content"]
    target = [t for t, lab in zip(examples[0]["input_ids"], examples[0]["labels"]) if lab != -100]
    assert tok.decode(target) == answer + tok.eos_token  # only the JSON (and its end token) is learned
    prompt, reference = prompt_and_reference(rows[0], fmt, tok)
    assert reference == answer and examples[0]["input_ids"][: len(prompt)] == prompt


@pytest.mark.parametrize("prediction,expected", [
    ('{"name":"Ann Lee","age":34,"city":"Oslo","year":2019}', True),
    ('  {"name": "Ann Lee", "age": 34, "city": "Oslo", "year": 2019}\n', True),  # whitespace
    ('{"age":34,"name":"Ann Lee","year":2019,"city":"Oslo"}', True),  # key order
    ('{"name":"Ann Lee","age":"34","city":"Oslo","year":2019}', False),  # a string is not a number
    ('{"name":"Ann Lee","age":34,"city":"Oslo","year":2019,"country":"NO"}', False),  # extra key
    ('{"name":"Ann Lee","age":34,"city":"Oslo"}', False),  # missing key
    ('{"name":"ann lee","age":34,"city":"Oslo","year":2019}', False),  # case matters
    ('{"name":"Ann Lee","age":34,"city":"Oslo","year":2019}\nHope this helps!', False),  # trailing chatter
    ('```json\n{"name":"Ann Lee","age":34,"city":"Oslo","year":2019}\n```', False),  # not the asked format
    ('{"name":"Ann Lee","age":34,"city":"Oslo","year":2019', False),  # cut off
    ("", False),
])
def test_exact_match(prediction, expected):
    assert exact_match(prediction, '{"name":"Ann Lee","age":34,"city":"Oslo","year":2019}') is expected


def test_exact_match_falls_back_to_stripped_text():
    assert exact_match(" Paris \n", "Paris") and not exact_match("paris", "Paris")
    assert exact_match("1.0", "1") is False and exact_match("1", "1")


REF = '{"name":"Ann Lee","age":34,"city":"Oslo","year":2019}'
ANSWERS = [
    REF, "  " + REF + "\n", '{"age":34,"name":"Ann Lee","year":2019,"city":"Oslo"}', '{ "name" : "Ann Lee" ,"age":34,'
    '"city":"Oslo","year":2019 }', '{"name":"Ann Lee","age":"34","city":"Oslo","year":2019}',
    REF + "\nHope this helps!",
    "JSON:\n" + REF, "```json\n" + REF + "\n```", '{"name":"Ann Lee","age":34}', '{"name":"Ann Le', "Sure! " + REF,
    '{"name":"Ann Lee","age":34,"city":"Oslo","year":2019}}', "\ufffd" + REF,
]


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("reference", [REF, "Paris", "34", '"Oslo"', "[1, 2]"])
def test_can_still_match_never_stops_an_answer_that_would_match(answer, reference):
    """Scoring stops at the first prefix where can_still_match is False: that must happen only for
    answers exact_match rejects, and a matching answer must pass every prefix."""
    for answer_ in (answer, reference, " " + reference + " "):
        if exact_match(answer_, reference):
            assert all(can_still_match(answer_[:i], reference) for i in range(len(answer_) + 1)), answer_


@pytest.mark.parametrize("answer,stops_after", [
    ("JSON:\n" + REF, "J"),  # the base model's usual opening: one character decides it
    (REF + "\nHope", REF + "\nH"),  # chatter after the complete object
    ('{"name":"Ann Lee","age":35}', '{"name":"Ann Lee","age":35}'),  # complete and different
])
def test_can_still_match_stops_as_soon_as_the_answer_is_decided(answer, stops_after):
    first = next(i for i in range(len(answer) + 1) if not can_still_match(answer[:i], REF))
    assert answer[:first] == stops_after
