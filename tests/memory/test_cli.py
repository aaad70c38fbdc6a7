"""`qlora memory`: the report's table, the plan and the JSON (qlora/memory/report.py through the CLI)."""

from __future__ import annotations

import json

import pytest

from qlora.cli import main
from qlora.memory import preflight

from .helpers import train_config as _cfg


def test_cli_table_plan_and_json(capsys):
    assert main(["memory", "--model", "7B", "--batch-size", "1", "--gradient-checkpointing", "--budget", "12GiB"]) == 0
    out = capsys.readouterr().out
    for part in ("4-bit weights: codes", "LoRA gradients", "optimizer state", "activations", "total (training step)",
                 "plan for a budget of 12.00 GiB", "<- recommended"):
        assert part in out
    assert main(["memory", "--model", "65B", "--json", "--device", "cuda"]) == 0
    data = json.loads(capsys.readouterr().out)
    b = data["breakdown"]
    assert b["total"] == sum(b[k] for k in ("weights_4bit", "weights_16bit", "lora_weights", "lora_grads",
                                            "optimizer_states", "activations", "logits", "dequant_workspace",
                                            "framework_overhead"))
    assert b["settings"]["batch_size"] == 8 and data["model"] == "LLaMA-65B"


def test_cli_lora_dtype_is_the_trainers_option(capsys):
    assert main(["memory", "--model", "7B", "--lora-dtype", "bfloat16", "--json"]) == 0
    b = json.loads(capsys.readouterr().out)["breakdown"]
    assert b["settings"]["lora_dtype"] == "bfloat16" and b["lora_weights"] == 2 * b["n_lora_params"]
    with pytest.raises(SystemExit) as e:  # the choices are `qlora train`'s
        main(["memory", "--model", "7B", "--lora-dtype", "float16"])
    assert e.value.code == 2
    assert "invalid choice: 'float16'" in capsys.readouterr().err
    b16 = preflight(_cfg(lora_dtype="bfloat16", gradient_checkpointing=True), available_bytes=2**40)
    assert b16.settings["lora_dtype"] == "bfloat16" and b16.lora_grads == 2 * b16.n_lora_params


def test_cli_errors(capsys):
    assert main(["memory", "--model", "7B", "--budget", "lots"]) == 2
    assert "--budget: cannot read 'lots'" in capsys.readouterr().err
    assert main(["memory", "--model", "/nonexistent/model"]) == 2
