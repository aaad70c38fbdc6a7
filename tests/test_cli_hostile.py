"""Hostile input through the CLI: each case is a one-line error naming the file/line/key, exit
status 2, and an output directory that was never created (reliability issue, item 7).

The data cases are the catalogue of tests/data/test_hostile.py, driven through `qlora train`; the rest
cover config, adapters, checkpoints and weights. `qlora.cli.main` runs in-process (same code path
as the console script, without paying interpreter start-up per case)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from qlora.cli import main
from data.test_hostile import CASES  # tests/data/test_hostile.py


def _run(capsys, *args) -> tuple[int, str]:
    rc = main(list(args))
    err = capsys.readouterr().err.strip()
    return rc, err


def _assert_one_line_error(rc, err, out_dir, needle):
    lines = [ln for ln in err.splitlines() if ln.startswith("qlora ")]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("qlora train: error: "), err
    assert needle in lines[0], err
    assert not out_dir.exists()


@pytest.mark.parametrize("name, content, expected", [c[:3] for c in CASES if c[2] is not None],
                         ids=[c[0] for c in CASES if c[2] is not None])
def test_bad_data_file(tiny_llama, tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    out = tmp_path / "out"
    rc, err = _run(capsys, "train", "--model", tiny_llama, "--data", str(path), "--output-dir", str(out))
    _assert_one_line_error(rc, err, out, str(path))
    assert re.search(expected, err.split("qlora train: error: " + str(path), 1)[1]), err  # after the format report


def _good_data(tmp_path):
    p = tmp_path / "good.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(8)))
    return str(p)


@pytest.mark.parametrize("extra, needle", [
    (["--data", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    (["--data", "/tmp"], "/tmp"),
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--max-steps", "0"], "max_steps must be > 0"),
    (["--batch-size", "-2"], "batch_size must be > 0"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--lora-dropout", "2"], "lora_dropout must be in"),
    (["--blocksize", "100"], "blocksize must be a power of two"),
    (["--optimizer-memory-budget", "lots"], "optimizer_memory_budget: cannot read 'lots'"),
    (["--max-seq-len", "ten"], "max_seq_len: expected an integer"),
])
def test_bad_arguments(tiny_llama, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    args = ["train", "--model", tiny_llama, "--data", _good_data(tmp_path), "--output-dir", str(out)]
    rc, err = _run(capsys, *args, *extra)
    _assert_one_line_error(rc, err, out, needle)


@pytest.mark.parametrize("yaml_text, needle", [
    ("lora_rank: 8\n", "unknown key 'lora_rank' (did you mean 'lora_r'?)"),
    ("lr: [1, 2\n", "invalid YAML"),
    ("- a\n", "expected a mapping"),
    ("double_quant: perhaps\n", "double_quant: expected true/false"),
])
def test_bad_config_file(tiny_llama, tmp_path, capsys, yaml_text, needle):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml_text)
    out = tmp_path / "out"
    rc, err = _run(capsys, "train", "--config", str(cfg), "--model", tiny_llama, "--data", _good_data(tmp_path),
                   "--output-dir", str(out))
    _assert_one_line_error(rc, err, out, needle)
    assert str(cfg) in err


def test_nan_in_weights(tmp_path, capsys):
    from tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nanmodel")
    tiny_tokenizer().save_pretrained(tmp_path / "nanmodel")
    out = tmp_path / "out"
    rc, err = _run(capsys, "train", "--model", str(tmp_path / "nanmodel"), "--data", _good_data(tmp_path),
                   "--output-dir", str(out), "--force")
    _assert_one_line_error(rc, err, out, "model.layers.1.mlp.up_proj.weight")
    assert "NaN or Inf" in err


def test_truncated_safetensors_model(tiny_llama, tmp_path, capsys):
    import shutil

    bad = tmp_path / "trunc"
    shutil.copytree(tiny_llama, bad)
    st = next(bad.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    out = tmp_path / "out"
    rc, err = _run(capsys, "train", "--model", str(bad), "--data", _good_data(tmp_path), "--output-dir", str(out),
                   "--force")
    _assert_one_line_error(rc, err, out, str(st))


def test_checkpoint_from_another_model(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", _good_data(tmp_path), "--output-dir", str(out), "--max-steps", "2", "--save-steps", "2",
              "--batch-size", "2", "--lora-r", "2", "--force"]
    assert main(["train", "--model", tiny_dirs["llama"], *common]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in out.rglob("*"))
    rc = main(["train", "--model", tiny_dirs["qwen2"], *common, "--max-steps", "4", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint was written with model=" in err
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing touched
