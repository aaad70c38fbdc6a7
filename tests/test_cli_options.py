"""The flags verbs share (qlora.cli.options): one definition, one spelling accepted everywhere."""

import argparse
import json
from pathlib import Path

import pytest

from qlora.cli import build_parser, main
from qlora.quant.blockwise import BLOCKSIZES
from tiny import save_tiny_adapter

MODEL_VERBS = (["generate", "hi"], ["chat"], ["serve"], ["eval", "perplexity"], ["eval", "choice"],
               ["merge", "--adapter", "a", "--output-dir", "o"], ["export", "--format", "bnb", "--output-dir", "o"])


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.mark.parametrize("verb", MODEL_VERBS, ids=lambda v: " ".join(v[:2]))
def test_every_model_verb_takes_the_base_format_and_both_dtype_spellings(parser, verb):
    args = parser.parse_args([*verb, "--quant-type", "fp4", "--blocksize", "32", "--no-double-quant",
                              "--dtype", "fp32"])
    assert (args.quant_type, args.blocksize, args.double_quant, args.dtype) == ("fp4", 32, False, "float32")
    assert parser.parse_args([*verb, "--dtype", "bfloat16"]).dtype == "bfloat16"
    assert parser.parse_args([*verb, "--dtype", "bf16"]).dtype == "bfloat16"
    defaults = parser.parse_args(verb)  # None: as the adapter recorded (generate.load_model)
    assert (defaults.quant_type, defaults.blocksize, defaults.double_quant) == (None, None, None)


def test_train_takes_bf16_as_quant_type_and_as_dtype_alias(parser):
    args = parser.parse_args(["train", "--quant-type", "bf16", "--compute-dtype", "bf16", "--lora-dtype", "bf16"])
    assert (args.quant_type, args.compute_dtype, args.lora_dtype) == ("bf16", "bfloat16", "bfloat16")


def test_blocksize_choices_are_the_quantizers(parser, capsys):
    for bs in BLOCKSIZES:
        assert parser.parse_args(["eval", "perplexity", "--blocksize", str(bs)]).blocksize == bs
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "perplexity", "--blocksize", "48"])
    assert "invalid choice: 48" in capsys.readouterr().err


@pytest.mark.parametrize("verb", (["merge", "--adapter", "a"], ["export", "--format", "peft"], ["train"]))
def test_output_dir_and_its_alias(parser, verb):
    assert parser.parse_args([*verb, "--output-dir", "x"]).output_dir == "x"
    assert parser.parse_args([*verb, "--output", "y"]).output_dir == "y"


def test_merge_requires_an_output_dir_by_its_name(parser, capsys):
    with pytest.raises(SystemExit):
        parser.parse_args(["merge", "--adapter", "a"])
    assert "--output-dir" in capsys.readouterr().err


def test_merge_and_generate_with_the_shared_flags(tmp_path, capsys):
    model_dir, adapter = save_tiny_adapter(tmp_path)
    assert main(["merge", "--model", model_dir, "--adapter", adapter, "--output-dir", str(tmp_path / "m"),
                 "--dtype", "float32", "--blocksize", "128"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "float32"
    assert Path(tmp_path / "m" / "model.safetensors").is_file()
    assert main(["generate", "--model", model_dir, "--adapter", adapter, "--raw", "--max-new-tokens", "2",
                 "--blocksize", "32", "--no-double-quant", "--dtype", "fp32", "hi"]) == 0
    assert "(nf4@32 + 1 adapter(s), float32)" in capsys.readouterr().err


def _verbs(parser):
    """Every command line the parser offers: each verb, and each sub-verb under it."""
    def subparsers(p):
        return next((a.choices for a in p._actions if isinstance(a, argparse._SubParsersAction)), {})

    for name, sub in subparsers(parser).items():
        yield [name]
        yield from ([name, inner] for inner in subparsers(sub))


def test_every_verb_prints_its_help(parser, capsys):
    # help text comes partly from TrainConfig docstrings; a bare `%` in one once crashed `train --help`
    verbs = list(_verbs(parser))
    assert ["train"] in verbs and ["memory"] in verbs and ["eval", "perplexity"] in verbs
    for verb in verbs:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([*verb, "--help"])
        assert e.value.code == 0, verb
        assert "usage: qlora " + " ".join(verb) in capsys.readouterr().out
