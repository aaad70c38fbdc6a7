"""The header line every benchmark prints first: which CPU, which kernels, which dtype.

Figures from different CPUs (AVX-512 + AVX512-BF16, AVX2 only, ARM64) are not comparable, and the
same CPU can be made to run the AVX2 paths (QLORA_CPU_TARGET=x86-64-v3 for qlora's kernels,
ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 for torch's): the line says which ran.
"""

from __future__ import annotations

import os
import platform

_OVERRIDES = ("QLORA_CPU_TARGET", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "QLORA_REFERENCE_KERNELS")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Model", "CPU part")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(compute_dtype: str | None = None) -> str:
    """'cpu: AMD EPYC (x86_64, 2 cores) | qlora kernels: avx2 | torch: AVX2 | compute dtype: float32 (auto)'."""
    import torch

    from qlora import precision
    from qlora.quant import fast

    k = fast.kernels()
    parts = [f"cpu: {cpu_model()} ({platform.machine()}, {os.cpu_count()} cores)",
             f"qlora kernels: {'unavailable' if k is None else k.isa}",
             f"torch {torch.__version__}: {torch.backends.cpu.get_cpu_capability()}"]
    if compute_dtype is not None:
        resolved = precision.resolve(compute_dtype, "cpu", announce=False)
        parts.append(f"compute dtype: {resolved}" + (" (auto)" if compute_dtype == "auto" else ""))
    env = [f"{name}={os.environ[name]}" for name in _OVERRIDES if os.environ.get(name)]
    if env:
        parts.append("overrides: " + " ".join(env))
    return " | ".join(parts)


if __name__ == "__main__":
    print(header("auto"))
