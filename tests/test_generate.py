"""Generation: KV-cache decoding equals transformers' generate, seeds fix samples, stop strings and
multi-byte characters stream correctly, the `qlora generate` command reads and writes JSONL."""

import json

import pytest
import torch

from qlora import hf
from qlora.adapters import save_adapter
from qlora.cli import main
from qlora.errors import QloraError
from qlora.generate import GenerationSettings, _Detokenizer, encode_prompt, generate, load_model, pick, sample, stream
from qlora.nn import Linear4bit
from tiny import save_tiny, save_tiny_adapter, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_adapter(tmp_path_factory.mktemp("generate"))


@pytest.fixture(scope="module")
def live(tiny):
    return load_model(tiny[0], [tiny[1]])


# gemma3's sliding window is 64 tokens: 16 prompt + 56 new ones run its cache past it
@pytest.mark.parametrize("arch,prompt,n", [("qwen2", "Once upon a time, in a land far away, there lived a cat", 24),
                                          ("gemma3", "Once upon a time", 56)])
def test_greedy_matches_transformers_generate(tmp_path, arch, prompt, n):
    model, tok = load_model(save_tiny(str(tmp_path / arch), arch))
    ids = tok(prompt)["input_ids"]
    ours = list(sample(model, ids, GenerationSettings(), n))
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, len(ids):].tolist()
    assert len(set(ours)) > 3  # a non-degenerate sequence, so the comparison means something


def test_adapter_is_applied_live(tiny, live):
    base, tok = load_model(tiny[0])
    ids = torch.tensor([tok("Once upon a time")["input_ids"]])
    with torch.no_grad():
        assert (base(ids).logits - live[0](ids).logits).abs().max() > 0.05


def test_the_base_is_quantized_as_the_adapter_was_trained(tmp_path):
    model_dir = save_tiny(str(tmp_path / "m"))
    net, _ = hf.load(model_dir, quant_type="fp4", blocksize=128, lora=dict(r=2, alpha=4, dropout=0.0))
    save_adapter(net, str(tmp_path / "a"), model_dir)
    model, _ = load_model(model_dir, [str(tmp_path / "a")])
    q = next(m for m in model.modules() if isinstance(m, Linear4bit)).weight
    assert (q.quant_type, q.blocksize, q.double_quant) == ("fp4", 128, True)
    model, _ = load_model(model_dir, [str(tmp_path / "a")], quant_type="nf4")
    q = next(m for m in model.modules() if isinstance(m, Linear4bit)).weight
    assert (q.quant_type, q.blocksize) == ("nf4", 128)


def test_seed_fixes_the_sample_and_leaves_the_global_rng_alone(live):
    model, tok = live
    s = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    state = torch.get_rng_state()
    a, b = generate(model, tok, "hello", s), generate(model, tok, "hello", s)
    assert torch.equal(state, torch.get_rng_state())
    assert a == b
    other = generate(model, tok, "hello", GenerationSettings(max_new_tokens=12, temperature=1.0, seed=8))
    assert other != a


def test_pick_greedy_top_k_top_p():
    logits = torch.tensor([0.0, 3.0, 2.0, 1.0])
    g = torch.Generator().manual_seed(0)
    assert pick(logits, GenerationSettings(), g) == 1
    assert {pick(logits, GenerationSettings(temperature=1.0, top_k=1), g) for _ in range(20)} == {1}
    # softmax = [.032, .644, .237, .087]: top_p 0.7 keeps {1, 2} (0.644 < 0.7 <= 0.881)
    drawn = {pick(logits, GenerationSettings(temperature=1.0, top_p=0.7), g) for _ in range(200)}
    assert drawn == {1, 2}
    drawn = {pick(logits, GenerationSettings(temperature=1.0, top_k=3), g) for _ in range(300)}
    assert drawn == {1, 2, 3}


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                 dict(top_k=-1), dict(stop=("",))])
def test_bad_settings_are_user_errors(bad):
    with pytest.raises(QloraError):
        GenerationSettings(**bad)


def _push_all(decoder, tok, text):
    return [decoder.push(t) for t in tok(text, add_special_tokens=False)["input_ids"]]


def test_stop_strings_are_cut_and_never_streamed():
    tok = tiny_tokenizer()
    decoder = _Detokenizer(tok, ("STOP",))
    released = _push_all(decoder, tok, "hello ST")
    assert "".join(t for t, _ in released) == "hello "  # "ST" may start "STOP": held back
    text, stopped = _push_all(decoder, tok, "OP and more")[1]
    assert (text, stopped) == ("", True)
    assert decoder.flush() == ""
    decoder = _Detokenizer(tok, ("STOP",))
    _push_all(decoder, tok, "a STa")  # "STa" cannot start "STOP" any more: released
    assert decoder.flush() == ""


def test_multibyte_characters_are_released_whole():
    tok = tiny_tokenizer()
    decoder = _Detokenizer(tok, ())
    first, second = tok("é", add_special_tokens=False)["input_ids"]  # two byte tokens
    assert decoder.push(first) == ("", False)
    assert decoder.push(second) == ("é", False)
    decoder = _Detokenizer(tok, ())
    decoder.push(first)
    assert decoder.flush() == "\ufffd"  # an incomplete character at the end is not silently dropped


def test_stream_reports_finish_and_counts(live):
    model, tok = live
    deltas = list(stream(model, tok, "hello", GenerationSettings(max_new_tokens=5)))
    last = deltas[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", 5, 5)
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == generate(model, tok, "hello", GenerationSettings(max_new_tokens=5))


def test_context_limit(live):
    model, tok = live
    limit = model.config.max_position_embeddings
    with pytest.raises(QloraError, match="context"):
        list(stream(model, tok, list(range(1, 200)) * 3, GenerationSettings()))
    last = list(stream(model, tok, [65] * (limit - 3), GenerationSettings(max_new_tokens=50)))[-1]
    assert (last.finish_reason, last.completion_tokens) == ("length", 3)


def test_messages_go_through_the_chat_template(live):
    _, tok = live
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert encode_prompt(tok, messages) == tok(text, add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, [5, 6]) == [5, 6]


def test_generate_command_jsonl(tiny, live, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "hello", "id": 1}, {"messages": [{"role": "user", "content": "hi"}]}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", tiny[0], "--adapter", tiny[1], "--prompts", str(prompts), "--output", str(out),
            "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "3"]
    assert main(argv) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k != "completion"} for g in got] == rows
    model, tok = live
    s = GenerationSettings(max_new_tokens=6, temperature=0.8, seed=3)
    assert got[0]["completion"] == generate(model, tok, [{"role": "user", "content": "hello"}], s)
    assert got[1]["completion"] == generate(model, tok, rows[1]["messages"], s)


def test_generate_command_reports_bad_lines(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    assert main(["generate", "--model", tiny[0], "--prompts", str(prompts)]) == 2
    assert f"{prompts}:2:" in capsys.readouterr().err
    assert main(["generate", "--model", tiny[0]]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_generate_command_streams_one_prompt(tiny, live, capsys):
    assert main(["generate", "--model", tiny[0], "--adapter", tiny[1], "--raw", "--max-new-tokens", "7", "hello"]) == 0
    model, tok = live
    assert capsys.readouterr().out == generate(model, tok, "hello", GenerationSettings(max_new_tokens=7)) + "\n"


def test_generate_command_system_message(tiny, live, tmp_path, capsys):
    # a finetune trained with a system message (the demo's) is asked the same way from the command line
    model, tok = live
    system, s = "Extract the name as JSON.", GenerationSettings(max_new_tokens=7)
    argv = ["generate", "--model", tiny[0], "--adapter", tiny[1], "--max-new-tokens", "7", "--system", system, "hello"]
    assert main(argv) == 0
    want = generate(model, tok, [{"role": "system", "content": system}, {"role": "user", "content": "hello"}], s)
    assert capsys.readouterr().out == want + "\n"
    prompts = tmp_path / "prompts.jsonl"
    own = [{"role": "system", "content": "own"}, {"role": "user", "content": "hi"}]
    prompts.write_text(json.dumps({"messages": own}) + "\n" + json.dumps({"prompt": "hello"}) + "\n")
    assert main(argv[:-1] + ["--prompts", str(prompts)]) == 0
    got = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]
    assert got == [generate(model, tok, own, s), want]  # a row's own system message is kept
    assert main(argv[:-1] + ["--raw", "hello"]) == 2
    assert "--system" in capsys.readouterr().err
