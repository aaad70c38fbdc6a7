"""Gradient checkpointing that keeps attention's outputs: each decoder layer is recomputed in
backward (transformers' per-layer checkpoint, non-reentrant) except the attention kernels' outputs."""

from __future__ import annotations

import functools

import torch

# Attention's outputs are kept under gradient checkpointing (1.2 MB per SmolLM2 layer at 4 x 256
# tokens, plus a logsumexp): recomputing them took 5% of a step; everything else is recomputed.
_KEEP_UNDER_CHECKPOINTING = tuple(getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name))


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (transformers' per-layer checkpoint,
    non-reentrant), except attention's outputs (_KEEP_UNDER_CHECKPOINTING)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    keep = functools.partial(create_selective_checkpoint_contexts, list(_KEEP_UNDER_CHECKPOINTING))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": keep})
