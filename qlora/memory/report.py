"""Human-readable tables for a Breakdown and a plan: aligned columns, binary units."""

from __future__ import annotations

GiB = 2**30
_UNITS = ((2**40, "TiB"), (GiB, "GiB"), (2**20, "MiB"), (2**10, "KiB"))


def human(n: int | float) -> str:
    """Bytes in binary units: 1536 -> '1.50 KiB'."""
    for size, unit in _UNITS:
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _count(n: int) -> str:
    for size, unit in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _rows(b) -> list[tuple[str, int, str]]:
    s = b.settings
    quant = s["quant_type"] != "bf16"
    dq = "uint8 absmax + fp32 per 256 blocks" if s["double_quant"] else "fp32 absmax"
    tokens = f"batch {s['batch_size']} x {s['seq_len']} tokens"
    other_mode = "without" if s["gradient_checkpointing"] else "with"
    other = b.activations_without_checkpointing if s["gradient_checkpointing"] else b.activations_with_checkpointing
    rows = []
    if quant:
        rows += [
            ("4-bit weights: codes", b.weights_4bit_codes, f"{_count(b.n_quantized_params)} params, {s['quant_type']}"),
            ("4-bit weights: scales", b.weights_4bit_scales, f"blocks of {s['blocksize']}, {dq}"),
        ]
    rows += [
        ("16-bit weights", b.weights_16bit,
         ("embeddings, head, norms, biases" if quant else "all base weights") + f" ({s['compute_dtype']})"),
        ("LoRA weights", b.lora_weights, f"{_count(b.n_lora_params)} params, r={s['lora_r']} on "
         f"{s['lora_targets']} linears ({s['lora_dtype']})"),
        ("LoRA gradients", b.lora_grads, s["lora_dtype"]),
        ("optimizer state", b.optimizer_states, s["optimizer"] + (" (resident part)" if b.optimizer_paged_out else "")),
        ("activations", b.activations, f"{tokens}, checkpointing {'on' if s['gradient_checkpointing'] else 'off'}"
         f" ({other_mode}: {human(other)})"
         + (f", kept in {s['saved_activations']}" if s.get("saved_activations", "compute") != "compute" else "")),
        ("loss logits", b.logits, f"{s['batch_size']} x {s['target_tokens'] or s['seq_len']} targets x vocab, fp32"),
    ]
    if quant:
        rows.append(("dequantized weight", b.dequant_workspace,
                     f"largest linear in {s['compute_dtype']}, x2; LoRA dropout, SwiGLU product and gradient buffers"))
    rows.append(("framework overhead", b.framework_overhead, f"python + torch + transformers ({s['device']})"))
    return rows


def breakdown_table(b) -> str:
    rows = _rows(b)
    width = max(len(r[0]) for r in rows + [("loading (before training)", 0, "")])
    lines = [f"{b.model}: {_count(b.n_params)} params", ""]
    for name, n, note in rows:
        lines.append(f"{name:<{width}}  {human(n):>11}  {note}")
    lines.append("-" * (width + 13))
    lines.append(f"{'total (training step)':<{width}}  {human(b.total):>11}")
    how = "GGUF: dequantized whole, then quantized" if b.source_format == "gguf" else "streamed one tensor at a time"
    lines.append(f"{'loading (before training)':<{width}}  {human(b.load_peak):>11}  {how}")
    if b.optimizer_paged_out:
        lines.append(f"{'paged out (not counted)':<{width}}  {human(b.optimizer_paged_out):>11}  optimizer state "
                     "beyond the budget")
    return "\n".join(lines)


def plan_table(options, budget: int) -> str:
    """One line per (optimizer, checkpointing): the largest batch and rank that fit."""
    head = f"{'optimizer':<17} {'ckpt':<4} {'batch':>5} {'rank':>4}  {'peak':>11}"
    lines = [f"plan for a budget of {human(budget)}:", head]
    for i, o in enumerate(options):
        if o.fits:
            paged = f"  pages out: --optimizer-memory-budget {o.optimizer_memory_budget // 2**20}MiB" \
                if o.optimizer_memory_budget is not None else ""
            lines.append(f"{o.optimizer:<17} {'on' if o.gradient_checkpointing else 'off':<4} {o.batch_size:>5} "
                         f"{o.lora_r:>4}  {human(o.total):>11}" + paged + ("  <- recommended" if i == 0 else ""))
        else:
            lines.append(f"{o.optimizer:<17} {'on' if o.gradient_checkpointing else 'off':<4} "
                         f"{'-':>5} {'-':>4}  {human(o.total):>11}  does not fit even at batch 1, rank 8")
    return "\n".join(lines)
