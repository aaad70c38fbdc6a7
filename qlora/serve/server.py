"""An OpenAI-compatible HTTP server on the standard library (http.server), one model, one lock.

Each connection gets a thread; generation takes the model lock, so requests queue and run one at
a time (a 4-bit model on a CPU has nothing to gain from interleaving them), and more than
`max_queue` waiting requests get 503. Streaming replies are server-sent events ending in
`data: [DONE]`. SIGINT/SIGTERM stop accepting connections, end running generations at the next
token, answer queued requests with 503, and return once every handler thread has finished.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import QloraError
from ..generate import context_length, encode_prompt, stream
from . import protocol
from .protocol import ApiError

MAX_BODY_BYTES = 1 << 20


class App:
    """What the handlers share: the model, its lock, the queue count, the stop flag."""

    def __init__(self, model, tokenizer, model_id: str, max_tokens: int | None = None, max_queue: int = 16,
                 log=None):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.context = context_length(model)
        self.max_tokens = max_tokens or self.context or 4096
        self.max_queue = max_queue
        self.created = int(time.time())
        self.model_lock = threading.Lock()
        self.stopping = threading.Event()
        self._count_lock = threading.Lock()
        self.waiting = 0
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    @contextlib.contextmanager
    def turn(self):
        """Wait for the model (FIFO is not promised, every waiter gets it eventually)."""
        with self._count_lock:
            if self.waiting >= self.max_queue:
                raise ApiError(503, f"server busy: {self.waiting} requests are already waiting; retry later",
                               "server_error")
            self.waiting += 1
        try:
            with self.model_lock:
                if self.stopping.is_set():
                    raise ApiError(503, "the server is shutting down", "server_error")
                yield
        finally:
            with self._count_lock:
                self.waiting -= 1


class Handler(BaseHTTPRequestHandler):
    server_version = "qlora"
    timeout = 60  # seconds a client may take to send its request (a stalled client must not hold a thread forever)
    streaming = False  # set once an event stream has begun: no JSON error can follow it

    @property
    def app(self) -> App:
        return self.server.app

    def log_message(self, format, *args) -> None:  # noqa: A002  (the stdlib's signature)
        self.app.log(f"{self.address_string()} {format % args}")

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            self._json(200, protocol.models(self.app.model_id, self.app.created))
        elif path in ("/health", "/v1/health"):
            self._json(200, {"status": "ok"})
        else:
            self._error(ApiError(404, f"no such endpoint: GET {path or '/'}", code="not_found"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        kind = {"/v1/chat/completions": "chat", "/v1/completions": "completion",
                "/chat/completions": "chat", "/completions": "completion"}.get(path)
        try:
            if kind is None:
                raise ApiError(404, f"no such endpoint: POST {path or '/'}", code="not_found")
            req = protocol.parse(self._body(), kind, self.app.model_id, self.app.max_tokens)
            self._complete(req)
        except ApiError as e:
            self._error(e)
        except QloraError as e:  # e.g. messages the chat template rejects
            self._error(ApiError(400, str(e)))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; nothing to answer
        except Exception as e:  # a bug: report it to the client and the log, keep serving
            self.app.log(f"internal error: {type(e).__name__}: {e}")
            self._error(ApiError(500, f"internal error ({type(e).__name__})", "server_error"))

    def _not_allowed(self) -> None:
        self._error(ApiError(405, f"method {self.command} is not allowed here; use GET or POST",
                             code="method_not_allowed"))

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise ApiError(411, "a Content-Length header with the body size is required")
        if int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is {int(length)} bytes; the limit is {MAX_BODY_BYTES}")
        return self.rfile.read(int(length))

    def _complete(self, req: protocol.Request) -> None:
        app = self.app
        with app.turn():  # tokenizers are not thread-safe either: everything model-side runs under the lock
            ids = encode_prompt(app.tokenizer, req.prompt)
            self._check_length(len(ids), req)
            deltas = stream(app.model, app.tokenizer, ids, req.settings, cancel=app.stopping.is_set)
            try:
                if req.stream:
                    self._send_events(req, deltas)
                else:
                    self._send_whole(req, deltas)
            finally:
                deltas.close()

    def _check_length(self, n_prompt: int, req: protocol.Request) -> None:
        limit = self.app.context
        if limit is None:
            return
        wanted = req.settings.max_new_tokens if req.max_tokens_given else 1  # unasked, the answer is cut to fit
        if n_prompt + wanted > limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; the prompt has {n_prompt} "
                           f"and at least {wanted} more must fit: shorten the prompt" +
                           (" or lower max_tokens" if req.max_tokens_given else ""),
                           param="messages" if req.kind == "chat" else "prompt", code="context_length_exceeded")

    def _send_whole(self, req: protocol.Request, deltas) -> None:
        pieces, last = [], None
        for last in deltas:
            pieces.append(last.text)
        body = protocol.reply(req.kind, protocol.new_id(req.kind), self.app.model_id, "".join(pieces),
                              last.finish_reason, last.prompt_tokens, last.completion_tokens)
        self._json(200, body)

    def _send_events(self, req: protocol.Request, deltas) -> None:
        rid, model_id = protocol.new_id(req.kind), self.app.model_id
        first = next(deltas)  # errors before the first token still get a JSON error reply
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.streaming = True
        if req.kind == "chat":  # OpenAI's first chunk names the role
            self._event(protocol.chunk("chat", rid, model_id, "", None, first=True))
        for d in _chain(first, deltas):
            if d.text:
                self._event(protocol.chunk(req.kind, rid, model_id, d.text, None))
            if d.finish_reason:
                self._event(protocol.chunk(req.kind, rid, model_id, None, d.finish_reason))
                if req.include_usage:
                    usage = protocol.usage(d.prompt_tokens, d.completion_tokens)
                    self._event({**protocol.chunk(req.kind, rid, model_id, None, None), "choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, e: ApiError) -> None:
        if self.streaming:
            return  # mid-stream: the client sees the stream end without [DONE]
        try:
            self._json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            pass


def _chain(first, rest):
    yield first
    yield from rest


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A bound server (port 0: any free port; read it from server.server_address)."""
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise QloraError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None
    server.daemon_threads = False  # server_close() joins handler threads: nothing is cut off mid-reply
    server.app = app
    return server


def serve(app: App, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly."""
    server = make_server(app, host, port)
    stoppers = []

    def stop(signum, frame):
        if not app.stopping.is_set():
            app.log(f"{signal.Signals(signum).name}: finishing running requests, then stopping")
            app.stopping.set()
            stoppers.append(threading.Thread(target=server.shutdown, daemon=True))  # shutdown() waits for
            stoppers[-1].start()                                                     # serve_forever

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    bound_host, bound_port = server.server_address[:2]
    if host not in ("127.0.0.1", "localhost", "::1"):
        app.log(f"warning: listening on {host}, not loopback, and there is no authentication")
    app.log(f"serving {app.model_id} on http://{bound_host}:{bound_port}/v1 (Ctrl-C stops)")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        # the stopper holds the server (and through it the model) until it ends: if it dropped the
        # last reference while the interpreter finalizes, freeing a tensor there (it takes the GIL)
        # ends that thread mid-C++ and the process in std::terminate ("terminate called without an
        # active exception", exit -6, about one SIGTERM in eight)
        for t in stoppers:
            t.join()
    app.log("stopped")
