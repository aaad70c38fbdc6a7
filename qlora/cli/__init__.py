"""`qlora` command line: one subcommand per verb, each in its own module with
`register(subparsers)`; a subcommand parses, builds a config, and makes one library call."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import QloraError

# verb -> module under qlora.cli; modules import heavy libraries inside their run functions.
COMMANDS = ("train", "generate", "chat", "serve", "merge", "export", "eval", "memory")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="qlora",
        description="Finetune 4-bit quantized LLMs with LoRA adapters (QLoRA), CPU-first.",
    )
    parser.add_argument("--version", action="version", version=f"qlora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # verb not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]  # `qlora` alone runs the default demo
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except QloraError as e:
        print(f"qlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qlora {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"qlora {args.command}: error: out of memory; lower --batch-size or --max-seq-len", file=sys.stderr)
        return 3
    except OSError as e:
        if os.environ.get("QLORA_DEBUG"):
            raise
        print(f"qlora {args.command}: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
