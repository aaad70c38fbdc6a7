"""Merge adapters into the base and export: a 16-bit transformers directory, a bitsandbytes 4-bit
directory (with the re-quantization error measured), GGUF f16/q8_0, or the adapter alone (PEFT, or
GGUF LoRA for llama.cpp's --lora).

Every writer streams (one tensor or one shard in memory beyond the 4-bit model) and writes into a
staging path renamed into place at the end, so an error never leaves a half-written output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import QloraError
from ..generate import load_model
from ..precision import name_of, torch_dtype
from ..quant.spec import QuantSpec
from .files import MAX_SHARD_BYTES

EXPORT_FORMATS = ("bnb", "gguf-f16", "gguf-q8_0", "gguf-lora", "peft")
REPORT_FILE = "requantization_report.json"
# Where the embedded default GGUF comes from: what PEFT should load as the adapter's base.
DEFAULT_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def merge(model: str | None, adapters, out: str, dtype: str = "bfloat16", quantize: str | None = None,
          eval_text: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False,
          quant_type: str | None = None, blocksize: int | None = None, double_quant: bool | None = None) -> dict:
    """Dequantize the base, fold in the adapters (fp32), save a transformers directory in `dtype`
    (a precision name or alias). With `quantize` ("nf4"/"fp4"), re-quantize the merged weights
    instead, save a bitsandbytes 4-bit directory, and return the error that added (also saved as
    requantization_report.json). quant_type/blocksize/double_quant: the base's format where it
    differs from what the adapter recorded (generate.load_model)."""
    if not adapters:
        raise QloraError("merge needs at least one --adapter DIR")
    compute = torch_dtype(dtype)
    quant = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    if quantize is not None:
        return _write_requantized(model, adapters, quant, out, quantize, compute, eval_text, max_shard_bytes, overwrite)
    from .merged import write_merged

    net, tokenizer = load_model(model, list(adapters), compute_dtype=compute, **quant)
    write_merged(net, tokenizer, out, compute, max_shard_bytes, overwrite)
    return {"output": str(out), "format": "transformers", "dtype": name_of(compute)}


def _write_requantized(model, adapters, quant: dict, out, target: str | None, compute: torch.dtype,
                       eval_text: str | None, max_shard_bytes: int, overwrite: bool) -> dict:
    """The base's codes are those of the live model in `compute` (what `qlora generate --dtype` runs);
    the error is measured in fp32 so that it is the re-quantization's, not bf16 noise."""
    from ..nn.surgery import quant_of
    from .bnb import check_bnb_type, write_4bit
    from .requant import EVAL_TEXT, requantize_with_report, upcast

    net, tokenizer = load_model(model, list(adapters), compute_dtype=compute, **quant)
    upcast(net)
    spec = quant_of(net)  # the base's 4-bit settings, or QLoRA's defaults for an unquantized base
    spec = spec if spec.quantized else QuantSpec()
    spec = spec.replace(quant_type=target)
    check_bnb_type(spec.quant_type)
    report = requantize_with_report(net, tokenizer, spec, torch.float32, eval_text or EVAL_TEXT)
    write_4bit(net, tokenizer, out, compute, max_shard_bytes, overwrite,
               extra_files={REPORT_FILE: json.dumps(report, indent=2) + "\n"})
    return {"output": str(out), "format": "bitsandbytes-4bit", "requantization": report}


def export(model: str | None, adapters, out: str, fmt: str, dtype: str = "bfloat16", quantize: str | None = None,
           eval_text: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False,
           quant_type: str | None = None, blocksize: int | None = None, double_quant: bool | None = None) -> dict:
    """bnb: 4-bit directory (the base's own codes when there is no adapter; merged and re-quantized,
    with the error reported, when there is); gguf-f16 / gguf-q8_0: merged model as one GGUF file;
    peft: the adapter alone, checked against the model; gguf-lora: the adapter alone as a GGUF LoRA
    file (llama.cpp --lora over a GGUF of the same base). quant_type/blocksize/double_quant: as merge's."""
    quant = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    if fmt not in EXPORT_FORMATS:
        raise QloraError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if fmt.startswith("gguf") and not str(out).endswith(".gguf"):
        raise QloraError(f"{out}: a GGUF export is one file; give --output-dir a path ending in .gguf")
    if fmt in ("peft", "gguf-lora"):
        return export_adapter(model, adapters, out, fmt, overwrite, quant)
    if fmt == "bnb":
        return _write_requantized(model, adapters, quant, out, quantize, torch_dtype(dtype), eval_text,
                                  max_shard_bytes, overwrite)
    from ..hf import resolve
    from .gguf import write_gguf

    # fp32 keeps the source's own precision for the norms and embeddings that GGUF stores in f32/f16
    net, tokenizer = load_model(model, list(adapters), compute_dtype=torch.float32, **quant)
    directory, gguf_file = resolve(model)
    source = str(Path(directory) / gguf_file) if gguf_file else None
    write_gguf(net, tokenizer, out, fmt.removeprefix("gguf-"), overwrite, source)
    return {"output": str(out), "format": fmt}


def export_adapter(model: str | None, adapters, out: str, fmt: str = "peft", overwrite: bool = False,
                   quant: dict | None = None) -> dict:
    """Re-save one adapter in PEFT's layout (fmt "peft") or as a GGUF LoRA file ("gguf-lora") after
    applying it to the model (which checks that it fits)."""
    from ..adapters import read_adapter, recorded_lora_init, save_adapter
    from ..nn.surgery import lora_layers
    from .files import staged_dir

    if len(adapters) != 1:
        raise QloraError(f"--format {fmt} exports exactly one --adapter, got {len(adapters)}")
    cfg, _ = read_adapter(adapters[0])
    init = recorded_lora_init(adapters)
    peer = {"peft": "PEFT", "gguf-lora": "llama.cpp"}[fmt]
    if init:  # its A and B fit the LoftQ / PiSSA base, not the original weights a peer would put under them
        raise QloraError(f"{adapters[0]}: trained over a {init['method']} base, which {peer} cannot rebuild; "
                         "export a merge (qlora merge, gguf-f16, gguf-q8_0) instead")
    if fmt == "gguf-lora":
        from .gguf_lora import write_gguf_lora

        net, _ = load_model(model, list(adapters), compute_dtype=torch.float32, **(quant or {}))
        return write_gguf_lora(net, out, overwrite)
    net, _ = load_model(model, list(adapters), compute_dtype=torch.bfloat16, **(quant or {}))
    with staged_dir(out, overwrite) as tmp:  # live layers have dropout 0: keep the one it was trained with
        save_adapter(net, str(tmp), model or DEFAULT_HUB_NAME, dropout=float(cfg.get("lora_dropout", 0.0)))
    return {"output": str(out), "format": "peft", "layers": len(lora_layers(net))}
