"""qlora.data.formats: the paper's dataset shapes, detected, masked exactly; ambiguous shapes refused."""

from __future__ import annotations

import json

import pytest

from qlora.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, build_examples, detect_format, read_dataset
from qlora.data.formats import FORMATS, SHAPES
from qlora.errors import QloraError

LIMITS = dict(max_source_len=384, max_target_len=256, max_seq_len=512)
CHIP2 = "<human>: What is 2+2?\n<bot>: 4\n<human>: And 3+3?\n<bot>: 6\n"
HH = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name a colour\n\nAssistant: Red."
UNNATURAL = {"instruction": "Say if the number is even.", "instances": [
    {"instruction_with_input": "Is 4 even?", "input": "4", "constraints": "Answer 'True' or 'False'.",
     "output": "True"},
    {"input": "3", "constraints": "None.", "output": "False"},
]}
ROWS = {
    "alpaca": {"instruction": "Add.", "input": "2 3", "output": "5"},
    "dolly": {"instruction": "Who?", "context": "Ann wrote it.", "response": "Ann", "category": "closed_qa"},
    "input_output": {"input": "Write a haiku.", "output": "Leaves fall"},
    "completion": {"prompt": "Q: 1+1=", "completion": " 2"},
    "flan": {"inputs": "Translate to French: cat", "targets": "chat"},
    "unnatural": UNNATURAL,
    "chat": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    "guanaco": {"text": "### Human: hi### Assistant: yo"},
    "chip2": {"text": CHIP2},
    "hh_rlhf": {"chosen": HH, "rejected": HH.replace("Red.", "No.")},
    "text": {"text": "plain words"},
}


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def one(tok, row, fmt):
    examples, _ = build_examples([row], fmt, tok, **LIMITS)
    return examples


def test_every_format_has_a_shape_and_a_sample():
    assert set(FORMATS) == set(SHAPES) == set(ROWS)


@pytest.mark.parametrize("fmt", list(ROWS))
def test_detect_each_format(fmt, tmp_path, capsys):
    assert detect_format([ROWS[fmt]], "f.jsonl") == fmt
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[fmt]) + "\n")
    assert read_dataset(str(p))[1] == fmt
    report = capsys.readouterr().err.strip().splitlines()
    assert report == [f"{p}: detected the {fmt} (" + report[0].split(f"{fmt} (", 1)[1]]
    assert report[0].endswith("format (set data_format to override)")


def test_alpaca_keys_are_not_read_as_input_output():
    # instruction/input/output also fits input_output; alpaca explains strictly more of the row
    assert detect_format([{"instruction": "a", "input": "b", "output": "c"}], "f") == "alpaca"
    # a pre-rendered `text` column beside structured fields (tatsu-lab/alpaca) is not plain text
    assert detect_format([{"instruction": "a", "input": "", "output": "c", "text": "all"}], "f") == "alpaca"


@pytest.mark.parametrize("row,names", [
    ({"instruction": "a", "output": "b", "response": "c"}, "alpaca .* and dolly"),
    ({"text": "### Human: a### Assistant: b<bot>: c"}, "guanaco .* and chip2"),
    ({"messages": [], "prompt": "a", "completion": "b"}, "completion .* and chat"),
])
def test_ambiguous_shape_is_refused_naming_the_candidates(tmp_path, row, names):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(row) + "\n")
    with pytest.raises(QloraError,
                       match=rf"^{p}:1: ambiguous row shape, it fits {names} .*; set data_format to one of"):
        read_dataset(str(p))
    keys = sorted(row)
    assert read_dataset(str(p), "completion" if "prompt" in keys else "chip2" if "text" in keys else "dolly")


def test_unknown_shape_names_every_format(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(QloraError) as e:
        read_dataset(str(p))
    msg = str(e.value)
    assert msg.startswith(f"{p}: cannot tell the data format from the keys [answer, question]") and "\n" not in msg
    assert all(f"{fmt} (" in msg for fmt in FORMATS) and "prompt_field/response_field" in msg


def test_dolly_is_alpaca_with_context_as_input(tok):
    eos = tok.eos_token_id
    (ex,) = one(tok, ROWS["dolly"], "dolly")
    prompt = ids(tok, ALPACA_PROMPT.format(instruction="Who?", input="Ann wrote it."))
    assert ex["input_ids"] == prompt + ids(tok, "Ann") + [eos]
    assert ex["labels"] == [-100] * len(prompt) + ids(tok, "Ann") + [eos]
    (ex,) = one(tok, {"instruction": "Hi?", "context": "", "response": "yo"}, "dolly")
    assert ex["input_ids"][: -3] == ids(tok, ALPACA_PROMPT_NO_INPUT.format(instruction="Hi?"))


@pytest.mark.parametrize("fmt,prompt,answer", [
    ("input_output", "Write a haiku.", "Leaves fall"),
    ("flan", "Translate to French: cat", "chat"),
])
def test_prompt_answer_pairs_are_used_verbatim(tok, fmt, prompt, answer):
    (ex,) = one(tok, ROWS[fmt], fmt)
    eos = tok.eos_token_id
    assert ex["input_ids"] == ids(tok, prompt) + ids(tok, answer) + [eos]
    assert ex["labels"] == [-100] * len(ids(tok, prompt)) + ids(tok, answer) + [eos]


def test_chip2_learns_every_bot_turn_and_eos_follows_each_answer(tok):
    eos = tok.eos_token_id
    (ex,) = one(tok, ROWS["chip2"], "chip2")
    p1, a1 = ids(tok, "<human>: What is 2+2?\n<bot>:"), ids(tok, " 4") + [eos]
    p2, a2 = ids(tok, "\n<human>: And 3+3?\n<bot>:"), ids(tok, " 6") + [eos]
    tail = ids(tok, "\n")  # the trailing newline is not part of the answer
    assert ex["input_ids"] == p1 + a1 + p2 + a2 + tail
    assert ex["labels"] == [-100] * len(p1) + a1 + [-100] * len(p2) + a2 + [-100]


def test_hh_rlhf_learns_the_chosen_final_reply_only(tok):
    eos = tok.eos_token_id
    (ex,) = one(tok, ROWS["hh_rlhf"], "hh_rlhf")
    prompt = ids(tok, "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name a colour\n\nAssistant:")
    assert ex["input_ids"] == prompt + ids(tok, " Red.") + [eos]
    assert ex["labels"] == [-100] * len(prompt) + ids(tok, " Red.") + [eos]


def test_unnatural_gives_one_example_per_instance(tok):
    eos = tok.eos_token_id
    examples, stats = build_examples([UNNATURAL], "unnatural", tok, **LIMITS)
    assert [e["row"] for e in examples] == [0, 0] and (stats.rows, stats.examples) == (1, 2)
    p1 = ids(tok, ALPACA_PROMPT_NO_INPUT.format(instruction="Is 4 even?\nAnswer 'True' or 'False'."))
    # constraints "None." dropped
    p2 = ids(tok, ALPACA_PROMPT.format(instruction="Say if the number is even.", input="3"))
    assert examples[0]["labels"] == [-100] * len(p1) + ids(tok, "True") + [eos]
    assert examples[1]["input_ids"] == p2 + ids(tok, "False") + [eos]


@pytest.mark.parametrize("row,fmt,msg", [
    ({"text": "<human>: a"}, "chip2", r"key 'text' has no '<bot>:' turn \(chip2 format\)"),
    ({"chosen": "\n\nHuman: a"}, "hh_rlhf", r"key 'chosen' has no 'Assistant:' turn \(hh_rlhf format\)"),
    ({"chosen": HH, "rejected": 3}, "hh_rlhf", r"key 'rejected' must be a string, got number"),
    ({"instruction": "a", "instances": []}, "unnatural",
     r"key 'instances' must be a non-empty list of \{input, output\}, got array"),
    ({"instruction": "a", "instances": [{"input": "x"}]}, "unnatural", r"instances\[0\]: missing key 'output'"),
    ({"inputs": "a", "targets": None}, "flan", r"key 'targets' must be a string, got null"),
    ({"instruction": "a", "response": "b", "context": 1}, "dolly", r"key 'context' must be a string, got number"),
])
def test_bad_rows_of_the_new_formats_name_file_and_line(tmp_path, row, fmt, msg):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[fmt]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(QloraError, match=rf"^{p}:2: {msg}"):
        read_dataset(str(p), fmt)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_deeply_nested_json_is_a_one_line_error_not_a_recursion_traceback(tmp_path, suffix):
    p = tmp_path / f"deep{suffix}"
    deep = '{"a": ' * 100_000 + "1" + "}" * 100_000
    if suffix == ".jsonl":
        p.write_text(json.dumps(ROWS["alpaca"]) + "\n" + deep + "\n")
    else:  # one JSON document: the parser has no line to give
        p.write_text("[" + json.dumps(ROWS["alpaca"]) + ", " + deep + "]")
    where = f"{p}:2" if suffix == ".jsonl" else f"{p}"
    with pytest.raises(QloraError, match=rf"^{where}: JSON nested too deeply .*; fix or delete this row$"):
        read_dataset(str(p))
