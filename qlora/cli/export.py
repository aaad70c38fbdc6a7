"""`qlora export`: bitsandbytes 4-bit directory, GGUF (f16, q8_0), or the adapter alone (PEFT, GGUF LoRA)."""

from __future__ import annotations

import json

from ..export import EXPORT_FORMATS
from ..export.bnb import BNB_QUANT_TYPES
from .options import add_model_args, add_write_args, quant_overrides, read_eval_text, shard_bytes


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="export to bitsandbytes 4-bit, GGUF (f16/q8_0), PEFT or GGUF LoRA",
        description="bnb: a transformers directory in bitsandbytes' 4-bit format (adapters merged and "
        "re-quantized, with the added error reported; without adapters, the base's own 4-bit codes). "
        "gguf-f16 / gguf-q8_0: the merged model as one GGUF file for llama.cpp/ollama (--output-dir FILE.gguf). "
        "peft: the adapter alone in PEFT's layout. gguf-lora: the adapter alone as a GGUF LoRA file for "
        "llama.cpp's --lora (ollama's ADAPTER) over a GGUF of the same base (--output-dir FILE.gguf).",
    )
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="what to write")
    add_model_args(p, adapter_help="PEFT-format adapter directory to merge "
                   "(repeatable; exactly one for --format peft / gguf-lora)",
                   dtype_default="bfloat16",
                   dtype_help="bnb: compute dtype and dtype of the unquantized tensors (default: bfloat16)")
    p.add_argument("--quantize", choices=BNB_QUANT_TYPES, default=None,
                   help="bnb: 4-bit type to write (default: the base's)")
    add_write_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export import export

    summary = export(args.model, args.adapters, args.output_dir, args.format, args.dtype, args.quantize,
                     read_eval_text(args.eval_text), shard_bytes(args.max_shard_size), args.overwrite,
                     **quant_overrides(args))
    print(json.dumps(summary, indent=2))
    return 0
