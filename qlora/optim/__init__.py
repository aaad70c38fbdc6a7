"""Optimizers: AdamW maths as one pure function; fp32/8-bit state and resident/paged storage
are policies around it. Imports torch only.

Public API: `build_optimizer(named_params, name, lr, ...)` -> `AdamW` with step(), zero_grad(),
settable .lr, state_specs()/iter_state()/meta()/load_state() for checkpoints (streamed one
parameter's state at a time; state_tensors() copies it whole), stats() and close().
"""

from .adamw import adamw_update
from .optimizer import KINDS, AdamW, build_optimizer

__all__ = ["KINDS", "AdamW", "adamw_update", "build_optimizer"]
