"""`qlora merge`: fold adapters into the dequantized base and save a transformers directory."""

from __future__ import annotations

import json

from ..export.bnb import BNB_QUANT_TYPES
from .options import add_model_args, add_write_args, quant_overrides, read_eval_text, shard_bytes


def register(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge adapters into the base: a standard transformers directory",
        description="Dequantize the 4-bit base (as the adapter was trained on it), add (alpha/r)·B·A in fp32, "
        "and save config, tokenizer and safetensors shards that AutoModelForCausalLM.from_pretrained loads. "
        "--quantize nf4 re-quantizes the merged weights to a bitsandbytes 4-bit directory and reports the "
        "error that adds (logit and perplexity deltas).",
    )
    add_model_args(p, adapter_help="PEFT-format adapter directory (repeat to merge stacked adapters)",
                   adapter_required=True, dtype_default="bfloat16",
                   dtype_help="dtype of the merged weights (default: bfloat16)")
    p.add_argument("--quantize", choices=BNB_QUANT_TYPES, default=None,
                   help="re-quantize the merged weights to 4 bits (bitsandbytes format) and report the added error")
    add_write_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export import merge

    summary = merge(args.model, args.adapters, args.output_dir, args.dtype, args.quantize,
                    read_eval_text(args.eval_text), shard_bytes(args.max_shard_size), args.overwrite,
                    **quant_overrides(args))
    print(json.dumps(summary, indent=2))
    return 0
