"""Chat formats at inference: the named Jinja templates render what training renders, an adapter
records the format its data taught and generate uses it by default on a base without a template,
and a finetune learns to stop (EOS after every target)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import save_tiny, tiny_tokenizer

from qlora import hf
from qlora.cli import main
from qlora.config import build_config
from qlora.data.chat import RECORD, install, jinja_template, recorded, render_named
from qlora.errors import QloraError
from qlora.generate import GenerationSettings, stream
from qlora.train import fit, setup

CONVERSATIONS = [
    [{"role": "user", "content": "Q"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
     {"role": "user", "content": "Q2"}],
]


@pytest.mark.parametrize("name", ["guanaco", "alpaca", "chatml"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one turn", "system + history"])
def test_jinja_template_renders_the_training_prompt(name, messages):
    tok = tiny_tokenizer()
    tok.chat_template = jinja_template(name)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    segments = render_named(messages, name, generation_prompt=True)
    eos = tok.eos_token  # training appends EOS after each answer unless the answer already ends with it
    assert text == "".join(t + (eos if target and not t.endswith(eos) else "") for t, target in segments)


@pytest.fixture(scope="module")
def bare_base(tmp_path_factory):
    """A tiny llama whose tokenizer ships no chat template (a LLaMA base, the paper's setting)."""
    path = save_tiny(str(tmp_path_factory.mktemp("bare") / "base"))
    for f in Path(path).glob("chat_template.*"):
        f.unlink()
    cfg_path = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    _, tok = hf.load(path)
    assert not getattr(tok, "chat_template", None)
    return path


def test_a_guanaco_finetune_of_a_bare_base_records_its_format_and_stops(bare_base, tmp_path, capsys):
    data = tmp_path / "g.jsonl"
    data.write_text(json.dumps({"text": "### Human: Say ok.### Assistant: ok"}) + "\n")
    out = tmp_path / "out"
    cfg = build_config(dict(model=bare_base, data=str(data), output_dir=str(out), max_steps=40, batch_size=1,
                            lora_r=8, lr=1e-2, eval_steps=0, save_steps=0, val_fraction=0.0, warmup_ratio=0.0,
                            lora_dropout=0.0, optimizer="adamw", threads=1, seed=0))
    run = setup(cfg)
    fit(run, progress=False)
    assert json.loads((out / RECORD).read_text()) == {"chat_format": "guanaco"} and recorded([str(out)]) == "guanaco"
    # the loaded finetune, with the recorded format: the answer, then EOS ends generation
    model, tok = hf.load(bare_base, adapters=[str(out)])
    assert install(tok, "auto", [str(out)]) == "guanaco"
    deltas = list(stream(model, tok, [{"role": "user", "content": "Say ok."}], GenerationSettings(max_new_tokens=20)))
    assert "".join(d.text for d in deltas).strip() == "ok" and deltas[-1].finish_reason == "stop"
    capsys.readouterr()
    assert main(["generate", "--model", bare_base, "--adapter", str(out), "--max-new-tokens", "20", "Say ok."]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "ok" and "chat format guanaco" in captured.err


def test_bare_base_falls_back_to_guanaco_and_tokenizer_mode_refuses(bare_base, capsys):
    _, tok = hf.load(bare_base)
    assert install(tok, "auto") == "guanaco" and tok.chat_template == jinja_template("guanaco")
    _, tok = hf.load(bare_base)
    with pytest.raises(QloraError, match="^chat_format tokenizer: this tokenizer has no chat template"):
        install(tok, "tokenizer")
    rc = main(["generate", "--model", bare_base, "--chat-format", "chatml", "--max-new-tokens", "2", "hi"])
    assert rc == 0 and "chat format chatml" in capsys.readouterr().err


def test_chat_on_a_bare_base_speaks_the_installed_format(bare_base):
    import io

    from qlora.chat import repl

    model, tok = hf.load(bare_base)
    install(tok, "auto")
    lines = iter(["hello", "/exit"])
    out = io.StringIO()
    assert repl(model, tok, GenerationSettings(max_new_tokens=3), read=lambda prompt: next(lines), out=out) == 1
    assert "assistant> " in out.getvalue()
