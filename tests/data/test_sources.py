"""qlora.data.sources / columns / chat: mixtures, column mapping, hub names, named chat templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import tiny_tokenizer

from qlora.config import build_config
from qlora.data import build_examples, build_mixture, parse_sources, read_sources
from qlora.data.chat import ALPACA_SYSTEM, render_chat, resolve_chat_format
from qlora.data.examples import _special_prefix
from qlora.data.sources import Source
from qlora.errors import QloraError

LIMITS = dict(max_source_len=64, max_target_len=64, max_seq_len=128)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg(**kw):
    return build_config({**dict(val_fraction=0.0, seed=3, **LIMITS), **kw})


def test_parse_sources_weights_counts_paths_and_hub_splits(tmp_path):
    assert parse_sources("a.jsonl:0.7 b.jsonl:0.3") == [Source("a.jsonl", weight=0.7), Source("b.jsonl", weight=0.3)]
    assert parse_sources(["a.jsonl:200", "org/name:test", "c.jsonl"]) == [
        Source("a.jsonl", count=200), Source("org/name:test"), Source("c.jsonl")]
    odd = tmp_path / "x:1.5"  # an existing file whose name ends like a weight is a file
    odd.write_text("")
    assert parse_sources(str(odd)) == [Source(str(odd))]
    with pytest.raises(QloraError, match=r"^data: a.jsonl:0: a count must be > 0 \(weights are written with a decimal"):
        parse_sources("a.jsonl:0")


def test_data_list_from_yaml_or_flags():
    assert build_config({"data": ["a.jsonl:0.5", "b.jsonl:0.5"]}).data == ["a.jsonl:0.5", "b.jsonl:0.5"]
    assert build_config({"data": ["a.jsonl"]}).data == "a.jsonl"  # `--data a.jsonl` (nargs=+) is one path


def _two(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": f"A{i}"} for i in range(10)])
    b = write(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": f"B{i}"} for i in range(30)])
    return a, b


def test_weighted_mixture_sizes_and_determinism(tmp_path, tok, capsys):
    a, b = _two(tmp_path)
    c = cfg(data=[f"{a}:0.5", f"{b}:0.5"])
    train, val, stats = build_mixture(read_sources(c), tok, c)
    assert [s["used"] for s in stats["sources"]] == [20, 20] and len(train) == 40 and val == []
    assert [s["format"] for s in stats["sources"]] == ["completion", "alpaca"]
    from_a = [e["row"] for e in train if e["source"] == 0]
    assert sorted(from_a) == sorted(list(range(10)) * 2)  # upsampled: two whole permutations of a
    again = build_mixture(read_sources(c), tok, c)
    assert (again[2]["digest"] == stats["digest"]
            and [e["input_ids"] for e in again[0]] == [e["input_ids"] for e in train])
    other = cfg(data=[f"{a}:0.5", f"{b}:0.5"], seed=4)
    assert build_mixture(read_sources(other), tok, other)[2]["digest"] != stats["digest"]
    assert f"data mixture: {a} 20, {b} 20 = 40 training examples" in capsys.readouterr().out


def test_counts_and_whole_sources(tmp_path, tok):
    a, b = _two(tmp_path)
    c = cfg(data=[f"{a}:3", b])
    train, _, stats = build_mixture(read_sources(c), tok, c)
    assert [s["used"] for s in stats["sources"]] == [3, 30]
    assert len({e["row"] for e in train if e["source"] == 0}) == 3  # 3 of 10, no repeats
    assert [e["row"] for e in train if e["source"] == 1] == list(range(30))  # taken whole, in order


def test_one_source_is_the_unmixed_run(tmp_path, tok):
    a, _ = _two(tmp_path)
    c = cfg(data=a, val_fraction=0.2)
    train, val, stats = build_mixture(read_sources(c), tok, c)
    from qlora.data import read_dataset, split_train_val

    rows, fmt = read_dataset(a)
    examples, _ = build_examples(rows, fmt, tok, **LIMITS)
    ref_train, ref_val = split_train_val(examples, 0.2, 3)
    assert [e["input_ids"] for e in train] == [e["input_ids"] for e in ref_train] and len(val) == len(ref_val) == 2
    assert stats["format"] == "completion" and stats["used"] == 8


def test_column_mapping_renders_chat_and_learns_the_response(tmp_path, tok):
    p = write(tmp_path / "q.jsonl", [{"question": "Why?", "answer": "Because.", "persona": "Be terse."}])
    eos = tok.eos_token_id
    for c in (cfg(data=p, prompt_field="question", response_field="answer", system_field="persona",
                  chat_format="guanaco"),
              cfg(data=p, columns="prompt=question, response=answer, system=persona", chat_format="guanaco")):
        train, _, stats = build_mixture(read_sources(c), tok, c)
        prompt = ids(tok, "Be terse.### Human: Why?### Assistant:")
        assert stats["format"] == "chat"
        prefix = _special_prefix(tok)  # named templates get the tokenizer's BOS like the other formats
        answer = ids(tok, " Because.") + [eos]
        assert train[0]["input_ids"] == prefix + prompt + answer
        assert train[0]["labels"] == [-100] * len(prefix + prompt) + answer


@pytest.mark.parametrize("kw,msg", [
    (dict(prompt_field="question"), r"^columns: a mapping needs both prompt and response columns; response not given"),
    (dict(columns="prompt:question"), r"^columns: cannot read 'prompt:question'; write prompt=COL,response=COL"),
    (dict(prompt_field="q", response_field="nope"),
     r":1: missing column 'nope' \(the response column; keys found: a, q\)$"),
    (dict(prompt_field="q", response_field="a", data_format="alpaca"),
     r"^columns: a column mapping renders rows as chat"),
])
def test_column_mapping_errors(tmp_path, kw, msg):
    p = write(tmp_path / "q.jsonl", [{"q": "x", "a": "y"}])
    with pytest.raises(QloraError, match=msg):
        read_sources(cfg(data=p, **kw))


def test_hub_name_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(QloraError) as e:
        read_sources(cfg(data="timdettmers/openassistant-guanaco"))
    msg = str(e.value)
    assert msg.startswith("timdettmers/openassistant-guanaco: no such local file, and the hub dataset "
                          "'timdettmers/openassistant-guanaco' cannot be fetched offline") and "\n" not in msg
    with pytest.raises(QloraError, match=r"^missing\.jsonl: no such file or directory$"):
        read_sources(cfg(data="missing.jsonl"))


MESSAGES = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]


@pytest.mark.parametrize("name,expected", [
    ("guanaco", [("S### Human: Q### Assistant:", False), (" A", True),
                 ("### Human: Q2### Assistant:", False), (" A2", True)]),
    ("alpaca", [("S\n\n### Instruction:\nQ\n\n### Response:\n", False), ("A", True),
                ("\n\n### Instruction:\nQ2\n\n### Response:\n", False), ("A2", True)]),
    ("chatml", [("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n", False),
                ("A<|im_end|>", True), ("<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", False),
                ("A2<|im_end|>", True)]),
])
def test_named_chat_formats(tok, name, expected):
    assert render_chat(MESSAGES, tok, lambda: "f", name) == expected


def test_alpaca_without_system_gets_the_alpaca_preamble(tok):
    segs = render_chat(MESSAGES[1:3], tok, lambda: "f", "alpaca")
    assert segs[0] == (ALPACA_SYSTEM + "\n\n### Instruction:\nQ\n\n### Response:\n", False)


def test_auto_falls_back_to_guanaco_without_a_template(tmp_path):
    tok = tiny_tokenizer()
    assert resolve_chat_format("auto", tok) == ("tokenizer" if tok.chat_template else "guanaco")
    tok.chat_template = None
    assert resolve_chat_format("auto", tok) == "guanaco"
    rows = [{"messages": MESSAGES[1:3]}]
    (ex,), _ = build_examples(rows, "chat", tok, **LIMITS)
    assert ex["labels"][-2:] == [*ids(tok, " A")[-1:], tok.eos_token_id]
    with pytest.raises(QloraError, match=r"^f: row 1: the chat format needs a tokenizer with a chat template.*"
                                         r"set chat_format to guanaco, alpaca or chatml"):
        build_examples(rows, "chat", tok, source="f", chat_format="tokenizer", **LIMITS)
