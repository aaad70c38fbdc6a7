"""qlora.data.packing: packed rows give each example exactly its unpacked loss; training packs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from qlora import data, hf
from qlora.config import build_config
from qlora.train import fit, loss_sum, setup

ROWS = [{"prompt": "ab", "completion": "cdef"}, {"prompt": "xyz12", "completion": "q"},
        {"prompt": "hello there", "completion": " general"}, {"prompt": "1+1=", "completion": "2"}]


def test_pack_first_fit_positions_restart_and_seq_ids():
    ex = [{"input_ids": [1] * n, "labels": [2] * n, "row": i} for i, n in enumerate([5, 4, 3, 5])]
    rows = data.pack(ex, 10)
    assert [r["rows"] for r in rows] == [[0, 1], [2, 3]]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert rows[1]["seq_ids"] == [1, 1, 1, 2, 2, 2, 2, 2]
    batch = data.collate(rows, 0)
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0]  # padding: position 0, seq 0
    assert batch["seq_ids"][1].tolist()[-1] == 0 and batch["attention_mask"][1].tolist()[-1] == 0


def test_block_causal_mask():
    m = data.block_causal_mask(torch.tensor([[1, 1, 2, 2, 0]]), torch.float32)[0, 0]
    allowed = (m == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert m.min() == torch.finfo(torch.float32).min  # finite: a padding query gives no NaN


def test_each_packed_example_has_its_unpacked_loss(tiny_llama):
    """Tolerance: fp32, rtol 1e-5 / atol 1e-5 (only the summation order of attention differs)."""
    model, tok = hf.load(tiny_llama, quant_type="nf4", compute_dtype=torch.float32)
    examples, _ = data.build_examples(ROWS, "completion", tok, 64, 32, 96)
    packed = data.pack(examples, 96)
    assert len(packed) == 1 and len(packed[0]["rows"]) == 4
    batch = data.collate(packed, tok.pad_token_id)
    bounds = torch.tensor(packed[0]["seq_ids"])
    with torch.no_grad():
        for j, e in enumerate(examples):
            alone = data.collate([e], tok.pad_token_id)
            s_alone, n_alone = loss_sum(model, alone)
            only_j = dict(batch, labels=batch["labels"].clone())
            only_j["labels"][0, : len(bounds)][bounds != j + 1] = -100
            s_packed, n_packed = loss_sum(model, only_j)
            assert n_packed == n_alone == len(e["input_ids"]) - e["labels"].count(-100)
            torch.testing.assert_close(s_packed, s_alone, rtol=1e-5, atol=1e-5)


def test_training_with_packing_runs_on_packed_rows(tiny_llama, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 5))
    cfg = build_config(dict(model=tiny_llama, data=str(path), output_dir=str(tmp_path / "out"), max_steps=2,
                            batch_size=2, lora_r=4, eval_steps=0, save_steps=0, val_fraction=0.0, packing=True,
                            max_seq_len=64, threads=1, logging_steps=1))
    run = setup(cfg)
    assert len(run.train_set) < 20 and sum(len(r["rows"]) for r in run.train_set) == 20
    assert all(len(r["input_ids"]) <= 64 for r in run.train_set)
    out = fit(run, progress=False)
    losses = [json.loads(ln)["loss"] for ln in (Path(out["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
