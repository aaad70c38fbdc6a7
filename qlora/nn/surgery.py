"""Model surgery on any torch module tree: quantize its linear layers to Linear4bit, wrap them with
LoRALinear, and read back what was done (the 4-bit format, the LoRA settings) from the modules
themselves, so that nothing has to be remembered on the side. Torch only: a transformers model is
just a module tree here (GPT-2's Conv1D is recognised by name, its weight stored (in, out))."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import QloraError
from ..quant.spec import DEFAULT, UNQUANTIZED, QuantSpec
from . import lora_init as lora_inits
from .linear4bit import Linear4bit
from .lora import LoRALinear

# The projections lora_targets="attention" wraps, across the architectures transformers names.
ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "query_key_value", "qkv_proj", "out_proj", "dense")


def is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 linear: weight stored (in, out)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _head(net: nn.Module):
    return net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None


def linear_names(net: nn.Module, include_head: bool = False) -> list[str]:
    """Names of every linear layer (nn.Linear / Conv1D), the output head excluded by default."""
    head = _head(net)
    return [n for n, m in net.named_modules() if _is_linear(m) and (include_head or m is not head)]


def quantize_layer(module, name: str, spec: QuantSpec, compute_dtype: torch.dtype, transpose: bool,
                   lora_init: dict | None = None) -> Linear4bit:
    """Linear4bit.from_linear (transpose: a Conv1D's weight), an unquantizable weight (NaN/Inf ...)
    named in a QloraError. `lora_init` (nn.lora_init.spec): LoftQ / PiSSA, the base quantized with
    its LoRA factors, which are stashed on the layer for add_lora."""
    try:
        if lora_init:
            w = module.weight.detach()
            return lora_inits.quantized_layer(w.t() if transpose else w, module.bias, spec, compute_dtype, lora_init)
        return Linear4bit.from_linear(module, spec.quant_type, spec.blocksize, spec.double_quant, compute_dtype,
                                      transpose=transpose)
    except ValueError as e:
        raise QloraError(f"weight '{name}': {e}") from None


def quantize_model(net: nn.Module, spec: QuantSpec = DEFAULT, compute_dtype: torch.dtype = torch.bfloat16,
                   quantize_head: bool = False, *, quant_type: str | None = None, blocksize: int | None = None,
                   double_quant: bool | None = None, lora_init: dict | None = None) -> nn.Module:
    """Replace linear layers by Linear4bit one at a time (each 16-bit weight freed as we go), in the
    format `spec` says with each setting given here (not None) replacing its own; `lora_init`: see
    quantize_layer."""
    spec = spec.replace(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    for name in linear_names(net, include_head=quantize_head):
        module = net.get_submodule(name)
        new = quantize_layer(module, f"{name}.weight", spec, compute_dtype, is_conv1d(module), lora_init)
        net.set_submodule(name, new)
    return net


def add_lora(net: nn.Module, r: int = 64, alpha: float = 16.0, dropout: float = 0.05, targets: str = "all",
             rslora: bool = False, dtype: torch.dtype = torch.float32, dora: bool = False) -> list[str]:
    """Wrap target linear layers with LoRALinear (A and B in `dtype`; DoRA's magnitude with `dora`)
    and freeze everything else; LoftQ / PiSSA factors computed while loading start A and B.
    Returns wrapped names."""
    for p in net.parameters():
        p.requires_grad_(False)
    head = _head(net)
    names = [n for n, m in net.named_modules()
             if isinstance(m, (Linear4bit, nn.Linear)) and m is not head and not _inside_lora(net, n)]
    if targets == "attention":
        names = [n for n in names if n.rsplit(".", 1)[-1] in ATTENTION_NAMES]
    if not names:
        raise QloraError(f"no linear layers match lora_targets={targets!r}")
    for name in names:
        layer = LoRALinear(net.get_submodule(name), r, alpha, dropout, rslora, dtype, dora)
        try:
            lora_inits.take_stashed(layer)
        except ValueError as e:
            raise QloraError(f"{name}: {e}; train with the lora_r / lora_alpha the model was loaded for") from None
        net.set_submodule(name, layer)
    return names


def _inside_lora(net: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(net.get_submodule(".".join(parts[:i])), LoRALinear) for i in range(1, len(parts)))


def lora_layers(net: nn.Module) -> dict[str, LoRALinear]:
    """Outermost LoRALinear modules by name."""
    return {n: m for n, m in net.named_modules() if isinstance(m, LoRALinear) and not _inside_lora(net, n)}


def lora_settings(net: nn.Module) -> dict:
    """r, alpha, dropout, rslora, dora of the model's (outermost) LoRA layers; QloraError when it has none."""
    layers = list(lora_layers(net).values())
    if not layers:
        raise QloraError("the model has no LoRA layers")
    first = layers[0]
    return dict(r=first.r, alpha=first.alpha, dropout=first.dropout, rslora=first.rslora, dora=first.dora)


def quant_formats(net: nn.Module) -> set[QuantSpec]:
    """The distinct 4-bit formats of the model's Linear4bit layers (empty: nothing is quantized)."""
    return {QuantSpec(m.weight.quant_type, m.weight.blocksize, m.weight.double_quant)
            for m in net.modules() if isinstance(m, Linear4bit)}


def quant_of(net: nn.Module) -> QuantSpec:
    """The model's 4-bit format, read from its layers: QuantSpec("bf16") when none is quantized, the
    smallest when a checkpoint mixes formats."""
    return min(quant_formats(net), default=QuantSpec(UNQUANTIZED))
