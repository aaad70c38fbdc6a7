"""Merge: W' = dequant(W_4bit) + (alpha/r)·B·A, in fp32, one layer at a time (QLoRA eq. 5-6, fused).

The checkpoint's tensor names and layout come from a skeleton of the architecture built on the
meta device (no memory): its state-dict keys are what `from_pretrained` expects, tied weights
appear once, and GPT-2's Conv1D layers are written back transposed, as (in, out).

The 4-bit codes are checked before each layer is decoded: a merge must never read a weight whose
packed layout was changed behind our back (bitsandbytes repacks CPU weights after an inference
forward on AVX512-BF16 machines, and a merge from the repacked bytes decodes garbage).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..nn import Linear4bit, LoRALinear
from ..nn.surgery import is_conv1d
from .files import MAX_SHARD_BYTES, ShardWriter, staged_dir


def skeleton(config) -> nn.Module:
    """The architecture with every tensor on the meta device: names, shapes and ties, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def checkpoint_entries(skel: nn.Module) -> list[tuple[str, str, str]]:
    """(key, module name, attribute) of each tensor a checkpoint holds; a tied tensor only once."""
    seen, entries = set(), []
    for key, t in skel.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        module, _, attr = key.rpartition(".")
        entries.append((key, module, attr))
    return entries


def check_layout(layer: Linear4bit, name: str) -> None:
    """The packed codes are exactly what quantize() produced for this layer's shape."""
    q = layer.weight
    n = q.shape.numel()
    scale_dtype = torch.uint8 if q.double_quant else torch.float32
    ok = (q.data.dtype == torch.uint8 and tuple(q.data.shape) == ((n + 1) // 2, 1)  # state.py's layout
          and tuple(q.shape) == (layer.out_features, layer.in_features)
          and q.absmax.numel() == math.ceil(n / q.blocksize) and q.absmax.dtype == scale_dtype)
    if not ok:
        raise RuntimeError(f"{name}: the 4-bit weight's packed layout is not the one qlora wrote "
                           f"(codes {tuple(q.data.shape)} {q.data.dtype} for shape {tuple(q.shape)}); "
                           "refusing to merge from it")


def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, LoRALinear):
        module = module.base
    return module


def dense_tensors(module: nn.Module, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A module's own tensors in `dtype`, with LoRA merged and 4-bit weights decoded."""
    base = _innermost(module)
    if isinstance(base, Linear4bit):
        check_layout(base, name)
    if isinstance(module, LoRALinear):
        merged = module.merge(dtype)
        return {"weight": merged.weight.detach(), "bias": None if merged.bias is None else merged.bias.detach()}
    if isinstance(module, Linear4bit):
        bias = None if module.bias is None else module.bias.detach().to(dtype)
        return {"weight": module.dequantized_weight(dtype), "bias": bias}
    own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    return {k: t.detach().to(dtype) if t.is_floating_point() else t.detach() for k, t in own}


def merged_tensors(net: nn.Module, dtype: torch.dtype, skel: nn.Module | None = None,
                   entries: list[tuple[str, str, str]] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor) for the whole model, adapters merged, one module at a time."""
    skel = skel if skel is not None else skeleton(net.config)
    entries = entries if entries is not None else checkpoint_entries(skel)
    current, tensors = None, {}
    for key, module_name, attr in entries:
        if module_name != current:
            current = module_name
            tensors = dense_tensors(net.get_submodule(module_name), module_name, dtype)
            if is_conv1d(skel.get_submodule(module_name)) and "weight" in tensors:
                tensors["weight"] = tensors["weight"].t().contiguous()
        t = tensors.get(attr)
        if t is None:
            kind = type(net.get_submodule(module_name)).__name__
            raise RuntimeError(f"{key}: the loaded model has no such tensor (module {kind})")
        yield key, t


def save_config(net: nn.Module, tokenizer, directory: Path, dtype: torch.dtype,
                quantization_config: dict | None = None) -> None:
    """config.json (+ generation_config.json) and the tokenizer files, as save_pretrained writes them."""
    config = copy.deepcopy(net.config)
    config.dtype = dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if quantization_config:
        config.quantization_config = quantization_config
    config.save_pretrained(str(directory))
    if getattr(net, "generation_config", None) is not None:
        net.generation_config.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def write_merged(net: nn.Module, tokenizer, out: str, dtype: torch.dtype = torch.bfloat16,
                 max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """A standard transformers directory of the merged model in `dtype`, written shard by shard."""
    from tqdm import tqdm

    skel = skeleton(net.config)
    entries = checkpoint_entries(skel)
    with staged_dir(out, overwrite) as tmp:
        save_config(net, tokenizer, tmp, dtype)
        writer = ShardWriter(tmp, max_shard_bytes)
        for key, t in tqdm(merged_tensors(net, dtype, skel, entries), total=len(entries), desc="merge", unit="tensor",
                           disable=None):
            writer.add(key, t)
        writer.close()
    return Path(out)
