"""qlora.data: loading every file kind, format detection, exact label masks, truncation, real shared data.

Split, batching and collate: test_batching.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from tiny import tiny_tokenizer

from qlora.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    build_examples,
    detect_format,
    load_rows,
    prompt_and_reference,
    read_dataset,
)
from qlora.errors import QloraError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "instruct"
ROWS = [
    {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]
LIMITS = dict(max_source_len=384, max_target_len=256, max_seq_len=512)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tiny_tokenizer_is_byte_level(tok):
    # The masks below are checked against byte counts; this pins that premise.
    assert len(ids(tok, "héllo")) == 6 and tok.eos_token_id == 258


# ---------------------------------------------------------------- loading


def _write_all_kinds(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    paths["jsonl"] = tmp_path / "d.jsonl"
    paths["jsonl"].write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    paths["json_list"] = tmp_path / "list.json"
    paths["json_list"].write_text(json.dumps(ROWS, indent=2))
    paths["json_data"] = tmp_path / "data.json"
    paths["json_data"].write_text(json.dumps({"data": ROWS}))
    paths["json_lines"] = tmp_path / "lines.json"  # JSONL under a .json name, as HF exports often are
    paths["json_lines"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    paths["csv"] = tmp_path / "d.csv"
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ROWS)
    paths["tsv"] = tmp_path / "d.tsv"
    paths["tsv"].write_text("instruction\tinput\toutput\n"
                            + "".join(f"{r['instruction']}\t{r['input']}\t{r['output']}\n" for r in ROWS))
    return paths


def test_load_rows_every_text_kind_gives_the_same_rows(tmp_path):
    for kind, path in _write_all_kinds(tmp_path).items():
        assert load_rows(str(path)) == ROWS, kind


def test_load_rows_parquet_and_saved_datasets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    assert load_rows(str(tmp_path / "d.parquet")) == ROWS
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert load_rows(str(tmp_path / "ds")) == ROWS
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    assert load_rows(str(tmp_path / "dd")) == ROWS


def test_rows_remember_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('\n{"text": "a"}\n\n{"text": "b"}\n')
    assert [load_rows(str(p)).where(i) for i in range(2)] == [f"{p}:2", f"{p}:4"]
    c = tmp_path / "d.csv"
    c.write_text('prompt,completion\n"multi\nline",x\n\nq,y\n')
    rows = load_rows(str(c))
    assert rows == [{"prompt": "multi\nline", "completion": "x"}, {"prompt": "q", "completion": "y"}]
    assert [rows.where(i) for i in range(2)] == [f"{c}:2", f"{c}:5"]
    j = tmp_path / "d.json"
    j.write_text(json.dumps(ROWS))
    assert load_rows(str(j)).where(1) == f"{j}: row 2"


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "é"}).encode() + b"\n")
    assert load_rows(str(p)) == [{"text": "é"}]


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize("row,fmt", [
    ({"instruction": "a", "input": "b", "output": "c"}, "alpaca"),
    ({"instruction": "a", "output": "c"}, "alpaca"),
    ({"text": "### Human: hi### Assistant: yo"}, "guanaco"),
    ({"text": "plain text"}, "text"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "chat"),
    ({"prompt": "a", "completion": "b"}, "completion"),
])
def test_detect_format(row, fmt):
    assert detect_format([row], "f.jsonl") == fmt


def test_detect_format_follows_the_majority_so_a_broken_row_is_reported(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [ROWS[0], {"instruction": "x", "outptu": "y"}, ROWS[1]]))
    with pytest.raises(QloraError, match=rf"^{p}:2: missing key 'output' for the alpaca format "
                                         r"\(keys found: instruction, outptu\)$"):
        read_dataset(str(p))


def test_read_dataset_with_an_explicit_format(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "### Human: a### Assistant: b"}) + "\n")
    assert read_dataset(str(p))[1] == "guanaco"
    assert read_dataset(str(p), "text")[1] == "text"


# ---------------------------------------------------------------- exact masks


def _one(tok, rows, fmt, **kw):
    examples, stats = build_examples(rows, fmt, tok, **{**LIMITS, **kw})
    return examples, stats


def test_alpaca_masks_exactly(tok):
    (a, b), stats = _one(tok, ROWS, "alpaca")
    eos = tok.eos_token_id
    prompt_a = ids(tok, ALPACA_PROMPT.format(instruction="Add the numbers.", input="2 3"))
    assert a["input_ids"] == prompt_a + ids(tok, "5") + [eos]
    assert a["labels"] == [-100] * len(prompt_a) + ids(tok, "5") + [eos]
    prompt_b = ids(tok, ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi."))  # empty input: the no-input template
    assert b["labels"] == [-100] * len(prompt_b) + ids(tok, "hi") + [eos]
    assert (a["row"], b["row"]) == (0, 1)
    assert (stats.rows, stats.examples, stats.truncated, stats.dropped, stats.target_tokens) == (2, 2, 0, 0, 5)
    assert stats.tokens == len(a["input_ids"]) + len(b["input_ids"])


def test_completion_and_text_masks(tok):
    eos = tok.eos_token_id
    (ex,), _ = _one(tok, [{"prompt": "Q: 1+1=", "completion": " 2"}], "completion")
    assert ex["input_ids"] == ids(tok, "Q: 1+1= 2") + [eos]
    assert ex["labels"] == [-100] * 7 + ids(tok, " 2") + [eos]
    (ex,), _ = _one(tok, [{"text": "all of it"}], "text")
    assert ex["labels"] == ex["input_ids"] == ids(tok, "all of it") + [eos]


def test_guanaco_multi_turn_masks_every_human_turn(tok):
    eos = tok.eos_token_id
    text = "### Human: hi### Assistant: yo### Human: and?### Assistant: done"
    (ex,), _ = _one(tok, [{"text": text}], "guanaco")
    p1, a1 = ids(tok, "### Human: hi### Assistant:"), ids(tok, " yo") + [eos]
    p2, a2 = ids(tok, "### Human: and?### Assistant:"), ids(tok, " done") + [eos]
    assert ex["input_ids"] == p1 + a1 + p2 + a2
    assert ex["labels"] == [-100] * len(p1) + a1 + [-100] * len(p2) + a2


def test_chat_masks_assistant_turns_with_their_end_token(tok):
    eos = tok.eos_token_id
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ok"},
    ]
    (ex,), _ = _one(tok, [{"messages": messages}], "chat")
    p1 = ids(tok, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    p2 = ids(tok, "\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n")
    a1, a2 = ids(tok, "yo") + [eos], ids(tok, "ok") + [eos]  # the template's <|im_end|> is the EOS: not doubled
    assert ex["input_ids"] == p1 + a1 + p2 + a2
    assert ex["labels"] == [-100] * len(p1) + a1 + [-100] * len(p2) + a2


def test_chat_empty_assistant_turn_is_context_not_target(tok):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    (ex,), _ = _one(tok, [{"messages": messages}], "chat")
    target = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert target == ids(tok, "c") + [tok.eos_token_id]


def test_chat_template_that_rewrites_earlier_turns_trains_the_last_turn_only():
    tok = tiny_tokenizer()  # like reasoning models that strip earlier thoughts: history renders differently
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[A]"
                         "{% else %}<{{ m['role'] }}>{{ m['content'] }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    (ex,), _ = build_examples([{"messages": messages}], "chat", tok, **LIMITS)
    prompt = ids(tok, "<user>a[A]<user>c<assistant>")
    assert ex["input_ids"] == prompt + ids(tok, "d") + [tok.eos_token_id]
    assert ex["labels"] == [-100] * len(prompt) + ids(tok, "d") + [tok.eos_token_id]


def test_train_on_source_labels_everything(tok):
    (ex,), _ = _one(tok, ROWS[:1], "alpaca", train_on_source=True)
    assert ex["labels"] == ex["input_ids"]


def test_bos_prefix_is_kept_through_left_truncation():
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                       special_tokens=[("<|endoftext|>", bos)])
    assert tok("a")["input_ids"][0] == bos
    (ex,), stats = build_examples([{"prompt": "abcdef", "completion": "xy"}], "completion", tok, 4, 10, 20)
    assert ex["input_ids"] == [bos] + ids(tok, "def") + ids(tok, "xy") + [tok.eos_token_id]
    assert (stats.truncated, stats.truncated_source) == (1, 1)
    (ex,), _ = build_examples([{"text": "ab"}], "text", tok, 4, 10, 20)  # BOS is never a target
    assert ex["labels"] == [-100] + ids(tok, "ab") + [tok.eos_token_id]


# ---------------------------------------------------------------- truncation


def test_truncation_is_counted_per_kind(tok):
    eos = tok.eos_token_id
    rows = [
        {"prompt": "0123456789", "completion": "ab"},  # prompt 10 > 6: keep the last 6
        {"prompt": "p", "completion": "abcdefgh"},  # answer 8+EOS > 5: keep the first 5, EOS lost
        {"prompt": "pppppp", "completion": "abcd"},  # 6 + 5 > 9: cut the end
        {"prompt": "p", "completion": "a"},  # untouched
    ]
    examples, stats = build_examples(rows, "completion", tok, max_source_len=6, max_target_len=5, max_seq_len=9)
    assert examples[0]["input_ids"] == ids(tok, "456789ab") + [eos]
    assert examples[1]["input_ids"] == ids(tok, "pabcde")
    assert examples[1]["labels"] == [-100] + ids(tok, "abcde")
    assert examples[2]["input_ids"] == ids(tok, "ppppppabc")
    assert examples[3]["input_ids"] == ids(tok, "pa") + [eos]
    assert (stats.truncated, stats.truncated_source, stats.truncated_target, stats.truncated_total) == (3, 1, 1, 1)
    assert (stats.examples, stats.dropped, stats.empty) == (4, 0, 0)
    assert "3 truncated (prompt 1, answer 1, max_seq_len 1)" in stats.summary()


def test_rows_whose_answer_is_truncated_away_are_dropped(tok):
    rows = [{"prompt": "x" * 20, "completion": "a"}, {"prompt": "p", "completion": "a"}]
    examples, stats = build_examples(rows, "completion", tok, max_source_len=20, max_target_len=5, max_seq_len=20)
    assert [e["row"] for e in examples] == [1]
    assert (stats.rows, stats.examples, stats.dropped) == (2, 1, 1)


def test_all_rows_truncated_away_is_an_error(tok):
    rows = [{"prompt": "x" * 20, "completion": "a"}] * 3
    with pytest.raises(QloraError,
                       match=r"^d\.jsonl: all 3 rows were truncated away; raise max_target_len/max_seq_len"):
        build_examples(rows, "completion", tok, 20, 5, 20, source="d.jsonl")


def test_text_format_is_limited_by_max_seq_len_only(tok):
    (ex,), stats = build_examples([{"text": "x" * 30}], "text", tok, 4, 4, 16)
    assert len(ex["input_ids"]) == 16 and stats.truncated_target == 1


def test_empty_answers_are_skipped_and_counted(tok):
    rows = [{"instruction": "a", "output": ""}, {"instruction": "b", "output": "  "}, ROWS[1]]
    examples, stats = _one(tok, rows, "alpaca")
    assert [e["row"] for e in examples] == [2] and stats.empty == 2
    assert "2 with an empty answer" in stats.summary()


# ---------------------------------------------------------------- prompts for evaluation


def test_prompt_and_reference_matches_training_prompt(tok):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    prompt, ref = prompt_and_reference(row, "chat", tok)
    (ex,), _ = _one(tok, [row], "chat")
    assert ref == "yo" and ex["input_ids"][: len(prompt)] == prompt
    assert tok.decode(prompt) == tok.apply_chat_template(row["messages"][:1], tokenize=False,
                                                         add_generation_prompt=True)
    prompt, ref = prompt_and_reference(ROWS[0], "alpaca", tok)
    assert ref == "5" and prompt == ids(tok, ALPACA_PROMPT.format(instruction="Add the numbers.", input="2 3"))
    with pytest.raises(QloraError, match="text"):
        prompt_and_reference({"text": "a"}, "text", tok)


# ---------------------------------------------------------------- real shared data


def _shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"shared data {path} is absent (it lives beside the repo, in ../shared/data)")
    return path


def test_real_oasst_guanaco_subset(tok):
    path = _shared("oasst1_guanaco_train_subset_1k.jsonl")
    rows, fmt = read_dataset(str(path))
    assert (fmt, len(rows)) == ("guanaco", 1000)
    examples, stats = build_examples(rows[:200], fmt, tok, 8192, 8192, 16384, source=str(path))
    assert stats.truncated == 0 and stats.examples == 200
    eos = tok.eos_token_id
    for ex, row in zip(examples, rows):
        labels, text = ex["labels"], row["text"]
        # one target run per non-empty assistant turn, each ending in EOS, none containing a human turn
        runs, run = [], []
        for t, lab in zip(ex["input_ids"], labels):
            if lab != -100:
                run.append(t)
            elif run:
                runs.append(run)
                run = []
        runs += [run] if run else []
        answers = [a.split("### Human:")[0] for a in text.split("### Assistant:")[1:]]
        assert len(runs) == sum(1 for a in answers if a.strip())
        assert all(r[-1] == eos and "### Human:" not in tok.decode(r) for r in runs)
        assert tok.decode([t for t in ex["input_ids"] if t != eos]) == text


def test_real_code_alpaca(tok):
    path = _shared("code_alpaca_2k.jsonl")
    rows, fmt = read_dataset(str(path))
    assert (fmt, len(rows)) == ("alpaca", 2017)
    examples, stats = build_examples(rows, fmt, tok, 1024, 1024, 2048, source=str(path))
    assert stats.empty == 2 and stats.examples + stats.empty + stats.dropped == 2017  # two rows have no output
    for ex in examples[:300]:
        row = rows[ex["row"]]
        target = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
        if not stats.truncated:
            assert tok.decode(target) == row["output"] + tok.eos_token
        assert ex["labels"][0] == -100 and tok.decode(ex["input_ids"]).startswith("Below is an instruction")
