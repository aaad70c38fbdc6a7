import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from qlora.errors import QloraError
from qlora.evaluate.judge import ChatJudge, HumanJudge, LocalJudge, Verdict, messages, parse_verdict
from qlora.evaluate.pairwise import consistency, judge_all, read_judgments, to_matches, tournament


def test_parse_verdict_takes_the_last_bracketed_letter():
    assert parse_verdict("A is short. [[B]]") == "B"
    assert parse_verdict("not [[A]] but finally [[C]]") == "tie"
    assert parse_verdict("A is better") is None


class _Scripted(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that records requests and replies with `server.reply`."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((self.path, dict(self.headers), body))
        status, text = self.server.reply
        ok = {"choices": [{"message": {"role": "assistant", "content": text}}]}
        payload = ok if status == 200 else {"error": text}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    srv.seen, srv.reply = [], (200, "Assistant A explains more. [[A]]")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_chat_judge_against_a_local_http_server(endpoint):
    url = f"http://127.0.0.1:{endpoint.server_address[1]}/v1"
    judge = ChatJudge(url, "judge-model", api_key="sk-test", retries=0)
    v = judge("What is 2+2?", "4", "5")
    assert v == Verdict("A", "Assistant A explains more. [[A]]")
    path, headers, body = endpoint.seen[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert body["messages"] == messages("What is 2+2?", "4", "5")
    assert "[The Start of Assistant B's Answer]\n5\n" in body["messages"][1]["content"]
    endpoint.reply = (200, "I cannot decide.")
    assert judge("q", "a", "b").winner is None
    endpoint.reply = (400, "bad model")
    with pytest.raises(QloraError, match="HTTP 400 from the judge endpoint"):
        judge("q", "a", "b")


def test_chat_judge_unreachable():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    port = srv.server_address[1]
    srv.server_close()  # nothing listens there now
    with pytest.raises(QloraError, match="cannot reach the judge endpoint"):
        ChatJudge(f"http://127.0.0.1:{port}", "m", retries=0, timeout=5)("q", "a", "b")


def test_chat_judge_against_qlora_serve(tiny_dir):
    from qlora import hf
    from qlora.serve import App, make_server

    app = App(*hf.load(tiny_dir), "tiny", max_tokens=8, log=lambda line: None)
    srv = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        v = ChatJudge(f"http://127.0.0.1:{srv.server_address[1]}/v1", "tiny", retries=0, max_tokens=8)("q", "a", "b")
    finally:
        srv.shutdown()
        srv.server_close()
    assert isinstance(v.raw, str) and v.winner in (None, "A", "B", "tie")  # a random model rarely writes [[X]]


def test_local_judge_reads_the_letter_probabilities(tiny_dir):
    from qlora import hf

    model, tok = hf.load(tiny_dir, quant_type="bf16", compute_dtype=torch.float32)
    judge = LocalJudge(model, tok)
    v = judge("Which is larger, 2 or 3?", "3", "2")
    ids = judge.prompt_ids("Which is larger, 2 or 3?", "3", "2")
    assert tok.decode(ids).endswith("<|im_start|>assistant\nVerdict: [[")
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)[judge.letters]
    expected = {"A": "A", "B": "B", "C": "tie"}["ABC"[int(logp.argmax())]]
    assert v.winner == expected
    assert json.loads(v.raw) == pytest.approx(dict(zip("ABC", logp.tolist())), abs=1e-3)


def test_human_judge_asks_until_it_understands():
    replies, shown = iter(["maybe", "B"]), []
    v = HumanJudge(ask=lambda prompt: next(replies), show=shown.append)("q?", "first", "second")
    assert v.winner == "B" and "ANSWER A\nfirst" in shown[0] and shown[1] == "please type a, b, t or q"
    assert HumanJudge(ask=lambda p: "t", show=lambda s: None)("q", "a", "b").winner == "tie"
    with pytest.raises(KeyboardInterrupt):
        HumanJudge(ask=lambda p: "q", show=lambda s: None)("q", "a", "b")


SYSTEMS = {
    "base": {"1": {"question": "q1", "answer": "b1"}, "2": {"question": "q2", "answer": "b2"}},
    "tuned": {"1": {"question": "q1", "answer": "t1"}, "2": {"question": "q2", "answer": "t2"},
              "3": {"question": "q3", "answer": "t3"}},
}


def test_both_orders_cancel_a_judge_that_always_picks_the_first(tmp_path):
    calls = []

    def first_wins(question, a, b):
        calls.append((question, a, b))
        return Verdict("A", "")

    log = tmp_path / "judgments.jsonl"
    js = judge_all(SYSTEMS, first_wins, log=str(log), progress=False)
    assert calls == [("q1", "b1", "t1"), ("q1", "t1", "b1"), ("q2", "b2", "t2"), ("q2", "t2", "b2")]
    assert [m.score_a for m in to_matches(js)] == [1.0] * 4
    c = consistency(js)
    assert (c["pairs_both_orders"], c["agree"], c["first_wins"]) == (2, 0, 1.0)
    payload, md = tournament(js, rounds=200)
    elo = {r["model"]: r["elo"] for r in payload["ratings"]}
    assert elo["base"] + elo["tuned"] == pytest.approx(2000.0) and abs(elo["base"] - 1000.0) < 16  # 2 wins each
    assert payload["wins"]["base"]["tuned"] == {"wins": 2, "ties": 0, "losses": 2}
    assert "the answer shown first wins 100%" in md
    # resuming: everything is read back from the log, the judge is not called again
    again = judge_all(SYSTEMS, lambda *a: pytest.fail("judged twice"), log=str(log), progress=False)
    assert again == js and read_judgments(str(log)) == js


def test_judge_all_needs_two_systems_and_shared_questions():
    with pytest.raises(QloraError, match="at least two"):
        judge_all({"a": {}}, lambda *a: None, progress=False)
    with pytest.raises(QloraError, match="share no question_id"):
        judge_all({"a": {"1": {}}, "b": {"2": {}}}, lambda *a: None, progress=False)


def test_cli_judge_with_an_api_endpoint(endpoint, tmp_path, capsys, monkeypatch):
    from qlora.cli import main

    for name, answer in (("alpha", "short"), ("beta", "long answer")):
        rows = [{"question_id": i, "name": name, "prompt": f"q{i}", "answer": f"{answer} {i}"} for i in (1, 2, 3)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("JUDGE_KEY", "sk-cli")
    out = tmp_path / "result.json"
    rc = main(["eval", "judge", str(tmp_path / "alpha.jsonl"), str(tmp_path / "beta.jsonl"), "--judge", "api",
               "--judge-url", f"http://127.0.0.1:{endpoint.server_address[1]}/v1", "--judge-model", "gpt-x",
               "--api-key-env", "JUDGE_KEY", "--rounds", "50", "--output", str(out), "--no-progress"])
    stdout = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert rc == 0 and len(endpoint.seen) == 6 and endpoint.seen[0][1]["Authorization"] == "Bearer sk-cli"
    assert r["consistency"] == {"pairs_both_orders": 3, "agree": 0, "agreement": 0.0, "first_wins": 1.0,
                                "no_verdict": 0}
    assert r["judge_model"] == "gpt-x" and "| rank | system | Elo |" in stdout
    assert len((tmp_path / "result.judgments.jsonl").read_text().splitlines()) == 6
