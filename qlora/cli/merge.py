"""`qlora merge`: fold adapters into the dequantized base and save a transformers directory."""

from __future__ import annotations

import json

from ..export import DTYPE_NAMES
from ..export.bnb import BNB_QUANT_TYPES
from .generate import QUANT_CHOICES


def add_output_args(p) -> None:
    p.add_argument("--output", required=True, metavar="PATH",
                   help="output directory (a .gguf file for GGUF); written aside and renamed when complete")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--max-shard-size", type=float, default=2.0, metavar="GB",
                   help="largest safetensors shard, in GB; memory use grows with it (default: 2)")
    p.add_argument("--eval-text", metavar="FILE",
                   help="text to measure the re-quantization error on (default: a built-in paragraph)")


def register(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge adapters into the base: a standard transformers directory",
        description="Dequantize the 4-bit base (as the adapter was trained on it), add (alpha/r)·B·A in fp32, "
        "and save config, tokenizer and safetensors shards that AutoModelForCausalLM.from_pretrained loads. "
        "--quantize nf4 re-quantizes the merged weights to a bitsandbytes 4-bit directory and reports the "
        "error that adds (logit and perplexity deltas).",
    )
    p.add_argument("--model", help="base model: HF directory, GGUF file, or hub name (default: the embedded SmolLM2)")
    p.add_argument("--adapter", dest="adapters", action="append", default=[], required=True, metavar="DIR",
                   help="PEFT-format adapter directory (repeat to merge stacked adapters)")
    p.add_argument("--quant-type", choices=QUANT_CHOICES, default=None,
                   help="4-bit type of the base the adapter was trained on (default: as recorded in the adapter, else nf4)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16",
                   help="dtype of the merged weights (default: bf16)")
    p.add_argument("--quantize", choices=BNB_QUANT_TYPES, default=None,
                   help="re-quantize the merged weights to 4 bits (bitsandbytes format) and report the added error")
    add_output_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export import merge

    summary = merge(args.model, args.adapters, args.output, args.dtype, args.quantize, _read_text(args.eval_text),
                    _shard_bytes(args.max_shard_size), args.overwrite, quant_type=args.quant_type)
    print(json.dumps(summary, indent=2))
    return 0


def _shard_bytes(gb: float) -> int:
    from ..errors import QloraError

    if not gb > 0:
        raise QloraError(f"--max-shard-size must be > 0 GB, got {gb}")
    return int(gb * 1024**3)


def _read_text(path: str | None) -> str | None:
    from ..errors import QloraError

    if path is None:
        return None
    try:
        text = open(path, encoding="utf-8").read()
    except UnicodeDecodeError:
        raise QloraError(f"{path}: not UTF-8 text") from None
    if len(text.split()) < 2:
        raise QloraError(f"{path}: needs some text to measure perplexity on")
    return text
