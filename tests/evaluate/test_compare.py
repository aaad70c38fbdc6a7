import pytest
import torch

from qlora.evaluate.compare import example_losses, paired_bootstrap, summarize


def test_bootstrap_is_deterministic_for_a_seed():
    a = [0.1 * i for i in range(30)]
    b = [0.1 * i + (0.05 if i % 3 else -0.2) for i in range(30)]
    one, two = paired_bootstrap(a, b, rounds=2000, seed=7), paired_bootstrap(a, b, rounds=2000, seed=7)
    assert one == two
    assert one != paired_bootstrap(a, b, rounds=2000, seed=8)
    lo, hi = one["ci95"]
    assert lo <= one["diff"] <= hi and one["n"] == 30


def test_bootstrap_exact_cases():
    same = paired_bootstrap([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], rounds=100)
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["frac_a_above_b"] == 0.0
    shifted = paired_bootstrap([1.5, 2.5, 3.5], [1.0, 2.0, 3.0], rounds=100)
    assert shifted["diff"] == pytest.approx(0.5) and shifted["ci95"] == pytest.approx([0.5, 0.5])
    # two examples, differences 0 and 1: a resample mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4
    r = paired_bootstrap([0.0, 1.0], [0.0, 0.0], rounds=20_000, seed=0)
    assert r["ci95"] == [0.0, 1.0] and r["frac_a_above_b"] == pytest.approx(0.75, abs=0.01)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_summarize_verdicts():
    better = summarize("exact_match", [1.0] * 10, [0.0] * 10, 100, 0)
    assert better["verdict"] == "A better"
    lower_loss = summarize("loss", [1.0] * 10, [2.0] * 10, 100, 0)
    assert lower_loss["verdict"] == "A better" and lower_loss["ppl_b"] == pytest.approx(torch.e**2)
    assert summarize("loss", [1.0, 2.0], [2.0, 1.0], 100, 0)["verdict"].startswith("no significant")


def test_example_losses_equal_transformers_loss():
    from tiny import tiny_model

    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (12, 7, 20):
        ids = torch.randint(256, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :]})
    losses = example_losses(model, examples, pad_id=259, batch_size=3, progress=False)
    for ex, loss in zip(examples, losses):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss.item()
        assert loss == pytest.approx(ref, rel=1e-4)
