"""A mixture is rebuilt from (spec, seed) on resume: the resumed run is bitwise the uninterrupted one,
and a run whose examples differ (another mixture) is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.config import build_config
from qlora.errors import QloraError
from qlora.train import fit, setup


def _data(tmp_path: Path) -> list[str]:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"Echo {i}:", "completion": f" {i}"}) + "\n" for i in range(8)))
    b.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "output": f"{i + 1}"}) + "\n"
                         for i in range(24)))
    return [f"{a}:0.6", f"{b}:0.4"]


def _cfg(tmp_path, model, out, **kw):
    base = dict(model=model, data=_data(tmp_path), output_dir=str(tmp_path / out), max_steps=4, batch_size=4, lora_r=4,
                logging_steps=1, save_steps=2, eval_steps=0, warmup_ratio=0.0, threads=1, optimizer="adamw")
    return build_config({**base, **kw})


def test_resume_with_a_mixture_is_bitwise(tiny_llama, tmp_path):
    full = fit(setup(_cfg(tmp_path, tiny_llama, "full")), progress=False)
    fit(setup(_cfg(tmp_path, tiny_llama, "part", max_steps=2)), progress=False)
    state = json.loads((tmp_path / "part" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["config"]["data"] == _data(tmp_path) and len(state["data_digest"]) == 16
    resumed = fit(setup(_cfg(tmp_path, tiny_llama, "part", resume="latest")), progress=False)
    read = lambda d: [(r["step"], r["loss"], r["grad_norm"])  # noqa: E731
                      for r in map(json.loads, (Path(d) / "metrics.jsonl").read_text().splitlines())]
    assert read(full["output_dir"]) == read(resumed["output_dir"]) and len(read(full["output_dir"])) == 4
    a = load_file(str(Path(full["output_dir"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed["output_dir"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_mixture(tiny_llama, tmp_path):
    fit(setup(_cfg(tmp_path, tiny_llama, "run", max_steps=2)), progress=False)
    other = _cfg(tmp_path, tiny_llama, "run", resume="latest")
    other.data = [other.data[0].replace(":0.6", ":0.5"), other.data[1].replace(":0.4", ":0.5")]
    with pytest.raises(QloraError, match=r"step-000002: the training examples differ from the checkpoint's"):
        fit(setup(other), progress=False)
