"""Hostile data input: every malformed file or row is one QloraError line naming the file (and line/key)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tiny import tiny_tokenizer

from qlora.data import build_examples, read_dataset
from qlora.errors import QloraError

GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}


def _jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _error(path: Path, fmt: str = "auto", tokenizer=None, **limits) -> str:
    with pytest.raises(QloraError) as info:
        rows, fmt = read_dataset(str(path), fmt)
        build_examples(rows, fmt, tokenizer or tiny_tokenizer(),
                       **{**dict(max_source_len=64, max_target_len=64, max_seq_len=128), **limits}, source=str(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    return message[len(str(path)):]


# (file name, content, expected message after the path); content bytes are written as-is
CASES = [
    ("truncated_line.jsonl", _jsonl(GOOD, '{"instruction": "a", "outp'), r"^:2: invalid JSON \(Unterminated string"),
    ("single_quotes.jsonl", _jsonl(GOOD, GOOD, "{'instruction': 'a'}"), r"^:3: invalid JSON \(Expecting property name"),
    ("trailing_comma.jsonl", _jsonl('{"text": "a",}'), r"^:1: invalid JSON"),
    ("wrong_names.jsonl", _jsonl({"question": "q", "answer": "a"}),
     r"^: cannot tell the data format from the keys \[answer, question\]"),
    ("wrong_type.jsonl", _jsonl(GOOD, dict(GOOD, output=5)), r"^:2: key 'output' must be a string, got number$"),
    ("null_field.jsonl", _jsonl(dict(GOOD, instruction=None)), r"^:1: key 'instruction' must be a string, got null$"),
    ("missing_field.jsonl", _jsonl(GOOD, {"instruction": "x"}, GOOD),
     r"^:2: missing key 'output' for the alpaca format \(keys found: instruction\)$"),
    ("all_empty.jsonl", _jsonl(dict(GOOD, output=""), dict(GOOD, output=" ")), r"^: all 2 rows have an empty answer"),
    ("garbage.jsonl", bytes(range(256)) * 4, r"^:2: invalid UTF-8 byte 0x80 at column 118;"),
    ("nul_bytes.jsonl", b"\x00\x00\x00\x00\n", r"^:1: invalid JSON"),
    ("latin1.jsonl", _jsonl(GOOD, GOOD).encode() + '{"text": "caf\xe9"}\n'.encode("latin-1"),
     r"^:3: invalid UTF-8 byte 0xe9 at column 14;"),
    ("empty.jsonl", b"", r"^: the dataset is empty"),
    ("blank_lines.jsonl", "\n  \n\n", r"^: the dataset is empty"),
    ("non_object.jsonl", _jsonl(GOOD, [1, 2]), r"^:2: expected a JSON object per line, got a array$"),
    ("string_row.jsonl", _jsonl('"just a string"'), r"^:1: expected a JSON object per line, got a string$"),
    ("not_list.json", json.dumps({"rows": [GOOD]}),
     r"^: expected a list of row objects or \{\"data\": \[\.\.\.\]\}, got an object with keys \[rows\]$"),
    ("list_of_numbers.json", json.dumps([GOOD, 3]), r"^: row 2: expected a JSON object, got a number$"),
    ("broken.json", '[{"text": "a"},\n{"text": }]', r"^:2: invalid JSON \(Expecting value"),
    ("missing_column.csv", "instruction,input\nhi,there\n",
     r"^: cannot tell the data format from the keys \[input, instruction\]"),
    ("half_alpaca.csv", "instruction,output,input\na,b,c\n", None),  # a valid control: must load
    ("ragged.csv", "prompt,completion\na,b\nc,d,e\n", r"^:3: 3 fields but the header has 2 columns$"),
    ("dup_header.csv", "text,text\na,b\n", r"^:1: the header row needs distinct, non-empty column names"),
    ("chat_not_list.jsonl", _jsonl({"messages": "hello"}),
     r"^:1: key 'messages' must be a non-empty list of \{role, content\}, got string$"),
    ("chat_no_role.jsonl", _jsonl({"messages": [{"content": "hi"}]}),
     r"^:1: messages\[0\]\.role must be a string, got missing$"),
    ("chat_no_assistant.jsonl", _jsonl({"messages": [{"role": "user", "content": "hi"}]}),
     r"^:1: key 'messages' has no assistant message"),
    ("chat_bad_content.jsonl",
     _jsonl({"messages": [{"role": "user", "content": ["image"]}, {"role": "assistant", "content": "x"}]}),
     r"^:1: messages\[0\]\.content must be a string, got array$"),
    ("guanaco_no_answer.jsonl", _jsonl({"text": "### Human: a### Assistant: b"}, {"text": "### Human: only a question"},
                                       {"text": "### Human: c### Assistant: d"}),
     r"^:2: key 'text' has no '### Assistant:' turn"),
]


@pytest.mark.parametrize("name,content,expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_file(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if expected is None:
        assert read_dataset(str(path))[1] == "alpaca"
        return
    message = _error(path)
    assert re.search(expected, message), message


def test_row_longer_than_any_limit(tmp_path):
    path = tmp_path / "too_long.jsonl"
    path.write_text(_jsonl(dict(GOOD, instruction="x" * 5000)))
    # the prompt is cut from the left to max_source_len; when that alone fills max_seq_len no answer is left
    assert _error(path, max_source_len=128, max_seq_len=128).startswith(
        ": all 1 rows were truncated away; raise max_target_len/max_seq_len")


def test_missing_file(tmp_path):
    assert _error(tmp_path / "nope.jsonl") == ": no such file or directory"


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "dir").mkdir()
    assert _error(tmp_path / "dir").startswith(": is a directory but not a saved dataset")


def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.jsonl"
    path.write_text(_jsonl(GOOD))
    path.chmod(0)
    try:
        if path.open("rb"):  # root reads anything: nothing to test there
            pytest.skip("running as root: permission bits do not stop reads")
    except PermissionError:
        assert _error(path).startswith(": cannot read the file (Permission denied)")
    finally:
        path.chmod(0o600)


def test_parquet_with_wrong_columns_and_corrupt_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}]), tmp_path / "wrong.parquet")
    assert _error(tmp_path / "wrong.parquet").startswith(
        ": cannot tell the data format from the keys [answer, question]")
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "completion": None}]), tmp_path / "nulls.parquet")
    assert _error(tmp_path / "nulls.parquet") == ": row 1: key 'completion' must be a string, got null"
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1" + b"\x00garbage" * 10)
    assert _error(tmp_path / "corrupt.parquet").startswith(": not a readable parquet file (")


def test_dataset_dict_without_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"test": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(tmp_path / "dd"))
    assert _error(tmp_path / "dd") == ": a dataset dict without a 'train' split (splits: test); save one split"


def test_forced_format_that_does_not_fit(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(_jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    assert _error(path, fmt="alpaca") == ":1: missing key 'instruction' for the alpaca format (keys found: messages)"
    assert _error(path, fmt="yaml").startswith(": unknown data format 'yaml'")


def test_chat_template_that_rejects_a_role(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(_jsonl({"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                         "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['content'] }}{% endfor %}")
    assert _error(path, tokenizer=tok).startswith(
        ":1: the chat template rejected this conversation (unknown role robot")
