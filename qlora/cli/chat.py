"""`qlora chat`: talk to a 4-bit base + live adapters in the terminal, answers streamed."""

from __future__ import annotations

from .options import add_chat_format_arg, add_model_args, add_sampling_args, load_from, settings_from


def register(sub) -> None:
    p = sub.add_parser(
        "chat", help="interactive chat in the terminal (streaming, chat template, history)",
        description="Chat with the model through its chat template. The conversation is kept as "
        "history (oldest turns dropped when the context fills up); /reset clears it, /exit or Ctrl-D quits.",
    )
    p.add_argument("--system", metavar="TEXT", help="system message at the start of every conversation")
    add_model_args(p)
    add_sampling_args(p)
    add_chat_format_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    settings = settings_from(args)
    model, tokenizer = load_from(args)
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    from ..chat import repl

    repl(model, tokenizer, settings, system=args.system)
    return 0
