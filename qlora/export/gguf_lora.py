"""The adapter alone as a GGUF LoRA file: what llama.cpp loads with `--lora` (and ollama with ADAPTER)
over a GGUF of the same base, applying it live as y = W x + scale · B (A x).

Layout as llama.cpp's convert_lora_to_gguf.py writes it: general.type "adapter", adapter.type "lora",
adapter.lora.alpha; per base tensor `<gguf name>.lora_a` (r × in rows) and `.lora_b` (out × r), f16.
llama.cpp scales by alpha / r with r read from lora_b, so alpha is written as scaling · r: the same
factor for plain and rank-stabilized (alpha / √r) LoRA alike. B of llama's q/k projections is
permuted as the base's rows are (gguf.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import QloraError
from .files import staged_file
from .gguf import gguf_arch, gguf_rows, tensor_names


def write_gguf_lora(net: torch.nn.Module, out: str, overwrite: bool = False, name: str | None = None) -> dict:
    """Write the model's one adapter (its outermost LoRA layers) as a GGUF LoRA file. -> summary."""
    import gguf

    from ..nn.surgery import lora_layers

    config = net.config
    arch = gguf_arch(config)
    layers = lora_layers(net)
    if not layers:
        raise QloraError("--format gguf-lora needs an --adapter: the model has no LoRA layers")
    if any(m.dora for m in layers.values()):
        raise QloraError("llama.cpp's LoRA has no DoRA magnitudes; export a merge (gguf-f16, gguf-q8_0) instead")
    scalings = {m.scaling for m in layers.values()}
    ranks = {m.r for m in layers.values()}
    if len(scalings) != 1 or len(ranks) != 1:
        raise QloraError("a GGUF LoRA file has one alpha for every layer; this adapter's layers differ in "
                         f"rank or scaling ({sorted(ranks)}, {sorted(scalings)}); export a merge instead")
    scaling, r = scalings.pop(), ranks.pop()
    names = tensor_names(arch, config)
    with staged_file(out, overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name or Path(out).stem)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scaling * r))
        for key, layer in layers.items():
            target = names.get_name(key.removeprefix("base_model.model.") + ".weight", try_suffixes=(".weight",))
            if target is None:
                raise QloraError(f"GGUF LoRA export: no GGUF name for layer '{key}' of this {arch} model")
            a = layer.lora_A.weight.detach().float()
            b = gguf_rows(layer.lora_B.weight.detach().float(), target, arch, config)  # B makes the rows
            for suffix, t in (("lora_a", a), ("lora_b", b)):
                f16 = t.cpu().to(torch.float16)
                if not torch.isfinite(f16).all():
                    raise QloraError(f"{key}: a LoRA factor exceeds f16's range (±65504); export a merge instead")
                writer.add_tensor(f"{target}.{suffix}", f16.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"output": str(out), "format": "gguf-lora", "layers": len(layers), "r": r,
            "alpha": float(scaling * r)}
