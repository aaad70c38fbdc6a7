"""`qlora serve`: an OpenAI-compatible HTTP server for a 4-bit base + live adapters."""

from __future__ import annotations

from pathlib import Path

from .options import add_chat_format_arg, add_model_args, load_from


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, streaming)",
        description="Serve the model over HTTP with the OpenAI API: GET /v1/models, POST /v1/chat/completions "
        "and /v1/completions (stream: true for server-sent events). Requests run one at a time; "
        "Ctrl-C or SIGTERM stops cleanly. Sampling defaults: greedy, as `qlora generate`.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 = any free port)")
    p.add_argument("--name", help="model id clients send as \"model\" (default: the model's directory or file name)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: the model's context length)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for the model before 503 (default: 16)")
    add_model_args(p)
    add_chat_format_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import QloraError
    from ..serve import App, serve

    if args.max_tokens is not None and args.max_tokens < 1:
        raise QloraError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    model, tokenizer = load_from(args)
    app = App(model, tokenizer, args.name or default_name(args.model, args.adapters), args.max_tokens, args.max_queue)
    serve(app, args.host, args.port)
    return 0


def default_name(model: str | None, adapters: list[str]) -> str:
    """'SmolLM2-135M-Instruct', 'mymodel', 'mymodel+myadapter'."""
    base = Path(model).expanduser().resolve().name if model else "SmolLM2-135M-Instruct"
    base = base.removesuffix(".gguf")
    return "+".join([base] + [Path(a).expanduser().resolve().name for a in adapters])
