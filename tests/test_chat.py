"""`qlora chat`: history and /reset in the loop, context trimming, and the real command in a pseudo-terminal."""

import io
import os
import sys

import pytest

import qlora.chat as chat
from qlora.generate import GenerationSettings, load_model
from tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("chat") / "model"))


@pytest.fixture(scope="module")
def live(tiny_dir):
    return load_model(tiny_dir)


def test_history_reset_and_exit(live, monkeypatch):
    seen = []
    real_stream = chat.stream

    def spy(model, tok, messages, settings):
        seen.append([dict(m) for m in messages])
        return real_stream(model, tok, messages, settings)

    monkeypatch.setattr(chat, "stream", spy)
    lines = iter(["hello", "again", "/reset", "", "/nope", "fresh", "/exit", "never read"])
    out = io.StringIO()
    answers = chat.repl(*live, GenerationSettings(max_new_tokens=3), system="be brief", read=lambda _: next(lines),
                        out=out)
    assert answers == 3
    assert [[m["role"] for m in s] for s in seen] == [
        ["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    assert seen[1][1]["content"] == "hello" and seen[2][1]["content"] == "fresh"
    text = out.getvalue()
    assert "(conversation cleared)" in text and "unknown command /nope" in text


def test_end_of_input_leaves_quietly(live):
    def eof(_):
        raise EOFError

    assert chat.repl(*live, GenerationSettings(max_new_tokens=2), read=eof, out=io.StringIO()) == 0


def test_fit_history_drops_oldest_turns_keeps_system(live):
    _, tok = live
    messages = [{"role": "system", "content": "s"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 5},
                     {"role": "assistant", "content": f"answer {i} " * 5}]
    messages.append({"role": "user", "content": "last"})
    kept = chat.fit_history(tok, messages, limit=200, reserve=20)
    assert kept[0] == messages[0] and kept[-1] == messages[-1]
    assert kept[1]["role"] == "user" and len(kept) < len(messages)
    assert len(chat.encode_prompt(tok, kept)) + 20 <= 200
    assert chat.fit_history(tok, messages, limit=None, reserve=20) == messages


def test_chat_command_in_a_pseudo_terminal(tiny_dir):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "qlora", "chat", "--model", tiny_dir, "--max-new-tokens", "4"],
                          encoding="utf-8", timeout=120, env=dict(os.environ, TERM="dumb"))
    try:
        child.expect_exact("you> ")
        child.sendline("hello")
        child.expect_exact("assistant> ")
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
