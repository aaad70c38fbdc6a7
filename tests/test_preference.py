"""Preference tuning: pair data, DPO/ORPO losses against a hand computation, the reference pass, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qlora import hf
from qlora.config import build_config
from qlora.data import preference
from qlora.errors import QloraError
from qlora.nn.lora import LoRALinear, disabled
from qlora.nn.surgery import add_lora
from qlora.objectives import preference_loss, sequence_logps
from qlora.train import fit, setup

ROWS = [
    {"prompt": "Repeat 12:", "chosen": " 12", "rejected": " 13"},
    {"prompt": [{"role": "user", "content": "Say 7."}], "chosen": "7",
     "rejected": [{"role": "assistant", "content": "8"}]},
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
    {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
     "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
]


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_shapes_split_into_prompt_chosen_rejected():
    loc = lambda: "f.jsonl:1"  # noqa: E731
    assert preference.split(ROWS[0], loc) == ("Repeat 12:", " 12", " 13")
    prompt, chosen, rejected = preference.split(ROWS[1], loc)
    assert chosen == [{"role": "assistant", "content": "7"}] and rejected == [{"role": "assistant", "content": "8"}]
    # HH-RLHF: the shared prompt ends at the last "\n\nAssistant:" both dialogues share
    assert preference.split(ROWS[2], loc) == ("\n\nHuman: hi\n\nAssistant:", " hello there", " go away")
    prompt, chosen, rejected = preference.split(ROWS[3], loc)
    assert prompt == ROWS[3]["chosen"][:1] and chosen == ROWS[3]["chosen"][1:] and rejected == ROWS[3]["rejected"][1:]


@pytest.mark.parametrize("row, match", [
    ({"prompt": "p", "chosen": "a"}, "f.jsonl:2: a preference row needs 'chosen' and 'rejected'"),
    ({"prompt": "p", "chosen": "a", "rejected": 3}, "f.jsonl:2: 'rejected' must be a string when 'prompt' is"),
    ({"chosen": "Human: a", "rejected": "Human: b"}, "f.jsonl:2: 'chosen' and 'rejected' share no prompt ending"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "f.jsonl:2: 'chosen' and 'rejected' must share their first message"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "f.jsonl:2: 'chosen' must end with an assistant message"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, match):
    path = _write(tmp_path / "f.jsonl", [ROWS[0], row])
    with pytest.raises(QloraError, match=match):
        preference.read_pairs(path)


def test_pairs_learn_only_the_final_answer(tiny_llama):
    _, tok = hf.load(tiny_llama, quant_type="bf16", compute_dtype=torch.float32)
    pairs, stats = preference.build_pairs(ROWS + [{"prompt": "p", "chosen": " ", "rejected": "x"}], tok, 64, 32, 96)
    assert stats.examples == 4 and stats.empty == 1 and [p["targets"] for p in pairs] == [1, 1, 1, 1]
    first = pairs[0]
    learned = [t for t in first["chosen"]["labels"] if t != -100]
    assert tok.decode(learned) == " 12" + tok.eos_token  # the answer and its EOS, never the prompt
    n_prompt = first["chosen"]["labels"].index(learned[0])
    assert first["chosen"]["input_ids"][:n_prompt] == first["rejected"]["input_ids"][:n_prompt]  # one shared prompt


def _policy_and_batch(tiny_llama):
    model, tok = hf.load(tiny_llama, quant_type="nf4", compute_dtype=torch.float32)
    pairs, _ = preference.build_pairs(ROWS, tok, 64, 32, 96)
    batch = preference.collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        base_logps, _ = sequence_logps(model, batch)  # before LoRA: the base model itself
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.05)  # a policy that differs from the base
    return model, batch, base_logps


def _hand_logps(model, batch) -> list[float]:
    """Sum of log p(label) over target positions, from the full logits, row by row."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    out = []
    for row in range(batch["input_ids"].shape[0]):
        total = 0.0
        for t in range(batch["input_ids"].shape[1] - 1):
            label = int(batch["labels"][row, t + 1])
            if label != -100:
                total += float(torch.log_softmax(logits[row, t], -1)[label])
        out.append(total)
    return out


def test_reference_pass_equals_the_base_models_logps_exactly(tiny_llama):
    model, batch, base_logps = _policy_and_batch(tiny_llama)
    with torch.no_grad():
        policy, _ = sequence_logps(model, batch)
        with disabled(model):
            reference, _ = sequence_logps(model, batch)
    assert not torch.equal(policy, base_logps)  # LoRA is active outside the block
    assert torch.equal(reference, base_logps)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_losses_match_a_hand_computation(tiny_llama, objective):
    model, batch, _ = _policy_and_batch(tiny_llama)
    beta = 0.3
    loss, sums = preference_loss(model, batch, objective, beta)
    pol = _hand_logps(model, batch)
    with disabled(model):
        ref = _hand_logps(model, batch)
    counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()
    p = len(pol) // 2
    losses, margins = [], []
    for i in range(p):
        c, r = pol[i], pol[p + i]
        if objective == "dpo":
            rc, rr = beta * (c - ref[i]), beta * (r - ref[p + i])
            losses.append(math.log1p(math.exp(-(rc - rr))))  # -log sigmoid(x)
        else:
            ac, ar = c / counts[i], r / counts[p + i]
            log_odds = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
            losses.append(-ac + beta * math.log1p(math.exp(-log_odds)))
            rc, rr = beta * ac, beta * ar
        margins.append(rc - rr)
    assert float(loss) == pytest.approx(sum(losses), rel=1e-5)
    assert sums["pairs"] == p and sums["reward_margin"] == pytest.approx(sum(margins), rel=1e-4, abs=1e-6)
    assert sums["reward_accuracy"] == sum(m > 0 for m in margins)
    assert sums["logps_chosen"] == pytest.approx(sum(pol[:p]), rel=1e-5)
    assert sums["logps_rejected"] == pytest.approx(sum(pol[p:]), rel=1e-5)


def _cfg(tmp_path, model, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"Repeat {i * 7 % 100}:", "chosen": f" {i * 7 % 100}", "rejected": f" {(i * 7 + 3) % 100}"}
            for i in range(24)]
    base = dict(model=model, data=_write(tmp_path / "pairs.jsonl", rows), output_dir=str(tmp_path / "out"),
                objective="dpo", max_steps=6, batch_size=4, lora_r=4, logging_steps=1, save_steps=3, eval_steps=0,
                warmup_ratio=0.0, threads=1, optimizer="adamw", lr=1e-3)
    return build_config({**base, **kw})


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_resume_is_bitwise_identical_and_metrics_logged(tiny_llama, tmp_path, objective):
    from safetensors.torch import load_file

    full = fit(setup(_cfg(tmp_path / "full", tiny_llama, objective=objective)), progress=False)
    fit(setup(_cfg(tmp_path / "part", tiny_llama, objective=objective, max_steps=3)), progress=False)
    resumed = fit(setup(_cfg(tmp_path / "part", tiny_llama, objective=objective, resume="latest")), progress=False)
    timing = ("tokens_per_s", "peak_rss_mb")  # measured, not computed: everything else must match exactly
    recs = lambda d: [{k: v for k, v in json.loads(ln).items() if k not in timing}  # noqa: E731
                      for ln in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    assert recs(full["output_dir"]) == recs(resumed["output_dir"])
    first = recs(full["output_dir"])[0]
    assert {"reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected"} <= set(first)
    assert 0 <= first["reward_accuracy"] <= 1 and first["logps_chosen"] < 0
    a = load_file(str(Path(full["output_dir"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed["output_dir"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_raises_the_chosen_answers_margin(tiny_llama, tmp_path):
    # one fixed batch of 4 pairs, every step: the policy must learn to prefer its chosen answers
    cfg = _cfg(tmp_path, tiny_llama, max_steps=12, save_steps=0, val_fraction=0.0, lr=5e-3, lora_dropout=0.0,
               logging_steps=1)
    cfg.data = _write(tmp_path / "four.jsonl", [json.loads(ln) for ln in Path(cfg.data).read_text().splitlines()[:4]])
    out = fit(setup(cfg), progress=False)
    recs = [json.loads(ln) for ln in (Path(out["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy = reference, margin 0
    assert recs[-1]["reward_margin"] > 0.1 and recs[-1]["loss"] < recs[0]["loss"]


def test_objective_settings_are_checked():
    with pytest.raises(QloraError, match="beta must be > 0"):
        build_config({"objective": "dpo", "beta": 0})
    with pytest.raises(QloraError, match="data_format, train_on_source and packing apply to sft only"):
        build_config({"objective": "orpo", "data_format": "alpaca"})


def test_preflight_counts_two_sequences_per_pair():
    from qlora.memory.plan import settings_for

    sft = settings_for(build_config({"batch_size": 3, "max_target_len": 40}))
    dpo = settings_for(build_config({"batch_size": 3, "max_target_len": 40, "objective": "dpo"}))
    assert (sft["batch_size"], sft["target_tokens"]) == (3, None)
    assert (dpo["batch_size"], dpo["target_tokens"], dpo["objective"]) == (6, 40, "dpo")


def test_dpo_under_gradient_checkpointing_matches(tiny_llama, tmp_path):
    """The reference pass runs forward-only inside a checkpointed model; the step is unchanged."""
    losses = []
    for gc in (False, True):
        out = fit(setup(_cfg(tmp_path / str(gc), tiny_llama, max_steps=2, save_steps=0, lora_dropout=0.0,
                             gradient_checkpointing=gc)), progress=False)
        lines = (Path(out["output_dir"]) / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(ln)["loss"] for ln in lines])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def _parse_answer(answer: str) -> tuple[dict, bool]:
    """(the record a demo answer holds, whether it is the compact one-line style the task asks for)."""
    text = answer.removeprefix("JSON:\n").removeprefix("```json\n").removesuffix("\n```")
    record = json.loads(text)
    return record, answer == json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def test_demo_pairs_reject_the_base_models_verbose_styles_and_wrong_fields():
    from collections import Counter

    from qlora import demo_task
    from qlora.demo_preference import make_pairs

    rows, _ = demo_task.make_demo_task(n_train=400, n_test=0, seed=0)
    pairs = make_pairs(rows, 0)
    assert pairs == make_pairs(rows, 0)  # same seed, same pairs
    styles = Counter()
    for row, pair in zip(rows, pairs):
        assert pair["prompt"] == row["messages"][:2] and pair["chosen"] == row["messages"][2]["content"]
        truth, chosen_compact = _parse_answer(pair["chosen"])
        record, compact = _parse_answer(pair["rejected"])
        wrong = [k for k in truth if record[k] != truth[k]]
        assert chosen_compact and record.keys() == truth.keys() and len(wrong) <= 1
        assert not compact or wrong  # a compact rejected answer always has a field wrong
        style = "compact" if compact else pair["rejected"].split("\n")[0]  # JSON: / ```json / {
        styles[style, bool(wrong)] += 1
    assert set(styles) == {("compact", True), *((s, w) for s in ("JSON:", "```json", "{") for w in (False, True))}
    assert 70 <= styles["compact", True] <= 130  # one pair in four: compact with a field wrong; else verbose
