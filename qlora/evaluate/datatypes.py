"""The data-type study (paper Figure 3 / Table 2) for any model: one table row per 4-bit format.

For each format the same unquantized model is quantized afresh (a deep copy of it, so the 16-bit
weights are read once) and measured by
- perplexity on a text (default: WikiText-2 test, non-overlapping 1,024-token windows),
- mean zero-shot accuracy over the multiple-choice tasks (a few examples each by default),
- bits per parameter of the stored linear weights (codes + block scales + DQ constants), from the
  tensors themselves, parameter-weighted over every Linear4bit; 16 for bf16.
A format may carry a LoRA initialisation, "nf4+dq/loftq16" or "nf4+dq/pissa64": the model measured
is then Q + s·BA at step 0 (nn.lora_init, alpha 16, LoftQ 5 iterations), and its LoRA parameters
are reported apart from the base's bits.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

from ..errors import QloraError
from ..quant import QUANT_TYPES
from ..quant.spec import DEFAULT, UNQUANTIZED, QuantSpec

_SPEC = re.compile(r"^(?P<type>[a-z0-9_]+)(?P<dq>\+dq)?(?:@(?P<bs>\d+))?(?:/(?P<init>loftq|pissa)(?P<r>\d+))?$")
_STUDY_ALPHA = 16.0  # LoRA alpha of the step-0 LoftQ / PiSSA rows (Q + s·BA does not depend on it)


@dataclass(frozen=True)
class DataType:
    """One row of the study: a 4-bit format (or bf16), optionally with a LoRA initialisation whose
    step-0 model Q + s·BA is measured (LoRA rank `rank`)."""
    quant: QuantSpec
    lora_init: str = "gaussian"  # or "loftq" / "pissa"
    rank: int = 0

    @property
    def name(self) -> str:
        """'nf4+dq@64', 'bf16', 'nf4+dq@64/loftq16'."""
        init = "" if self.lora_init == "gaussian" else f"/{self.lora_init}{self.rank}"
        return self.quant.name + init


def parse_datatype(spec: str) -> DataType:
    """"bf16", "nf4", "nf4+dq", "fp4+dq@128", "nf4+dq/loftq16" ... -> DataType (its .name is the
    spelling back; no "+dq" means without Double Quantization here, no "@" the default blocksize)."""
    m = _SPEC.match(spec.strip().lower())
    unquantized = m is not None and m["type"] == UNQUANTIZED
    if not m or (not unquantized and m["type"] not in QUANT_TYPES) \
            or (unquantized and (m["dq"] or m["bs"] or m["init"])) or (m["init"] and int(m["r"]) < 1):
        raise QloraError(f"data type {spec!r}: write TYPE[+dq][@BLOCKSIZE][/loftqR|/pissaR] with TYPE one of bf16, "
                         f"{', '.join(QUANT_TYPES)}")
    quant = QuantSpec(m["type"], int(m["bs"] or DEFAULT.blocksize), bool(m["dq"]))
    return DataType(quant, m["init"] or "gaussian", int(m["r"] or 0))


DEFAULT_DATATYPES = ("bf16", "int4", "fp4_e3m0", "fp4", "fp4+dq", "nf4", "nf4+dq", "nf4+dq@128", "nf4+dq@256",
                     "bof4", "bof4+dq", "bof4s", "bof4s+dq")


def linear_bits(net) -> tuple[float, int]:
    """(parameter-weighted bits per parameter of the linear weights, their parameter count)."""
    from ..nn import Linear4bit
    from ..nn.surgery import linear_names

    bits, count = 0, 0
    for module in net.modules():
        if isinstance(module, Linear4bit):
            bits += module.weight.nbytes() * 8
            count += module.weight.numel
    if count:
        return bits / count, count
    weights = [net.get_submodule(n).weight for n in linear_names(net)]
    return float(weights[0].element_size() * 8), sum(w.numel() for w in weights)


def model_megabytes(net) -> float:
    """Stored size of the model: 4-bit weights with their scales, plus every other tensor."""
    from ..nn import Linear4bit

    layers = [m for m in net.modules() if isinstance(m, Linear4bit)]
    total = sum(m.weight.nbytes() for m in layers)  # codes + scales, not the format's codebooks
    seen = {p.data_ptr() for m in layers for n, p in m.named_parameters() if n.startswith("weight_")}
    for t in list(net.parameters()) + list(net.buffers()):
        if t.data_ptr() not in seen:  # tied embeddings count once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


def quantized_copy(base, dtype: DataType, compute_dtype: torch.dtype):
    from ..nn import lora_init
    from ..nn.surgery import add_lora, quantize_model

    net = copy.deepcopy(base)
    init = lora_init.spec(dtype.lora_init, dtype.rank, _STUDY_ALPHA)
    if dtype.quant.quantized:
        quantize_model(net, dtype.quant, compute_dtype, lora_init=init)
    if init:  # takes the factors the quantization left on each layer: the model is Q + s·BA
        add_lora(net, r=dtype.rank, alpha=_STUDY_ALPHA, dropout=0.0)
    if not dtype.quant.quantized:  # the 16-bit row is bf16 weights whatever the compute dtype (fp32 under auto on AVX2)
        net.to(torch.bfloat16)
    return net.to(compute_dtype)


def study(base, tokenizer, dtypes: list[DataType], ids: torch.Tensor, tasks: dict[str, list], window: int = 1024,
          adapters=(), compute_dtype: torch.dtype = torch.bfloat16, batch_size: int = 8, progress: bool = True,
          log=print) -> list[dict]:
    """One result row per data type (see module doc). `tasks`: name -> questions (choice.load_task)."""
    from ..adapters import load_adapter
    from .choice import evaluate_choice
    from .perplexity import perplexity

    rows = []
    for dt in dtypes:
        net = quantized_copy(base, dt, compute_dtype)
        for path in adapters:
            load_adapter(net, path)
        bits, params = linear_bits(net)
        if not dt.quant.quantized:  # bf16 weights, even when cast to an fp32 compute dtype (auto on AVX2)
            bits = float(torch.finfo(torch.bfloat16).bits)
        lora = sum(p.numel() for n, p in net.named_parameters() if ".lora_" in n)
        ppl = perplexity(net, ids, window, progress=progress)
        acc = {name: evaluate_choice(net, tokenizer, qs, name, batch_size, progress).acc for name, qs in tasks.items()}
        q = dt.quant
        row = dict(datatype=dt.name, quant_type=q.quant_type, double_quant=q.double_quant, blocksize=q.blocksize,
                   bits_per_param=bits, linear_params=params, lora_params=lora, model_mb=model_megabytes(net),
                   perplexity=ppl.perplexity,
                   ppl_tokens=ppl.tokens, zero_shot_mean=sum(acc.values()) / len(acc) if acc else None, zero_shot=acc)
        log(f"{dt.name:>14}: {bits:.3f} bits/param, ppl {ppl.perplexity:.2f}"
            + (f", zero-shot {row['zero_shot_mean']:.4f}" if acc else ""))
        rows.append(row)
        del net
    return rows


def table(rows: list[dict]) -> str:
    from .report import markdown_table

    tasks = list(rows[0]["zero_shot"]) if rows else []
    headers = ["data type", "bits/param", "model MB", "perplexity"] + (["zero-shot mean"] + tasks if tasks else [])
    body = [[r["datatype"], f"{r['bits_per_param']:.3f}", f"{r['model_mb']:.1f}", f"{r['perplexity']:.2f}"]
            + ([r["zero_shot_mean"]] + [r["zero_shot"][t] for t in tasks] if tasks else []) for r in rows]
    return markdown_table(headers, body)


def plot(rows: list[dict], path: str, title: str = ""):
    """Perplexity and mean zero-shot accuracy against bits per parameter (PNG); returns the Figure.
    A bare Figure, not pyplot: no GUI backend and no global state, so it works headless and inside
    notebooks alike. Formats that land on the same point (same bits, same accuracy on a small
    subset) share one label, "a = b", instead of printing over each other."""
    from matplotlib.figure import Figure

    panels = [("perplexity", "perplexity (lower is better)")]
    if rows and rows[0]["zero_shot_mean"] is not None:
        panels.append(("zero_shot_mean", "mean zero-shot accuracy"))
    fig = Figure(figsize=(6 * len(panels), 4.5))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        points: dict[tuple[float, float], list[str]] = {}
        for r in rows:
            if r["quant_type"] == "bf16":  # 16 bits is far off the 4-bit cluster: a reference line
                ax.axhline(r[key], color="black", linestyle="--", linewidth=1, label=f"{r['datatype']} (16 bits)")
                continue
            ax.scatter(r["bits_per_param"], r[key], color="tab:blue" if "nf4" in r["datatype"] else "tab:gray")
            points.setdefault((round(r["bits_per_param"], 6), round(r[key], 6)), []).append(r["datatype"])
        for xy, names in points.items():
            ax.annotate(" = ".join(names), xy, fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("bits per parameter (4-bit linear weights, measured)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if any(r["quant_type"] == "bf16" for r in rows):
            ax.legend(loc="best", fontsize=8)
    fig.suptitle(title or "4-bit data types")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
