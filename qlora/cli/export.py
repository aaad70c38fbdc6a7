"""`qlora export`: bitsandbytes 4-bit directory, GGUF (f16, q8_0), or the adapter alone (PEFT)."""

from __future__ import annotations

import json

from ..export import DTYPE_NAMES, EXPORT_FORMATS
from ..export.bnb import BNB_QUANT_TYPES
from .generate import QUANT_CHOICES
from .merge import _read_text, _shard_bytes, add_output_args


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="export to bitsandbytes 4-bit, GGUF (f16/q8_0) or PEFT",
        description="bnb: a transformers directory in bitsandbytes' 4-bit format (adapters merged and "
        "re-quantized, with the added error reported; without adapters, the base's own 4-bit codes). "
        "gguf-f16 / gguf-q8_0: the merged model as one GGUF file for llama.cpp/ollama (--output FILE.gguf). "
        "peft: the adapter alone in PEFT's layout.",
    )
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="what to write")
    p.add_argument("--model", help="base model: HF directory, GGUF file, or hub name (default: the embedded SmolLM2)")
    p.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="DIR",
                   help="PEFT-format adapter directory to merge (repeatable; exactly one for --format peft)")
    p.add_argument("--quant-type", choices=QUANT_CHOICES, default=None,
                   help="4-bit type of the base the adapter was trained on (default: as recorded in the adapter, else nf4)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16",
                   help="bnb: compute dtype and dtype of the unquantized tensors (default: bf16)")
    p.add_argument("--quantize", choices=BNB_QUANT_TYPES, default=None, help="bnb: 4-bit type to write (default: the base's)")
    add_output_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export import export

    summary = export(args.model, args.adapters, args.output, args.format, args.dtype, args.quantize,
                     _read_text(args.eval_text), _shard_bytes(args.max_shard_size), args.overwrite,
                     quant_type=args.quant_type)
    print(json.dumps(summary, indent=2))
    return 0
