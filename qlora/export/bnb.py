"""A 4-bit transformers directory in bitsandbytes' format: `quantization_config` in config.json and,
per quantized layer, the state-dict keys bitsandbytes writes (weight, weight.absmax,
weight.quant_map, weight.nested_*, weight.quant_state.bitsandbytes__<type>), which are exactly
Linear4bit's (qlora/quant/state.py). transformers + bitsandbytes load it as a pre-quantized model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import quant
from ..errors import QloraError
from ..nn import Linear4bit, LoRALinear
from ..nn.surgery import quant_formats
from ..precision import name_of
from .files import MAX_SHARD_BYTES, ShardWriter, staged_dir
from .merged import check_layout, checkpoint_entries, dense_tensors, save_config, skeleton

BNB_QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes has no fp4_e3m0 or int4


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> dict:
    """transformers' BitsAndBytesConfig.to_dict() for a 4-bit model, written out (no bitsandbytes import)."""
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": name_of(compute_dtype), "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
    }


def check_bnb_type(quant_type: str) -> None:
    if quant_type not in BNB_QUANT_TYPES:
        raise QloraError(f"bitsandbytes stores only {' and '.join(BNB_QUANT_TYPES)}, not {quant_type}; "
                         "pick --quantize nf4 (or fp4), or export a 16-bit merge / GGUF instead")


def write_4bit(net: nn.Module, tokenizer, out: str, compute_dtype: torch.dtype, max_shard_bytes: int = MAX_SHARD_BYTES,
               overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write a model whose target layers are all Linear4bit (see requant.requantize) as a bnb 4-bit dir;
    `compute_dtype` is the config's compute dtype and the dtype of every tensor that is not 4-bit."""
    if any(isinstance(m, LoRALinear) for m in net.modules()):
        raise RuntimeError("write_4bit needs the adapters merged and re-quantized first (requant.requantize)")
    found = quant_formats(net)
    if len(found) != 1:
        raise RuntimeError(f"expected one 4-bit format across the model, found {sorted(found) or 'none'}")
    q = found.pop()
    check_bnb_type(q.quant_type)
    skel = skeleton(net.config)
    with staged_dir(out, overwrite) as tmp:
        save_config(net, tokenizer, tmp, compute_dtype,
                    quantization_config(q.quant_type, q.double_quant, compute_dtype))
        writer = ShardWriter(tmp, max_shard_bytes)
        for key, module_name, attr in checkpoint_entries(skel):
            module = net.get_submodule(module_name)
            if isinstance(module, Linear4bit) and attr == "weight":
                check_layout(module, module_name)
                for k, t in quant.to_state_dict(module.weight, key).items():
                    writer.add(k, t)
            elif isinstance(module, Linear4bit):
                writer.add(key, getattr(module, attr).detach().to(compute_dtype))
            else:
                writer.add(key, dense_tensors(module, module_name, compute_dtype)[attr])
        writer.close()
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out)


def save_quantized(net: nn.Module, out_dir: str, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a loaded 4-bit model (no adapters) as a transformers directory in bitsandbytes' layout:
    config.json with `quantization_config`, the 4-bit codes and scales as they are (nothing is
    re-quantized), 16-bit embeddings/norms/head, tokenizer files. `hf.load(out_dir)` maps it back;
    transformers + bitsandbytes load it as a pre-quantized model. Tokenizer: the source model's."""
    from ..hf import DEFAULT_MODEL, load_tokenizer, resolve

    if tokenizer is None:
        source = getattr(net, "qlora_source", None)
        tokenizer = load_tokenizer(*resolve(None if source == DEFAULT_MODEL else source))
    compute = next((m.compute_dtype for m in net.modules() if isinstance(m, Linear4bit)), None)
    if compute is None:
        raise QloraError("save_quantized: the model has no 4-bit layers (loaded with quant_type='bf16'?)")
    return write_4bit(net, tokenizer, out_dir, compute, overwrite=overwrite)
