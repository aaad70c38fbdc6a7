"""qlora/decoder.py: the compiled llama decode step against its PyTorch definition and against the
model's own forward; what falls back to the model's forward; the plan follows the weights.

Tolerance against transformers' forward (teacher-forced, the same token history on both sides):
|Δlogit| ≤ 3 % of the largest logit on a tiny model, ≤ 2 on SmolLM2-135M (logits up to ~45;
measured ≤ 1.1 over 4 prompts × 48 tokens).
That is the distance fp32 summation order alone puts between two correct paths once 30 bf16 layers
amplify it: qlora's own fused 4-bit kernel against dequantize-then-matmul differs by ~0.8 there."""

from __future__ import annotations

import pytest
import torch

from qlora import decoder, hf
from qlora.adapters import save_adapter
from qlora.generate import GenerationSettings, encode_prompt, load_model, sample, sample_many
from qlora.nn.surgery import lora_layers
from tiny import save_tiny, tiny_model, tiny_tokenizer

PROMPT = "Once upon a time, in a land far away"


@pytest.fixture(scope="module")
def sharp_dirs(tmp_path_factory):
    """(model dir, adapter dir): a tiny llama with weights large enough for a varied greedy
    sequence, and an adapter."""
    root = tmp_path_factory.mktemp("decode")
    model = tiny_model("llama")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    model_dir = str(root / "model")
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    net, _ = hf.load(model_dir, lora=dict(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    for layer in lora_layers(net).values():
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05
    save_adapter(net, str(root / "adapter"), model_dir)
    return model_dir, str(root / "adapter")


@pytest.fixture(scope="module")
def sharp(sharp_dirs):
    """That model in bf16 with the adapter live."""
    return load_model(sharp_dirs[0], [sharp_dirs[1]])


def _teacher_forced(model, ids, n):
    """(model forward logits, Decoder.step logits, Decoder.reference_step logits) along the
    model's greedy path, n steps after the prompt."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        fast, ref = decoder.decoder(model, len(ids) + n), decoder.decoder(model, len(ids) + n)
        fast.load(out.past_key_values, len(ids))
        ref.load(out.past_key_values, len(ids))
        cache, token, rows = out.past_key_values, int(out.logits[0, -1].argmax()), []
        for _ in range(n):
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            rows.append((out.logits[0, -1].float(), fast.step(token).clone(), ref.reference_step(token)))
            token = int(out.logits[0, -1].argmax())
    return rows


def test_logits_match_the_models_forward(sharp):
    model, tok = sharp
    rows = _teacher_forced(model, tok(PROMPT)["input_ids"], 40)
    scale = max(hf_logits.abs().max() for hf_logits, _, _ in rows)
    assert max((hf_logits - fast).abs().max() for hf_logits, fast, _ in rows) <= 0.03 * scale
    assert len({int(hf_logits.argmax()) for hf_logits, _, _ in rows}) > 10  # a varied sequence
    # the compiled step is its PyTorch definition: equal until a last-bit difference (exp, the
    # order of a sum) flips a bf16 rounding somewhere, then apart by the same noise
    _, fast, ref = rows[0]
    assert (fast != ref).float().mean() <= 0.02
    assert max((fast - ref).abs().max() for _, fast, ref in rows) <= 0.03 * scale
    assert all(torch.equal(fast, fast.bfloat16().float()) for _, fast, _ in rows)  # bf16 logits, as the model's


def test_fp32_model_decodes_through_the_step_within_bf16_rounding(sharp_dirs):
    """`--compute-dtype auto` loads fp32 where the CPU has no native bf16: its tokens take the step
    too, through bf16 copies of embeddings, norms and head (the model's own stay fp32)."""
    model, tok = load_model(sharp_dirs[0], [sharp_dirs[1]], compute_dtype="float32")
    assert model.model.embed_tokens.weight.dtype == torch.float32 and decoder.supported(model)
    rows = _teacher_forced(model, tok(PROMPT)["input_ids"], 40)
    scale = max(hf_logits.abs().max() for hf_logits, _, _ in rows)
    assert max((hf_logits - fast).abs().max() for hf_logits, fast, _ in rows) <= 0.03 * scale
    assert max((fast - ref).abs().max() for _, fast, ref in rows) <= 0.03 * scale
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the copies are the plan's own


def test_greedy_step_is_the_argmax_of_the_logits(sharp):
    model, tok = sharp
    ids = tok(PROMPT)["input_ids"]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        full, greedy = decoder.decoder(model, len(ids) + 30), decoder.decoder(model, len(ids) + 30)
        full.load(out.past_key_values, len(ids))
        greedy.load(out.past_key_values, len(ids))
        token = int(out.logits[0, -1].argmax())
        for _ in range(30):
            expected = int(full.step(token).argmax())
            assert greedy.greedy(token) == expected
            token = expected
    assert greedy.plan.screen is not None  # the int8 screen of the tied bf16 head was used


def test_sample_takes_the_decoder_and_agrees_with_the_forward(sharp, monkeypatch):
    model, tok = sharp
    ids = tok(PROMPT)["input_ids"]
    steps = []
    real = decoder.Decoder.greedy
    monkeypatch.setattr(decoder.Decoder, "greedy", lambda self, token: steps.append(token) or real(self, token))
    ours = list(sample(model, ids, GenerationSettings(), 20))
    assert len(steps) == 19  # every token after the first comes from the decoder's greedy step
    seeded = GenerationSettings(temperature=0.8, seed=3)
    assert list(sample(model, ids, seeded, 12)) == list(sample(model, ids, seeded, 12))  # sampling: full logits
    monkeypatch.setenv("QLORA_DECODE", "model")
    assert decoder.decoder(model, 100) is None
    theirs = list(sample(model, ids, GenerationSettings(), 20))
    assert ours[:8] == theirs[:8]  # greedy; a bf16 flip may part them later on a random model


def test_sample_many_prefills_each_length_once_and_agrees_with_sample(sharp, monkeypatch):
    model, tok = sharp
    texts = [PROMPT, "The cat sat on the mat", "Once upon a time, in a land far awaz", "The dog sat on the rug", "Hi"]
    prompts = [tok(t)["input_ids"] for t in texts]
    calls = []
    hook = model.register_forward_hook(lambda m, args, kw, out: calls.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        got = {i: list(tokens) for i, tokens in sample_many(model, prompts, GenerationSettings(), 12)}
    finally:
        hook.remove()
    assert sorted(got) == list(range(len(prompts)))
    lengths = [len(p) for p in prompts]
    assert lengths[0] == lengths[2] and lengths[1] == lengths[3]  # two pairs share a length
    assert sorted(calls) == sorted((lengths.count(n), n) for n in set(lengths))  # one forward per length
    for i, ids in enumerate(prompts):  # the steps are the same; a batched prefill may round apart later on
        assert got[i][:6] == list(sample(model, ids, GenerationSettings(), 12))[:6]
    monkeypatch.setenv("QLORA_DECODE", "model")  # the model's own decode: one prompt at a time, exactly sample
    assert {i: list(t) for i, t in sample_many(model, prompts, GenerationSettings(), 8)} == {
        i: list(sample(model, ids, GenerationSettings(), 8)) for i, ids in enumerate(prompts)}


def test_plan_follows_the_adapter_weights(sharp):
    model, tok = sharp
    ids = tok(PROMPT)["input_ids"]
    list(sample(model, ids, GenerationSettings(), 3))
    plan = model._qlora_decode_plan
    lora = lora_layers(model)
    with torch.no_grad():
        for layer in lora.values():
            layer.lora_B.weight.mul_(4)  # in place: the same tensors, new versions
    try:
        rows = _teacher_forced(model, ids, 8)
        assert model._qlora_decode_plan is not plan
        scale = max(hf_logits.abs().max() for hf_logits, _, _ in rows)
        assert max((hf_logits - fast).abs().max() for hf_logits, fast, _ in rows) <= 0.03 * scale
    finally:
        with torch.no_grad():
            for layer in lora.values():
                layer.lora_B.weight.div_(4)


def test_cache_capacity_is_enforced(sharp):
    model, tok = sharp
    ids = tok(PROMPT)["input_ids"]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        d = decoder.decoder(model, len(ids) + 1)
        d.load(out.past_key_values, len(ids))
        assert d.capacity % 16 == 0 and d.capacity >= len(ids) + 1  # rounded up to whole key blocks
        for _ in range(d.capacity - len(ids)):
            d.step(5)
        with pytest.raises(ValueError, match="out of range"):
            d.step(5)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "gpt2"])
def test_other_architectures_use_the_models_forward(tmp_path, arch):
    model, _ = load_model(save_tiny(str(tmp_path / arch), arch))
    assert decoder.decoder(model, 64) is None


def test_unquantized_and_dropout_layers_use_the_models_forward(tmp_path, sharp):
    model_dir = save_tiny(str(tmp_path / "llama"))
    assert decoder.supported(load_model(model_dir)[0])
    assert not decoder.supported(hf.load(model_dir, quant_type="bf16")[0])
    training, _ = hf.load(model_dir, lora=dict(r=4, alpha=8, dropout=0.1))
    assert not decoder.supported(training.train())
    assert decoder.supported(training.eval())  # dropout is off in eval mode


@pytest.mark.slow
def test_smollm2_with_the_demo_adapter(tmp_path):
    """The real model: greedy answers identical to the model's forward on the benchmark prompt and
    three more (up to the end of the answer), logits within 2 along the way (measured: <= 1.1).
    Where the forward's top logits tie within bf16's spacing (0.125 at ~20) the two may part: the
    test then stops at the first such token and asserts that it is one, i.e. the decode step took
    its own argmax and the forward scores that token within the two logit vectors' difference
    (seen with some demo adapters: 20.375 vs 20.25, forward against decode 20.25 vs 20.25)."""
    pytest.importorskip("gguf")
    import pathlib

    adapter = pathlib.Path(__file__).resolve().parents[1] / "runs" / "demo"
    if not (adapter / "adapter_model.safetensors").exists():
        pytest.skip("no demo adapter in runs/demo (run `qlora train` first)")
    model, tok = load_model(None, [str(adapter)])
    prompts = [[{"role": "system", "content": "Extract the person's name, age, city and year as JSON."},
                {"role": "user", "content": "In 2018, 79-year-old Victor Sharma relocated to Sydney."}],
               [{"role": "system", "content": "Extract the person's name, age, city and year as JSON."},
                {"role": "user", "content": "Maria Lopez, 34, moved to Lisbon in 2021."}],
               [{"role": "user", "content": "Give three tips for staying healthy."}],
               "The capital of France is"]
    for prompt in prompts:
        ids = encode_prompt(tok, prompt)
        rows = _teacher_forced(model, ids, 24)
        assert max((a - b).abs().max() for a, b, _ in rows) <= 2.0
        ours = list(sample(model, ids, GenerationSettings(), 25))
        greedy = [int(a.argmax()) for a, _, _ in rows]
        end = greedy.index(tok.eos_token_id) if tok.eos_token_id in greedy else len(greedy)
        part = next((j for j, (x, y) in enumerate(zip(ours[1: end + 1], greedy[:end])) if x != y), end)
        assert ours[1: part + 1] == greedy[:part]
        if part < end:  # only at a near-tie (see above)
            a, b, _ = rows[part]
            took = ours[part + 1]
            assert int(b.argmax()) == took and float(a.max() - a[took]) <= float((a - b).abs().max())
