"""Memory estimator and planner: what a QLoRA run needs, part by part, before loading anything.

    b = estimate(config_for_size("65B"), gradient_checkpointing=True)   # bytes per part
    print(b.table()); b.total
    plan(load_model_config("7B"), 24 * 2**30)    # largest batch / rank per optimizer, checkpointing
    preflight(cfg)                               # the trainer's check: raises QloraError if it won't fit
"""

from .allocator import return_freed_memory
from .arch import SIZES, Arch, arch_from_config, config_for_size, load_model_config, read_gguf_config
from .estimate import Breakdown, Settings, estimate, layer_activation_bytes, quantized_bytes
from .measure import TensorPeak, measure_peak_rss
from .plan import PlanOption, largest_batch, memory_available, plan, preflight, settings_for
from .report import GiB, human

__all__ = [
    "GiB", "SIZES", "Arch", "Breakdown", "PlanOption", "Settings", "TensorPeak", "arch_from_config", "config_for_size",
    "estimate", "human", "largest_batch", "layer_activation_bytes", "load_model_config", "measure_peak_rss",
    "memory_available", "plan", "preflight", "quantized_bytes", "read_gguf_config", "return_freed_memory",
    "settings_for",
]
