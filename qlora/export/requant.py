"""Re-quantize a merged model to 4 bits, and measure what that costs instead of hiding it.

Merging an adapter into a 4-bit base and quantizing again rounds W + (alpha/r)·BA to the 4-bit grid,
which the adapter was never trained against: outputs move. We run the same text through the model
before (4-bit base + live adapter = the merged model in 16 bits) and after, and report the logit and
perplexity deltas (the numbers peers' merge-and-requantize paths do not show).
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import torch
from torch import nn

from ..nn import Linear4bit, LoRALinear
from ..nn.surgery import is_conv1d, linear_names, lora_layers
from ..quant.spec import QuantSpec
from .merged import check_layout

# A neutral expository paragraph for the default measurement (written for qlora; --eval-text replaces it).
EVAL_TEXT = (
    "The river rises in the hills to the north and runs south for about two hundred miles before it reaches "
    "the sea. For most of its length it is slow and wide, and in summer the water is warm enough to swim in. "
    "Farmers along its banks grow wheat, barley and vegetables, and in the autumn they bring their harvest to "
    "the market towns by road or by boat. The largest town on the river has a stone bridge that was built more "
    "than four hundred years ago; it is still used every day by cars, bicycles and people on foot. In the "
    "spring, after heavy rain, the river sometimes floods the fields, which is why the oldest houses stand on "
    "higher ground. Scientists who study the river measure its depth, its temperature and the number of fish "
    "each year, and they publish the results so that anyone can see how it is changing."
)
MAX_EVAL_TOKENS = 512


def _targets(net: nn.Module, quant: QuantSpec) -> list[str]:
    """Outermost layers whose 4-bit form must be (re)computed: LoRA-wrapped ones, plain linear
    layers (head excluded), and 4-bit layers stored with other settings than requested."""
    names = set(lora_layers(net)) | set(linear_names(net))
    for name, m in net.named_modules():
        q = m.weight if isinstance(m, Linear4bit) else None
        if q is not None and not _inside(name, names) and QuantSpec(q.quant_type, q.blocksize, q.double_quant) != quant:
            names.add(name)
    return sorted(n for n in names if not _inside(n, names))


def _inside(name: str, names: set[str]) -> bool:
    return any(name.startswith(other + ".") for other in names)


def requantize(net: nn.Module, quant: QuantSpec, compute_dtype: torch.dtype) -> int:
    """Replace every target layer by Linear4bit(quantize(merged fp32 weight)), in place. -> layers done."""
    names = _targets(net, quant)
    for name in names:
        module = net.get_submodule(name)
        inner = module
        while isinstance(inner, LoRALinear):
            inner = inner.base
        if isinstance(inner, Linear4bit):
            check_layout(inner, name)
        if isinstance(module, LoRALinear):
            dense = module.merge(torch.float32)
        elif isinstance(module, Linear4bit):
            dense = SimpleNamespace(weight=module.dequantized_weight(torch.float32), bias=module.bias)
        else:
            dense = module
        new = Linear4bit.from_linear(dense, quant.quant_type, quant.blocksize, quant.double_quant,
                                     compute_dtype, transpose=is_conv1d(dense))  # a plain GPT-2 Conv1D is (in, out)
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, new)
    return len(names)


@torch.inference_mode()
def logits_on(net: nn.Module, ids: list[int]) -> torch.Tensor:
    device = next(net.parameters()).device
    return net(input_ids=torch.tensor([ids], device=device)).logits[0].float()


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    """exp(mean NLL of token t+1 given tokens <= t)."""
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:], device=logits.device))
    return math.exp(float(nll))


def upcast(net: nn.Module) -> None:
    """Compute in fp32 from here on; the 4-bit codes stay as they are."""
    net.float()
    for m in net.modules():
        if isinstance(m, Linear4bit):
            m.compute_dtype = torch.float32


@contextlib.contextmanager
def adapters_off(net: nn.Module):
    """The base alone: every LoRA layer's scaling set to 0 for the duration."""
    layers = [m for m in net.modules() if isinstance(m, LoRALinear)]
    saved = [m.scaling for m in layers]
    for m in layers:
        m.scaling = 0.0
    try:
        yield bool(layers)
    finally:
        for m, s in zip(layers, saved):
            m.scaling = s


def requantize_with_report(net: nn.Module, tokenizer, quant: QuantSpec, compute_dtype: torch.dtype,
                           text: str = EVAL_TEXT) -> dict:
    """requantize() with the logit and perplexity deltas it causes on `text`, next to the size of
    the adapters' own effect (merged vs the 4-bit base alone): a delta as large as the effect
    means re-quantizing undid much of the finetune."""
    ids = list(tokenizer(text)["input_ids"])[:MAX_EVAL_TOKENS]
    before = logits_on(net, ids)
    with adapters_off(net) as any_adapter:
        base = logits_on(net, ids) if any_adapter else before
    layers = requantize(net, quant, compute_dtype)
    after = logits_on(net, ids)
    delta = (after - before).abs()
    ppl_before, ppl_after = perplexity(before, ids), perplexity(after, ids)
    return {
        "quantization": quant.as_dict(), "layers_requantized": layers, "eval_tokens": len(ids),
        "max_abs_logit_delta": round(float(delta.max()), 6), "mean_abs_logit_delta": round(float(delta.mean()), 6),
        "adapter_mean_abs_logit_effect": round(float((before - base).abs().mean()), 6),
        "top1_agreement": round(float((after.argmax(-1) == before.argmax(-1)).float().mean()), 6),
        "perplexity_base": round(perplexity(base, ids), 4),
        "perplexity_merged": round(ppl_before, 4), "perplexity_requantized": round(ppl_after, 4),
        "perplexity_delta": round(ppl_after - ppl_before, 4),
    }
