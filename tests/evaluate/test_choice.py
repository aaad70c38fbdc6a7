import json
import math

import pytest
import torch

from qlora.errors import QloraError
from qlora.evaluate.choice import TASKS, Question, evaluate_choice, load_task
from qlora.evaluate.scoring import encode_pair, loglikelihood

from .helpers import Bigram, random_bigram

V = 260  # the byte tokenizer's vocabulary


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_encode_pair_moves_trailing_spaces_to_the_continuation(byte_tokenizer):
    ctx, cont = encode_pair(byte_tokenizer, "Answer: ", "yes")
    assert ctx == _ids(byte_tokenizer, "Answer:") and cont == _ids(byte_tokenizer, " yes")
    ctx, cont = encode_pair(byte_tokenizer, "", "hi")
    assert ctx == [byte_tokenizer.bos_token_id] and cont == _ids(byte_tokenizer, "hi")


def test_loglikelihood_is_the_sum_of_bigram_entries(byte_tokenizer):
    model = random_bigram(V, seed=3)
    pairs = [("The cat", " sat"), ("A", " much longer continuation"), ("x y z", " é")]
    for batch in (1, 2, 8):
        scores = loglikelihood(model, byte_tokenizer, pairs, batch_size=batch, progress=False)
        for (c, x), s in zip(pairs, scores):
            ctx, cont = _ids(byte_tokenizer, c), _ids(byte_tokenizer, x)
            seq = ctx + cont
            hand = sum(model.logp[seq[t - 1], seq[t]].item() for t in range(len(ctx), len(seq)))
            assert s.logprob == pytest.approx(hand, rel=1e-5) and s.tokens == len(cont)


def test_greedy_flag(byte_tokenizer):
    a, b = _ids(byte_tokenizer, "a")[0], _ids(byte_tokenizer, "b")[0]
    probs = torch.full((V, V), 0.1 / (V - 1))
    probs[:, b] = 0.9  # after anything, "b" is most likely
    model = Bigram(probs / probs.sum(-1, keepdim=True))
    yes, no = loglikelihood(model, byte_tokenizer, [("a", "bb"), ("a", "ab")], progress=False)
    assert yes.greedy and not no.greedy
    assert yes.logprob == pytest.approx(2 * math.log(0.9), rel=1e-5)
    assert a != b


def test_acc_and_acc_norm_on_a_constructed_case(byte_tokenizer):
    # uniform model: log P = -(tokens) log V, tokens = 1 + len(choice) (the leading space).
    # acc prefers the shortest choice; acc_norm divides by len(choice): -(n+1)/n log V prefers the longest.
    model = Bigram(torch.full((V, V), 1 / V))
    q_short = Question(["Q:"] * 3, [" ab", " abcdef", " abcd"], 0, [2, 6, 4])
    q_long = Question(["Q:"] * 3, [" ab", " abcdef", " abcd"], 1, [2, 6, 4])
    r = evaluate_choice(model, byte_tokenizer, [q_short, q_long], "made-up", progress=False)
    assert r.correct == [True, False] and r.correct_norm == [False, True]
    assert (r.acc, r.acc_norm, r.n) == (0.5, 0.5, 2)
    assert r.acc_stderr == pytest.approx(math.sqrt(0.25 / 1))


def test_loaders_build_harness_prompts(tmp_path, monkeypatch):
    root = tmp_path / "eval"
    root.mkdir()
    rows = {
        "arc_easy_test.jsonl": {"query": "Question: Why?", "choices": ["a", "b"], "gold": 1},
        "piqa_val.jsonl": {"goal": "Open jar", "sol1": "twist", "sol2": "kick", "label": 0},
        "hellaswag_val.jsonl": {"activity_label": "Baking", "ctx": "She mixes  [title] the flour",
                                "endings": ["then bakes.", "x"], "label": 0},
        "winogrande_dev.jsonl": {"context_options": ["Ann helped Bo so Ann", "Ann helped Bo so Bo"],
                                 "continuation": "was thanked.", "gold": 1},
    }
    for name, row in rows.items():
        (root / name).write_text(json.dumps(row) + "\n", encoding="utf-8")
    monkeypatch.setenv("QLORA_DATA", str(tmp_path))
    (arc,) = load_task("arc_easy")[1]
    assert arc.contexts == ["Question: Why?\nAnswer:"] * 2 and arc.continuations == [" a", " b"] and arc.gold == 1
    (piqa,) = load_task("piqa")[1]
    assert piqa.contexts[0] == "Question: Open jar\nAnswer:" and piqa.continuations == [" twist", " kick"]
    (hs,) = load_task("hellaswag")[1]
    assert hs.contexts[0] == "Baking: She mixes . the flour" and hs.lengths == [len("then bakes."), 1]
    (wg,) = load_task("winogrande")[1]
    assert wg.contexts == rows["winogrande_dev.jsonl"]["context_options"] and wg.continuations == [" was thanked."] * 2
    assert set(TASKS) == {"arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande"}


def test_generic_jsonl_and_errors(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"query": "2+2=", "choices": ["4", "5"], "gold": 0}\n'
                    '{"query": "q", "choices": ["a"], "gold": 0}\n')
    name, qs = load_task(str(path), limit=1)
    assert name == "mine" and qs[0].continuations == [" 4", " 5"]
    with pytest.raises(QloraError, match="mine.jsonl:2: gold must index one of >= 2 choices"):
        load_task(str(path))
    with pytest.raises(QloraError, match="neither a task"):
        load_task(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_batches_equal_one_by_one_on_real_models(arch, byte_tokenizer):
    from tiny import tiny_model

    model = tiny_model(arch)
    pairs = [("Question: what is it?\nAnswer:", " a cat"), ("Hi", " there, friend"), ("x", " y"), ("", "start")]
    one = loglikelihood(model, byte_tokenizer, pairs, batch_size=1, progress=False)
    many = loglikelihood(model, byte_tokenizer, pairs, batch_size=4, progress=False)
    for a, b, (c, x) in zip(one, many, pairs):
        ctx, cont = encode_pair(byte_tokenizer, c, x)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
        direct = sum(logp[len(ctx) - 1 + t, tok].item() for t, tok in enumerate(cont))
        assert a.logprob == pytest.approx(direct, abs=1e-4) and b.logprob == pytest.approx(direct, abs=1e-4)
