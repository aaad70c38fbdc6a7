"""The flags several verbs share, each defined once: which model to load (--model, --adapter, the
base's 4-bit format, --dtype), how to sample, and where merge/export write. Also `load_from`, the
command line's door to generate.load_model (the one loader for inference)."""

from __future__ import annotations

import argparse
import sys
import typing

from ..config import QuantType
from ..data.chat import CHAT_FORMATS, install
from ..errors import QloraError
from ..generate import GenerationSettings
from ..precision import CHOICES as DTYPE_CHOICES, NAMES as DTYPE_NAMES, spelled
from ..quant.blockwise import BLOCKSIZES
from ..quant.spec import DEFAULT as QUANT_DEFAULT

QUANT_CHOICES = typing.get_args(QuantType)
MODEL_HELP = "local HF directory, GGUF file, or hub name (default: the embedded SmolLM2-135M-Instruct)"
ADAPTER_HELP = "PEFT-format LoRA adapter directory, applied live on the 4-bit base (repeat to stack)"
DTYPE_HELP = ("compute dtype of the matmuls; auto = bfloat16 where the hardware multiplies bf16 natively, "
              "else float32 (default: auto)")


def field_help(doc: str, default) -> str:
    """A TrainConfig field's help text: its docstring and default, with `%` escaped (argparse %-formats help)."""
    return f"{doc} (default: {default})".replace("%", "%%")


def positive_int(text: str) -> int:
    """argparse `type=` for counts that must be >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_dtype_arg(p: argparse.ArgumentParser, default: str = "auto", help: str = DTYPE_HELP) -> None:
    """--dtype (alias --compute-dtype, as `qlora train`): the canonical names (bfloat16 ...) in the
    help, bf16/fp16/fp32 accepted too; `auto` only where the default is auto."""
    auto = default == "auto"  # a compute dtype; otherwise the dtype of written weights, no alias
    flags = ("--dtype", "--compute-dtype") if auto else ("--dtype",)
    p.add_argument(*flags, dest="dtype", choices=DTYPE_CHOICES if auto else DTYPE_NAMES, default=default, type=spelled,
                   help=help)


def add_quant_args(p: argparse.ArgumentParser) -> None:
    """The base's 4-bit format; each default None = as the (first) adapter recorded, else QLoRA's."""
    d = QUANT_DEFAULT
    p.add_argument("--quant-type", choices=QUANT_CHOICES, default=None,
                   help=f"4-bit type of the base (default: the one the adapter was trained on, else {d.quant_type}; "
                   "bf16 = unquantized)")
    p.add_argument("--blocksize", type=int, choices=BLOCKSIZES, default=None,
                   help=f"weights per 4-bit block (default: as the adapter was trained, else {d.blocksize})")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None,
                   help=f"quantize the block scales too (default: as the adapter was trained, else "
                   f"{'on' if d.double_quant else 'off'})")


def add_model_args(p: argparse.ArgumentParser, adapter_help: str | None = ADAPTER_HELP, adapter_required: bool = False,
                   quant: bool = True, dtype_default: str = "auto", dtype_help: str = DTYPE_HELP) -> None:
    """--model, --adapter (repeatable; adapter_help None: not offered), the base's 4-bit format, --dtype."""
    p.add_argument("--model", help=MODEL_HELP)
    if adapter_help is not None:
        p.add_argument("--adapter", dest="adapters", action="append", default=[], required=adapter_required,
                       metavar="DIR", help=adapter_help)
    if quant:
        add_quant_args(p)
    add_dtype_arg(p, dtype_default, dtype_help)


def quant_overrides(args) -> dict:
    """quant_type/blocksize/double_quant from the flags (None where not given, or not offered)."""
    return {k: getattr(args, k, None) for k in ("quant_type", "blocksize", "double_quant")}


def load_from(args, adapters: list[str] | None = None):
    """(model, tokenizer) for the model flags (`adapters` instead of --adapter where given), with a
    line on stderr saying what was loaded. args.dtype is made concrete: results record what ran."""
    from ..generate import load_model
    from ..nn.surgery import quant_of
    from ..precision import resolve

    adapters = list(args.adapters if adapters is None else adapters)
    device = getattr(args, "device", "cpu")
    args.dtype = resolve(args.dtype, device)
    model, tokenizer = load_model(args.model, adapters, compute_dtype=args.dtype, device=device,
                                  **quant_overrides(args))
    extra = f" + {len(adapters)} adapter(s)" if adapters else ""
    chat = ""
    if hasattr(args, "chat_format"):  # verbs that render chats: the format is installed on the tokenizer
        chat = f"; chat format {install(tokenizer, args.chat_format, adapters)}"
    print(f"loaded {model.qlora_source} ({quant_of(model).name}{extra}, {args.dtype}){chat}", file=sys.stderr,
          flush=True)
    return model, tokenizer


def add_chat_format_arg(p: argparse.ArgumentParser) -> None:
    """--chat-format for the verbs that render chats (generate, chat, serve, eval generate)."""
    p.add_argument("--chat-format", choices=CHAT_FORMATS, default="auto",
                   help="auto (the adapter's recorded format, else the tokenizer's template, else guanaco), "
                   "tokenizer, guanaco, alpaca or chatml (default: auto)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    d = GenerationSettings()
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"most tokens to generate (default: {d.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"sampling temperature, 0 = greedy (default: {d.temperature})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"nucleus sampling mass, 1 = off (default: {d.top_p})")
    p.add_argument("--top-k", type=int, default=d.top_k,
                   help=f"sample among the k most likely tokens, 0 = off (default: {d.top_k})")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string, not included in the answer (repeatable)")
    p.add_argument("--seed", type=int, default=d.seed, help="sampler seed: same seed, same text (default: random)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named sampling settings: vicuna = the paper's Vicuna-benchmark generation, nucleus "
                   "sampling top-p 0.9 at temperature 0.7 (--temperature/--top-p other than their defaults win)")


# The QLoRA paper's generation settings for the Vicuna benchmark (Sec. 5.3): nucleus sampling.
PRESETS = {"vicuna": {"temperature": 0.7, "top_p": 0.9}}


def settings_from(args) -> GenerationSettings:
    d, chosen = GenerationSettings(), {"temperature": args.temperature, "top_p": args.top_p}
    for key, value in PRESETS.get(getattr(args, "preset", None), {}).items():
        if chosen[key] == getattr(d, key):  # a flag left at its default takes the preset's value
            chosen[key] = value
    return GenerationSettings(max_new_tokens=args.max_new_tokens, top_k=args.top_k, stop=tuple(args.stop),
                              seed=args.seed, **chosen)


def add_output_dir_arg(p: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    """--output-dir, as every verb that writes a directory spells it; --output is accepted as an alias
    (not shown in the help)."""
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--output-dir", dest="output_dir", metavar="PATH", help=help)
    group.add_argument("--output", dest="output_dir", metavar="PATH", help=argparse.SUPPRESS)


def add_write_args(p: argparse.ArgumentParser) -> None:
    """merge and export: where to write, and how."""
    add_output_dir_arg(p, "output directory (a .gguf file for GGUF); written aside and renamed when complete",
                       required=True)
    p.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    p.add_argument("--max-shard-size", type=float, default=2.0, metavar="GB",
                   help="largest safetensors shard, in GB; memory use grows with it (default: 2)")
    p.add_argument("--eval-text", metavar="FILE",
                   help="text to measure the re-quantization error on (default: a built-in paragraph)")


def shard_bytes(gb: float) -> int:
    if not gb > 0:
        raise QloraError(f"--max-shard-size must be > 0 GB, got {gb}")
    return int(gb * 1024**3)


def read_eval_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        text = open(path, encoding="utf-8").read()
    except UnicodeDecodeError:
        raise QloraError(f"{path}: not UTF-8 text") from None
    if len(text.split()) < 2:
        raise QloraError(f"{path}: needs some text to measure perplexity on")
    return text
