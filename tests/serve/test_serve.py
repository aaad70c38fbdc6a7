"""`qlora serve` over real HTTP on 127.0.0.1: the OpenAI endpoints, streaming, malformed requests
(always a 4xx JSON error, never a dead server), concurrent clients, a full queue, clean shutdown."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from qlora.generate import GenerationSettings, generate, load_model
from qlora.serve import App, make_server, serve
from tiny import save_tiny

MODEL_ID = "tiny"
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("serve") / "model"))


@pytest.fixture(scope="module")
def live(tiny_dir):
    return load_model(tiny_dir)


@pytest.fixture(scope="module")
def server(live):
    app = App(*live, MODEL_ID, max_tokens=64, log=lambda line: None)
    srv = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(10)


def call(server, method, path, body=None, raw=None, headers=None):
    """(status, content type, body bytes) of one request; `server` is a server or a port number."""
    port = server if isinstance(server, int) else server.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload, ctype = resp.read(), resp.getheader("Content-Type")
    conn.close()
    return resp.status, ctype, payload


def events(payload: bytes) -> list:
    lines = [line for line in payload.decode().split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_models(server):
    status, ctype, payload = call(server, "GET", "/v1/models")
    assert (status, ctype) == (200, "application/json")
    assert [m["id"] for m in json.loads(payload)["data"]] == [MODEL_ID]


def test_chat_completion_matches_the_library(server, live):
    status, _, payload = call(server, "POST", "/v1/chat/completions", CHAT)
    reply = json.loads(payload)
    assert status == 200 and reply["object"] == "chat.completion"
    expected = generate(*live, CHAT["messages"], GenerationSettings(max_new_tokens=6))
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 6


def test_streaming_equals_the_whole_reply(server):
    body = {"prompt": "Once upon", "max_tokens": 5, "temperature": 0.9, "seed": 1}
    whole = json.loads(call(server, "POST", "/v1/completions", body)[2])["choices"][0]["text"]
    status, ctype, payload = call(server, "POST", "/v1/completions",
                                  {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert (status, ctype) == (200, "text/event-stream")
    chunks = events(payload)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_chat_stream_starts_with_the_role(server):
    chunks = events(call(server, "POST", "/v1/chat/completions", {**CHAT, "stream": True})[2])
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


BAD = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"model": MODEL_ID}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": True}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": 3}, 400, "top_p"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {**CHAT, "stop": [1]}, 400, "stop"),
    ("/v1/chat/completions", {**CHAT, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x" * 600, "max_tokens": 5}, 400, "prompt"),
    ("/v1/embeddings", {"input": "x"}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_malformed_requests_get_json_errors(server, path, body, status, param):
    raw = body if isinstance(body, bytes) else None
    got, ctype, payload = call(server, "POST", path, None if raw else body, raw=raw)
    error = json.loads(payload)["error"]
    assert (got, ctype, error["param"]) == (status, "application/json", param)
    assert error["message"] and error["type"]


def test_protocol_level_errors_and_the_server_survives(server):
    assert call(server, "DELETE", "/v1/models")[0] == 405
    assert call(server, "POST", "/v1/chat/completions", raw=b"{}", headers={"Content-Length": str(10**8)})[0] == 413
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:  # no Content-Length
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).split(b"\r\n")[0].endswith(b"411 Length Required")
    assert call(server, "POST", "/v1/chat/completions", CHAT)[0] == 200


def test_two_concurrent_clients_both_complete(server, live):
    results = {}

    def client(name, body):
        results[name] = call(server, "POST", "/v1/chat/completions", body)

    threads = [threading.Thread(target=client, args=("whole", CHAT)),
               threading.Thread(target=client, args=("stream", {**CHAT, "stream": True}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    expected = generate(*live, CHAT["messages"], GenerationSettings(max_new_tokens=6))
    assert results["whole"][0] == results["stream"][0] == 200
    assert json.loads(results["whole"][2])["choices"][0]["message"]["content"] == expected
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in events(results["stream"][2])) == expected


def test_full_queue_gets_503(live):
    app = App(*live, MODEL_ID, max_queue=1, log=lambda line: None)
    srv = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        app.model_lock.acquire()  # the model is busy
        first = {}
        waiter = threading.Thread(target=lambda: first.update(r=call(srv, "POST", "/v1/chat/completions", CHAT)))
        waiter.start()
        deadline = time.time() + 30
        while app.waiting < 1 and time.time() < deadline:
            time.sleep(0.01)
        status, _, payload = call(srv, "POST", "/v1/chat/completions", CHAT)
        assert status == 503 and "busy" in json.loads(payload)["error"]["message"]
        app.model_lock.release()
        waiter.join(60)
        assert first["r"][0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_sigint_stops_serve_cleanly(live):
    """serve() in this (main) thread; a client thread makes a request, then sends SIGINT."""
    lines, done = [], {}
    app = App(*live, MODEL_ID, log=lines.append)

    def client():
        deadline = time.time() + 60
        while not any("serving" in line for line in lines) and time.time() < deadline:
            time.sleep(0.02)
        port = int(re.search(r":(\d+)/v1", next(line for line in lines if "serving" in line)).group(1))
        done["status"] = call(port, "POST", "/v1/chat/completions", CHAT)[0]
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    threading.Thread(target=client, daemon=True).start()
    serve(app, "127.0.0.1", 0)
    assert done["status"] == 200
    assert lines[-1] == "stopped" and signal.getsignal(signal.SIGINT) is previous


def test_serve_command_stops_on_sigterm_mid_stream(tiny_dir):
    proc = subprocess.Popen([sys.executable, "-m", "qlora", "serve", "--model", tiny_dir, "--port", "0", "--name",
                             MODEL_ID],
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:
            m = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "the server never said where it listens"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({**CHAT, "max_tokens": 400, "stream": True}))
        resp = conn.getresponse()
        assert resp.status == 200
        resp.readline()  # the first event: generation is running
        proc.send_signal(signal.SIGTERM)
        rest = resp.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")  # the stream is ended properly, not cut
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
