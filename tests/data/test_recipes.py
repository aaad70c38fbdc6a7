"""configs/guanaco-*.yaml: the paper's setups load as valid configs; the small one trains (smoke test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora.config import build_config, load_yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PAPER = {"7b": (2e-4, 0.1), "13b": (2e-4, 0.1), "33b": (1e-4, 0.05), "65b": (1e-4, 0.05)}


@pytest.mark.parametrize("size", list(PAPER))
def test_guanaco_configs_are_the_papers(size):
    path = CONFIGS / f"guanaco-{size}.yaml"
    cfg = build_config(load_yaml(str(path)), source=str(path))
    assert (cfg.lr, cfg.lora_dropout) == PAPER[size]
    assert (cfg.batch_size * cfg.grad_accum, cfg.max_steps, cfg.optimizer, cfg.group_by_length) == (
        16, 1875, "paged_adamw", True)
    assert (cfg.max_source_len, cfg.max_target_len, cfg.lora_r, cfg.lora_alpha, cfg.quant_type) == (
        16, 512, 64, 16.0, "nf4")
    assert (cfg.data == "timdettmers/openassistant-guanaco" and cfg.lr_scheduler == "constant"
            and cfg.max_grad_norm == 0.3)


def test_small_guanaco_config_trains_a_few_steps(tiny_llama, tmp_path):
    from qlora.train import train

    data = tmp_path / "oasst.jsonl"
    data.write_text("".join(json.dumps({"text": f"### Human: What is {i} + {i}?### Assistant: {2 * i}."}) + "\n"
                            for i in range(24)))
    path = CONFIGS / "guanaco-smollm2.yaml"
    values = {**load_yaml(str(path)), "model": tiny_llama, "data": str(data), "max_steps": 2, "eval_steps": 0,
              "save_steps": 0, "output_dir": str(tmp_path / "out"), "lora_r": 4, "threads": 1}
    summary = train(build_config(values, source=str(path)))
    assert summary["steps"] == 2 and summary["data"]["format"] == "text"
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
