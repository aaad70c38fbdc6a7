"""The CPU fast path: C++/SIMD kernels compiled from csrc/ (library.py) and bound through ctypes in
three groups by user — quantization (quantize.py), the llama decode step (llama.py and the model
descriptions of llama_structs.py), training ops (training.py).

If no compiler is found or the build fails, `kernels()` returns None after logging one warning,
and the callers keep using the PyTorch reference. Pre-build, e.g. in a container image:

    python -m qlora.quant --build
"""

from __future__ import annotations

import ctypes
import logging
import threading

from .library import build, cpu_supports, cpu_target
from .llama import LlamaOps
from .quantize import QuantizeOps
from .training import TrainingOps

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: dict[str, CpuKernels | None] = {}  # by target


class CpuKernels:
    """One loaded library: its ISA and its entry points, grouped by user."""

    def __init__(self, lib: ctypes.CDLL):
        lib.qlora_simd.restype = ctypes.c_int
        lib.qlora_gemv_simd.restype = ctypes.c_int
        lib.qlora_isa.restype = ctypes.c_char_p
        self.lib = lib  # the tests also call its test-only entry points (qlora_gemv_bf16, qlora_exp)
        self.isa: str = lib.qlora_isa().decode()  # "avx512-bf16", "avx512", "avx2", "neon" or "scalar"
        self.simd = bool(lib.qlora_simd())  # the AVX-512 quantization kernels (isa starts with "avx512")
        self.gemv_simd = bool(lib.qlora_gemv_simd())  # vectorized decode products (any isa but "scalar")
        self.quant = QuantizeOps(lib)
        self.llama = LlamaOps(lib)
        self.train = TrainingOps(lib)


def kernels(portable: bool = False, target: str | None = None) -> CpuKernels | None:
    """The compiled kernels for `target` (see library.cpu_target), built on first use; None (after one
    warning) if they cannot be built or need instructions this CPU lacks."""
    target = cpu_target(target, portable)
    if target in _loaded:  # every op asks: no lock once loaded
        return _loaded[target]
    with _lock:
        if target not in _loaded:
            try:
                built = CpuKernels(ctypes.CDLL(str(build(target=target))))
                if not cpu_supports(built.isa):
                    raise RuntimeError(f"the {target} build uses {built.isa}, which this CPU lacks")
                _loaded[target] = built
            except (OSError, RuntimeError) as e:
                _log.warning("qlora: CPU quantization kernels unavailable, using the PyTorch reference "
                             "(slower). Run `python -m qlora.quant --build` for details. %s",
                             str(e).splitlines()[0])
                _loaded[target] = None
        return _loaded[target]
