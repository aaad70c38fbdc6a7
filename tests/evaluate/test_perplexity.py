import math

import pytest
import torch

from qlora.errors import QloraError
from qlora.evaluate.perplexity import perplexity, read_text, spans, tokenize

from .helpers import Bigram, random_bigram


def test_spans_non_overlapping_and_sliding():
    # non-overlapping: each window's first token has no context and is not predicted
    assert spans(8, 4, 4) == [(0, 4, 1), (4, 8, 5)]
    assert spans(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    # sliding: every token after the first is predicted exactly once
    assert spans(8, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6)]
    assert spans(5, 8, 2) == [(0, 5, 1)]
    with pytest.raises(QloraError):
        spans(10, 4, 5)


def test_uniform_model_has_perplexity_vocab_size():
    model = Bigram(torch.full((7, 7), 1 / 7))
    r = perplexity(model, torch.randint(7, (50,)), window=8, progress=False)
    assert r.perplexity == pytest.approx(7.0, rel=1e-6)
    assert (r.tokens, r.windows) == (50 - 7, 7)  # 6 windows of 8 (7 predicted each) + 2 tokens (1 predicted)


def _hand_nll(model, ids, positions):
    return sum(-model.logp[ids[t - 1], ids[t]].item() for t in positions) / len(positions)


def test_bigram_perplexity_matches_hand_calculation():
    model = random_bigram(5)
    ids = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4, 1, 3])
    r = perplexity(model, ids, window=4, progress=False)  # windows [0:4] [4:8] [8:10]
    expected = _hand_nll(model, ids, [1, 2, 3, 5, 6, 7, 9])
    assert r.nll == pytest.approx(expected, rel=1e-6) and r.perplexity == pytest.approx(math.exp(expected), rel=1e-6)
    assert r.tokens == 7
    s = perplexity(model, ids, window=4, stride=2, progress=False)
    assert s.nll == pytest.approx(_hand_nll(model, ids, range(1, 10)), rel=1e-6) and s.tokens == 9


def test_batching_changes_nothing():
    model = random_bigram(6, seed=1)
    ids = torch.randint(6, (100,), generator=torch.Generator().manual_seed(0))
    one = perplexity(model, ids, window=16, stride=8, batch_size=1, progress=False)
    many = perplexity(model, ids, window=16, stride=8, batch_size=5, progress=False)
    assert many.nll == pytest.approx(one.nll, rel=1e-9) and many.tokens == one.tokens


def test_equals_transformers_loss_on_a_tiny_model():
    from tiny import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(260, (64,), generator=torch.Generator().manual_seed(0))
    r = perplexity(model, ids, window=64, progress=False)
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    assert r.nll == pytest.approx(loss, rel=1e-5)


def test_tokenize_and_read_text(tmp_path, byte_tokenizer):
    (tmp_path / "t.txt").write_text("hello world", encoding="utf-8")
    ids = tokenize(byte_tokenizer, read_text(str(tmp_path / "t.txt")), max_tokens=5)
    assert ids.tolist() == byte_tokenizer("hello", add_special_tokens=False)["input_ids"]
    (tmp_path / "d.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n', encoding="utf-8")
    assert read_text(str(tmp_path / "d.jsonl"), "body") == "a\n\nb"
    with pytest.raises(QloraError, match="d.jsonl:1: no string column 'text'"):
        read_text(str(tmp_path / "d.jsonl"))
    with pytest.raises(QloraError, match="at least 2"):
        tokenize(byte_tokenizer, "x")
