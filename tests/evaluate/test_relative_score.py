"""qlora eval score: single-answer scores vs a reference, both orders, as % of the reference."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from qlora.cli import main
from qlora.evaluate.relative import parse_scores, score_all


@pytest.mark.parametrize("text,expected", [
    ("8 6\nBecause...", (8.0, 6.0)), ("\n 7.5, 10 \nx", (7.5, 10.0)), ("10 1", (10.0, 1.0)),
    ("Assistant 1: 8", None), ("11 3", None), ("0 5", None), ("", None),
])
def test_parse_scores(text, expected):
    assert parse_scores(text) == expected


def _judge(msgs):
    """Scores by content: 'good' 9, 'ok' 6; any other reply unparsable. Position-biased: +1 to Assistant 1."""
    user = msgs[1]["content"]
    a1 = user.split("[The Start of Assistant 1's Answer]\n")[1].split("\n[The End")[0]
    a2 = user.split("[The Start of Assistant 2's Answer]\n")[1].split("\n[The End")[0]
    value = {"good": 9, "ok": 6}
    if a1 not in value or a2 not in value:
        return "I cannot say."
    return f"{min(10, value[a1] + 1)} {value[a2]}\nexplanation"


def test_both_orders_cancel_position_bias_and_percent():
    system = {"1": {"question": "q1", "answer": "ok"}, "2": {"question": "q2", "answer": "good"},
              "3": {"question": "q3", "answer": "??"}, "4": {"question": "q4", "answer": "ok"}}
    reference = {"1": {"question": "q1", "answer": "good"}, "2": {"question": "q2", "answer": "good"},
                 "3": {"question": "q3", "answer": "good"}}
    r = score_all(system, reference, _judge)
    # q1: ref first (10, 6), system first (7, 9) -> ref 9.5, sys 6.5; q2: 9.5 each; q3 unparsable twice
    assert (r["questions"], r["scored"], r["unparsed_replies"]) == (3, 2, 2)
    assert (r["reference_total"], r["system_total"]) == (19.0, 16.0)
    assert r["percent_of_reference"] == round(100 * 16 / 19, 2)


def test_eval_score_cli_against_an_openai_compatible_endpoint(tmp_path, capsys):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reply = {"choices": [{"message": {"role": "assistant", "content": _judge(body["messages"])}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        answers, ref = tmp_path / "mine.jsonl", tmp_path / "chatgpt.jsonl"
        answers.write_text("".join(json.dumps({"question_id": i, "prompt": "q", "answer": a}) + "\n"
                                   for i, a in enumerate(["ok", "good"])))
        ref.write_text("".join(json.dumps({"question_id": i, "prompt": "q", "answer": "good"}) + "\n"
                               for i in range(2)))
        out = tmp_path / "score.json"
        rc = main(["eval", "score", str(answers), "--reference", str(ref), "--judge-url",
                   f"http://127.0.0.1:{server.server_port}/v1", "--output", str(out)])
    finally:
        server.shutdown()
    assert rc == 0
    assert capsys.readouterr().out.strip() == (
        "mine: 84.2% of chatgpt (2 of 2 questions scored, 0 replies without scores)")
    assert json.loads(out.read_text())["percent_of_reference"] == 84.21
