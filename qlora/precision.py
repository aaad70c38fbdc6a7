"""Compute dtypes: one table of names, and what `auto` picks on this machine.

The compute dtype is what frozen 4-bit weights are dequantized to and what the matmuls run in.
bf16 is the paper's choice and halves activation memory, but it only pays where the hardware
multiplies bf16 natively. On an x86 CPU without AVX512_BF16 or AMX (every AVX2-only laptop,
desktop and most cloud VMs) torch's bf16 matmul is emulated: ~7 GFLOP/s per core against ~77 in
fp32 on a Zen 3 core, so a training step runs ~20x slower. `auto` therefore means:

  - CUDA: bf16 where the GPU supports it, else fp32;
  - x86 CPU: bf16 with AVX512_BF16 or AMX-BF16, else fp32 (also when $ONEDNN_MAX_CPU_ISA caps oneDNN,
    which runs torch's bf16 matmuls, below AVX512_CORE_BF16: the way to measure the AVX2 paths on
    an AVX-512 machine, where bf16 is then emulated);
  - ARM CPU: bf16 when the CPU has BF16 instructions *and* a small timed matmul is faster in bf16
    than in fp32 (torch's ARM kernels use them only on some builds), else fp32;
  - anything else: fp32.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import time

from .errors import QloraError

# torch is imported where it is used: config.py reads these names, and `qlora --help` stays fast.
NAMES = ("bfloat16", "float32", "float16")
ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
# What a --compute-dtype / --dtype flag accepts (the aliases too, via canonical()).
CHOICES = ("auto", *NAMES)
_announced: set[str] = set()
# $ONEDNN_MAX_CPU_ISA values below AVX512_CORE_BF16: oneDNN then has no native bf16 dot product.
_ONEDNN_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def spelled(name: str, choices=()) -> str:
    """An alias in its canonical spelling ('bf16' -> 'bfloat16'); anything else, or a name that is itself
    one of `choices` (bf16 is a --quant-type), as it is (argparse's `type=` for flags whose `choices`
    then check it)."""
    return name if name in choices else ALIASES.get(name, name)


def canonical(name: str) -> str:
    """'bf16' -> 'bfloat16' etc.; 'auto' stays; anything else raises QloraError naming the choices."""
    name = spelled(name)
    if name != "auto" and name not in NAMES:
        raise QloraError(f"dtype must be one of {', '.join(CHOICES)} (or {', '.join(ALIASES)}), got {name!r}")
    return name


def torch_dtype(name: str):
    """The torch dtype of a concrete name or alias ('auto' must be resolved first)."""
    import torch

    name = canonical(name)
    if name == "auto":
        raise QloraError("dtype 'auto' must be resolved (precision.resolve) before it is used")
    return getattr(torch, name)


def name_of(dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def _device_type(device) -> str:
    import torch

    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _cpu_flags() -> set[str]:
    import torch

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    flags = {k for k, v in caps.items() if v is True}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
        flags |= set(line.split(":", 1)[-1].split())
    except OSError:
        pass
    return flags


def _bf16_matmul_is_faster(n: int = 256, repeats: int = 3) -> bool:
    """A ~10 ms probe: is an (n, n) @ (n, n) matmul faster in bf16 than in fp32 on this CPU?"""
    import torch

    def best(dtype) -> float:
        a = torch.randn(n, n).to(dtype)
        a @ a  # warm-up: kernel selection, page faults
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(torch.bfloat16) < best(torch.float32)


@functools.cache
def auto_choice(device_type: str) -> tuple[str, str]:
    """(dtype name, why) that `auto` picks for a device type ('cpu', 'cuda', ...)."""
    import torch

    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "the GPU supports bf16"
        return "float32", "the GPU has no bf16 support"
    if device_type != "cpu":
        return "float32", f"no bf16 policy for {device_type} devices"
    flags, machine = _cpu_flags(), platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        native = sorted(flags & {"avx512_bf16", "amx_bf16"})
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
        if native and cap in _ONEDNN_CAPS_WITHOUT_BF16:
            return "float32", f"ONEDNN_MAX_CPU_ISA={cap} leaves torch no native bf16 matmul: fp32 is faster"
        if native:
            return "bfloat16", f"this CPU multiplies bf16 natively ({', '.join(native)})"
        isa = "AVX-512" if "avx512f" in flags or "avx512_f" in flags else "AVX2" if "avx2" in flags else "x86"
        return "float32", f"this {isa} CPU has no native bf16 matmul (no AVX512_BF16/AMX): fp32 is faster"
    if machine in ("aarch64", "arm64"):
        if "bf16" not in flags:
            return "float32", "this ARM CPU has no BF16 instructions"
        if _bf16_matmul_is_faster():
            return "bfloat16", "this ARM CPU has BF16 instructions and a timed matmul is faster in bf16"
        return "float32", "this ARM CPU has BF16 instructions but torch's fp32 matmul is faster here"
    return "float32", f"no native bf16 known for {machine or 'this'} CPU"


def resolve_saved(saved: str, compute: str, resolved: str) -> str:
    """saved_activations made concrete, for a compute dtype asked for as `compute` and resolved to
    `resolved`. 'auto' is bfloat16 where `auto` picked fp32 (a machine without fast bf16 matmuls:
    multiply in fp32, keep for backward what a bf16 machine keeps), else compute (exact)."""
    if saved != "auto":
        return saved
    return "bfloat16" if canonical(compute) == "auto" and resolved == "float32" else "compute"


def resolve(name: str, device=None, announce: bool = True) -> str:
    """A concrete dtype name for `name` on `device`; for 'auto', the machine's choice, said once
    per process on stderr (with `announce`)."""
    name = canonical(name)
    if name != "auto":
        return name
    device_type = _device_type(device)
    choice, why = auto_choice(device_type)
    if announce and device_type not in _announced:
        _announced.add(device_type)
        print(f"compute dtype: {choice} (auto: {why}; --compute-dtype overrides)", file=sys.stderr, flush=True)
    return choice
