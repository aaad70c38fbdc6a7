"""`qlora train`: flags generated from TrainConfig (one copy of every default and help text)."""

from __future__ import annotations

import argparse
import functools
import json
import typing

from ..config import TrainConfig, build_config, field_docs, load_yaml
from ..precision import spelled
from .options import field_help

# Other spellings a flag accepts: merge and export write to --output-dir too, and take --output as well.
ALIASES = {"output_dir": ("--output",)}


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="finetune a 4-bit model with LoRA (no arguments: the built-in demo)",
        description="QLoRA finetuning. Values come from defaults < --config YAML < flags. "
        "With no --data, runs the built-in demo: generates an extraction task, reports held-out "
        "exact match before and after finetuning the embedded SmolLM2-135M-Instruct; with --objective dpo or "
        "orpo, the preference demo: pairs from that task (the compact correct answer vs the base model's verbose "
        "style or a wrong field), held-out pair "
        "accuracy and exact match before and after.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML file of key: value (same keys as the flags, with underscores)")
    hints = typing.get_type_hints(TrainConfig)
    docs = field_docs()
    for f in TrainConfig.__dataclass_fields__.values():
        flags = ["--" + f.name.replace("_", "-"), *ALIASES.get(f.name, ())]
        tp, default = hints[f.name], f.default
        helptext = field_help(docs.get(f.name, ""), default)
        if f.name == "resume":
            p.add_argument(*flags, nargs="?", const="latest", metavar="DIR", help=helptext)
        elif f.name == "data":  # several sources make a mixture: --data a.jsonl:0.7 b.jsonl:0.3
            p.add_argument(*flags, nargs="+", metavar="SOURCE", help=helptext)
        elif tp is bool:
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, help=helptext)
        else:
            choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
            p.add_argument(*flags, choices=choices, metavar=None if choices else f.name.upper(), help=helptext,
                           type=functools.partial(spelled, choices=choices) if choices else None)  # bf16 dtype
    p.set_defaults(func=run)


def run(args) -> int:
    values = vars(args).copy()
    for k in ("func", "command"):
        values.pop(k, None)
    config_file = values.pop("config", None)
    merged = load_yaml(config_file) if config_file else {}
    merged.update(values)
    if merged.get("data") is None and merged.get("objective") in ("dpo", "orpo"):
        from ..demo_preference import run_demo  # pairs from the demo task: correct vs verbose or wrong answer

        summary = run_demo(merged)
    elif merged.get("data") is None:
        from ..demo import run_demo

        summary = run_demo(merged)
    else:
        from ..train import train

        summary = train(build_config(merged, source=config_file or "arguments"))
    print(json.dumps(summary, indent=2))
    return 0
