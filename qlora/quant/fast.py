"""The CPU fast path: C++/SIMD kernels for blockwise quantization (bit-identical to blockwise.py),
seeded dropout, the decode step's products and attention, and RMSNorm/SwiGLU/cross-entropy rows.

csrc/*.cpp have no torch dependency. They are compiled once per machine with the system C++
compiler (a few seconds) into $QLORA_KERNEL_CACHE or ~/.cache/qlora/kernels/<key>/ and called
through ctypes with raw pointers. Compared with torch.utils.cpp_extension this needs neither ninja
nor pybind11, builds ~30x faster than a translation unit that includes the torch headers, and
keeps working across torch upgrades.

The instruction set is chosen at compile time by the target: AVX-512 kernels where the target has
AVX-512, else AVX2 + FMA + F16C or ARM64 NEON, else portable scalar code (csrc/common.h,
csrc/simd16.h); `CpuKernels.isa` names the one a library uses. The target is `-march=native`
unless $QLORA_CPU_TARGET says otherwise:

    QLORA_CPU_TARGET=native      -march=native (the default)
    QLORA_CPU_TARGET=x86-64-v3   any other value is passed as -march=VALUE (x86-64-v3: AVX2 + FMA +
                                 F16C; x86-64-v4: AVX-512; armv8-a: NEON)
    QLORA_CPU_TARGET=portable    the scalar kernels (-DQLORA_PORTABLE)

The AVX2, NEON and portable builds give byte-identical results for every kernel (sums in one
defined order, see csrc/simd16.h). The cache key includes the target and the CPU's feature flags
(a home directory shared between machines stays safe), and a library built for instructions this
CPU lacks is refused rather than run.

If no compiler is found or the build fails, `kernels()` returns None after logging one warning,
and kernels.py keeps using the reference. Pre-build, e.g. in a container image:

    python -m qlora.quant --build
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from . import blockwise as ref

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = sorted(_CSRC.glob("*.cpp"))  # one library
# -ffp-contract=off: an FMA would skip a rounding the reference performs (see quant4_cpu.cpp), and
# the kernels fuse exactly where their defined order does (simd16.h). The target adds -march.
_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off")
_PORTABLE = "portable"
_OPENMP = ("-fopenmp",)  # dropped (single-threaded kernels) where the compiler lacks OpenMP
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # enum Dtype in the .cpp
_LIB_NAME = "libqlora_quant.so"
_HUGEPAGE_MIN_BYTES = 1 << 23  # 4 huge pages; smaller buffers usually come back from malloc's free lists

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: dict[str, CpuKernels | None] = {}  # by target

# What each ISA needs from the CPU, as /proc/cpuinfo spells the flags (x86 only: NEON is AArch64's baseline)
_ISA_FLAGS = {"avx2": {"avx2", "fma", "f16c"}, "avx512": {"avx512f", "avx512bw"},
              "avx512-bf16": {"avx512f", "avx512bw", "avx512_bf16"}}


def default_decode_threads() -> int:
    """$QLORA_DECODE_THREADS, else 2 where this process may use two CPUs, else 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return int(os.environ.get("QLORA_DECODE_THREADS") or min(2, cpus))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def cpu_target(target: str | None = None, portable: bool = False) -> str:
    """The build target: "portable" if asked, else `target`, else $QLORA_CPU_TARGET, else "native"."""
    if portable:
        return _PORTABLE
    return target or os.environ.get("QLORA_CPU_TARGET") or "native"


def _target_flags(target: str) -> tuple[str, ...]:
    if target == _PORTABLE:  # scalar kernels, still tuned for this CPU (results do not depend on it)
        return ("-march=native", "-DQLORA_PORTABLE")
    return (f"-march={target}",)


def cpu_supports(isa: str) -> bool:
    """Whether this CPU runs code built for `isa` (CpuKernels.isa's names); True where unknown."""
    need = _ISA_FLAGS.get(isa)
    if not need or platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return True
    return need <= set(flags.split(":", 1)[-1].split())


def _cpu_signature() -> str:
    """What -march=native depends on: the architecture and, on Linux, the CPU feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    return platform.machine() + flags


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_KERNEL_CACHE") or Path.home() / ".cache" / "qlora" / "kernels")


def library_path(portable: bool = False, target: str | None = None) -> Path:
    """Where the library for this source, compiler, target and CPU lives (built or not)."""
    target = cpu_target(target, portable)
    h = hashlib.sha256()
    for f in sorted(_CSRC.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    for part in (str(_compiler()), " ".join(_FLAGS + _target_flags(target)), f"target={target}", _cpu_signature()):
        h.update(part.encode())
    return cache_dir() / h.hexdigest()[:16] / _LIB_NAME


def build(portable: bool = False, target: str | None = None) -> Path:
    """Compile the library for `target` (see cpu_target; `portable`: the scalar kernels, which the
    tests compare the others with) unless it is already cached; raise RuntimeError with the
    compiler's output if that fails."""
    target = cpu_target(target, portable)
    path = library_path(target=target)
    if path.exists():
        return path
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found: install g++ (or set CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_LIB_NAME}.{os.getpid()}.tmp")  # then an atomic rename: racing builds are safe
    errors = []
    for openmp in (_OPENMP, ()):
        proc = subprocess.run([*shlex.split(cxx), *_FLAGS, *_target_flags(target), *openmp, *map(str, _SOURCES),
                               "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, path)
            return path
        errors.append(proc.stderr.strip()[-1500:])
    raise RuntimeError(f"{cxx} could not build {', '.join(p.name for p in _SOURCES)} for {target}:\n"
                       + "\n".join(errors))


def kernels(portable: bool = False, target: str | None = None) -> CpuKernels | None:
    """The compiled kernels for `target` (see cpu_target), built on first use; None (after one
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


@functools.cache
def _code4_tables(quant_type: str, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    bounds, order = ref._bounds_and_order(quant_type, torch.device("cpu"), blocksize)
    # the SIMD kernel skips the clamp to [-1, 1], which is exact only while no bound reaches +-1
    if not bool(((bounds > -1) & (bounds < 1)).all()):
        raise ValueError(f"{quant_type}: codebook midpoints must lie strictly inside (-1, 1)")
    return bounds.contiguous(), order.contiguous()


@functools.cache
def _padded_lut8(code_key: tuple) -> torch.Tensor:
    # the AVX-512 kernel gathers 32 bits at byte offset idx, so the table needs 3 spare bytes
    lut = ref.lut8(torch.tensor(code_key, dtype=torch.float32))
    return torch.cat([lut, torch.zeros(4, dtype=torch.uint8)])


def _nonfinite(flat: torch.Tensor, blocksize: int) -> ValueError:
    """The reference's own error for a NaN/Inf (the kernel only reports that one exists)."""
    try:
        ref.block_absmax(flat, blocksize)
    except ValueError as e:
        return e
    return ValueError("tensor contains NaN or Inf; fix the values before quantizing")


def _scale_args(absmax: torch.Tensor, nested) -> tuple[tuple, float, int]:
    """The block-scale arguments of the 4-bit kernels: (absmax fp32, qabsmax, nested_absmax, code8)
    with the unused ones None, the DQ offset and the nested block size."""
    if nested is None:
        return (absmax.float().contiguous(), None, None, None), 0.0, 1
    nested_absmax, nested_code, offset, nested_bs = nested
    return ((None, absmax.contiguous(), nested_absmax.float().contiguous(), nested_code.float().contiguous()),
            float(offset), nested_bs)


class CpuKernels:
    """The library's entry points with the signatures of blockwise.py (CPU tensors only)."""

    def __init__(self, lib: ctypes.CDLL):
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        lib.qlora_simd.restype = i32
        lib.qlora_isa.restype = ctypes.c_char_p
        lib.qlora_advise_hugepages.argtypes = [p, i64]
        lib.qlora_quantize_4bit.argtypes = [p, i32, i64, i64, p, p, p, p, i32]
        lib.qlora_quantize_4bit.restype = i64
        lib.qlora_dequantize_4bit.argtypes = [p, p, p, p, p, f32, i64, p, i64, i64, p, i32, i32]
        lib.qlora_quantize_8bit.argtypes = [p, i64, i64, p, p, p, i32]
        lib.qlora_quantize_8bit.restype = i64
        lib.qlora_dequantize_8bit.argtypes = [p, p, p, i64, i64, p, i32]
        lib.qlora_gemm_4bit.argtypes = [p, i64, i64, p, p, p, p, p, f32, i64, p, i64, i64, p, i32]
        lib.qlora_dropout.argtypes = [p, p, i64, i32, ctypes.c_uint32, f32, ctypes.c_uint32, i32]
        lib.qlora_gemv_simd.restype = i32
        lib.qlora_decode_linear.argtypes = [p, i64, p, p]
        lib.qlora_gemv_bf16.argtypes = [p, i64, i64, p, p, i32]
        lib.qlora_decode_attention.argtypes = [p, p, p, i64, i64, i64, i64, i64, f32, p]
        lib.qlora_exp.argtypes = [p, i64]
        lib.qlora_llama_step.argtypes = [p, i64, i64, p]
        lib.qlora_llama_step.restype = i32
        lib.qlora_llama_greedy.argtypes = [p, i64, i64]
        lib.qlora_llama_greedy.restype = i64
        lib.qlora_argmax_gemv_bf16.argtypes = [p, p, p, p, i64, i64, p]
        lib.qlora_argmax_gemv_bf16.restype = i64
        lib.qlora_decode_threads.argtypes = [i32]
        lib.qlora_rms_norm_forward.argtypes = [p, p, i64, i64, f32, p, p, i32]
        lib.qlora_rms_norm_backward.argtypes = [p, p, p, p, i64, i64, p, i32]
        lib.qlora_swiglu_forward.argtypes = [p, p, p, i64, i32]
        lib.qlora_swiglu_backward.argtypes = [p, p, p, p, p, i64, i32]
        lib.qlora_cross_entropy_rows.argtypes = [p, i64, i64, p, p, i32, i32]
        self._lib = lib
        self.isa: str = lib.qlora_isa().decode()  # "avx512-bf16", "avx512", "avx2", "neon" or "scalar"
        self.simd = bool(lib.qlora_simd())  # the AVX-512 quantization kernels (isa starts with "avx512")
        self.gemv_simd = bool(lib.qlora_gemv_simd())  # vectorized decode products (any isa but "scalar")
        self.decode_threads(default_decode_threads())

    def decode_threads(self, n: int) -> None:
        """1: decode products on the calling thread only; 2: split by rows with one helper thread
        (decode_cpu.cpp; results are identical). The library starts with default_decode_threads()."""
        self._lib.qlora_decode_threads(n)

    def _empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """torch.empty for an output the kernel fills; 2 MiB pages when it spans several (a fresh
        32 MiB tensor took 35 ms of 4 KiB page faults here, 8 ms with 2 MiB pages)."""
        t = torch.empty(shape, dtype=dtype)
        nbytes = t.numel() * t.element_size()
        if nbytes >= _HUGEPAGE_MIN_BYTES:
            self._lib.qlora_advise_hugepages(t.data_ptr(), nbytes)
        return t

    def quantize_4bit(self, w: torch.Tensor, quant_type: str, blocksize: int):
        ref.check_input(w, blocksize)
        if quant_type in ref.SIGNED_SCALE_TYPES:  # the kernel quantizes the sign-flipped blocks
            return ref.signed_scale_quantize(w, blocksize, lambda v: self._quantize_absmax(v, quant_type, blocksize))
        return self._quantize_absmax(w, quant_type, blocksize)

    def _quantize_absmax(self, w: torch.Tensor, quant_type: str, blocksize: int):
        x = w.detach().contiguous().reshape(-1)
        n, nblocks = x.numel(), -(-x.numel() // blocksize)
        bounds, order = _code4_tables(quant_type, blocksize)
        packed = self._empty(((n + 1) // 2, 1), torch.uint8)
        absmax = torch.empty(nblocks, dtype=torch.float32)
        bad = self._lib.qlora_quantize_4bit(x.data_ptr(), _DTYPE_CODES[x.dtype], n, blocksize, bounds.data_ptr(),
                                            order.data_ptr(), packed.data_ptr(), absmax.data_ptr(),
                                            torch.get_num_threads())
        if bad < nblocks:
            raise _nonfinite(x, blocksize)
        return packed, absmax

    def dequantize_4bit(self, packed, absmax, code, blocksize, shape, dtype, nested=None) -> torch.Tensor:
        return self.dequantize_4bit_into(self._empty(shape, dtype), packed, absmax, code, blocksize, nested)

    def dequantize_4bit_into(self, out, packed, absmax, code, blocksize, nested=None) -> torch.Tensor:
        """Write code[q] * block scale into `out` (contiguous fp32/fp16/bf16, one element per
        code) in one pass. `nested` = (nested_absmax, nested_code, offset, nested_blocksize) when
        `absmax` holds double-quantized uint8 scales: they are decoded per block on the fly."""
        n = out.numel()
        nblocks = -(-n // blocksize)
        if out.dtype not in _DTYPE_CODES or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32/float16/bfloat16 tensor, got {out.dtype}")
        if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
            raise ValueError(f"expected {(n + 1) // 2} packed uint8 bytes for {n} elements, "
                             f"got {packed.numel()} {packed.dtype}")
        if absmax.numel() != nblocks or code.numel() != 16:
            raise ValueError(f"expected {nblocks} block scales and a 16-entry codebook, "
                             f"got {absmax.numel()} and {code.numel()}")
        packed, code = packed.contiguous(), code.float().contiguous()
        if nested is not None:
            nested_absmax, nested_code, _, nested_bs = nested
            nested_blocks = -(-nblocks // nested_bs)
            if absmax.dtype != torch.uint8 or nested_absmax.numel() != nested_blocks or nested_code.numel() != 256:
                raise ValueError(f"double-quantized scales: expected {nblocks} uint8 codes, {nested_blocks} "
                                 f"nested scales and a 256-entry nested code, got {absmax.numel()} {absmax.dtype}, "
                                 f"{nested_absmax.numel()} and {nested_code.numel()}")
        scales, offset, nested_bs = _scale_args(absmax, nested)  # keeps converted copies alive for the call
        self._lib.qlora_dequantize_4bit(packed.data_ptr(), *(None if t is None else t.data_ptr() for t in scales),
                                        offset, nested_bs, code.data_ptr(), n, blocksize, out.data_ptr(),
                                        _DTYPE_CODES[out.dtype], torch.get_num_threads())
        return out

    def quantize_8bit(self, x: torch.Tensor, code: torch.Tensor, blocksize: int):
        if blocksize < 1:
            raise ValueError(f"blocksize must be positive, got {blocksize}")
        flat = x.detach().reshape(-1).float().contiguous()
        n, nblocks = flat.numel(), -(-flat.numel() // blocksize)
        lut = _padded_lut8(tuple(code.tolist()))
        q = self._empty(x.shape, torch.uint8)
        absmax = torch.empty(nblocks, dtype=torch.float32)
        bad = self._lib.qlora_quantize_8bit(flat.data_ptr(), n, blocksize, lut.data_ptr(), q.data_ptr(),
                                            absmax.data_ptr(), torch.get_num_threads())
        if bad < nblocks:
            raise _nonfinite(flat, blocksize)
        return q, absmax

    def dequantize_8bit(self, q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
        n = q.numel()
        if q.dtype != torch.uint8 or absmax.numel() != -(-n // blocksize) or code.numel() != 256:
            raise ValueError(f"expected uint8 codes, {-(-n // blocksize)} block scales and a 256-entry code, "
                             f"got {q.dtype}, {absmax.numel()} and {code.numel()}")
        q, absmax, code = q.contiguous(), absmax.float().contiguous(), code.float().contiguous()
        out = self._empty(q.shape, torch.float32)
        self._lib.qlora_dequantize_8bit(q.data_ptr(), absmax.data_ptr(), code.data_ptr(), n, blocksize,
                                        out.data_ptr(), torch.get_num_threads())
        return out

    def gemm_4bit(self, x, packed, absmax, code, blocksize, shape, nested=None) -> torch.Tensor | None:
        """x (m, k) · Wᵀ in fp32 for a 4-bit W of `shape` (n_out, k), reading the codes once for all m
        rows (decoding). None when the layout does not allow it (k % blocksize or blocksize % 16)."""
        n_out, k = shape
        if x.dim() != 2 or x.shape[1] != k or k % blocksize or blocksize % 16:
            return None
        x = x.float().contiguous()
        code = code.float().contiguous()
        scales, offset, nested_bs = _scale_args(absmax, nested)
        out = torch.empty(x.shape[0], n_out, dtype=torch.float32)
        self._lib.qlora_gemm_4bit(x.data_ptr(), x.shape[0], k, packed.contiguous().data_ptr(),
                                  *(None if t is None else t.data_ptr() for t in scales), offset, nested_bs,
                                  code.data_ptr(), n_out, blocksize, out.data_ptr(), torch.get_num_threads())
        return out

    def decode_linears(self, specs, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (fp32, the specs' summed n) = each linear of `specs` (a decoding.DecodeLinears)
        applied to x (bf16, k), outputs one after another; see csrc/decode_cpu.cpp. One token only."""
        if x.dtype != torch.bfloat16 or not x.is_contiguous() or x.numel() != specs.k:
            raise ValueError(f"x must be a contiguous bfloat16 vector of {specs.k}, got {x.dtype} {tuple(x.shape)}")
        if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != specs.n:
            raise ValueError(f"out must be a contiguous float32 vector of {specs.n}, "
                             f"got {out.dtype} {tuple(out.shape)}")
        self._lib.qlora_decode_linear(ctypes.byref(specs.array), len(specs.array), x.data_ptr(), out.data_ptr())
        return out

    def gemv_bf16(self, w: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None,
                  round_bf16: bool = False) -> torch.Tensor:
        """w (n, k) bf16 · x (k,) bf16 -> (n,) fp32 (fp32 sums), single-threaded; `round_bf16`: the
        values rounded to bf16 (a bf16 linear's output), still stored as fp32."""
        n, k = w.shape
        if w.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or x.numel() != k or not w.is_contiguous():
            raise ValueError(f"expected contiguous bf16 w (n, k) and x (k,), got {w.dtype} {tuple(w.shape)}, "
                             f"{x.dtype} {tuple(x.shape)}")
        out = torch.empty(n, dtype=torch.float32) if out is None else out
        x = x.contiguous()
        if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != n:
            raise ValueError(f"out must be a contiguous float32 vector of {n}")
        self._lib.qlora_gemv_bf16(w.data_ptr(), n, k, x.data_ptr(), out.data_ptr(), int(round_bf16))
        return out

    def decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int,
                         scale: float, out: torch.Tensor) -> torch.Tensor:
        """softmax(scale · q·Kᵀ)·V for one query row in fp32: q (H, D) fp32; keys (KV, capacity / 16,
        D, 16) (decoding.block_keys' layout) and values (KV, capacity, D) bf16, contiguous, the first
        `length` positions used; kv head of head h = h // (H // KV)."""
        heads, d = q.shape
        kv, capacity, dv = values.shape
        if not (q.dtype == out.dtype == torch.float32 and keys.dtype == values.dtype == torch.bfloat16 and dv == d
                and tuple(keys.shape) == (kv, capacity // 16, d, 16) and capacity % 16 == 0 and heads % kv == 0
                and 0 < length <= capacity and all(t.is_contiguous() for t in (q, keys, values, out))
                and out.shape == q.shape):
            raise ValueError("decode_attention: expected contiguous fp32 q and out (H, D), bf16 keys "
                             f"(KV, capacity / 16, D, 16) and values (KV, capacity, D); got {tuple(q.shape)}, {tuple(keys.shape)}, "
                             f"{tuple(values.shape)}, length {length}")
        self._lib.qlora_decode_attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(), capacity, length,
                                         heads, kv, d, scale, out.data_ptr())
        return out

    def exp_(self, x: torch.Tensor) -> torch.Tensor:
        """x = exp(x) in place for a contiguous fp32 tensor: the decode step's exp (softmax, SiLU),
        common.h's polynomial (~1 ulp); the tests compare builds with it."""
        if x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"exp_: expected a contiguous float32 tensor, got {x.dtype}")
        self._lib.qlora_exp(x.data_ptr(), x.numel())
        return x

    def llama_step(self, model, token: int, pos: int, logits: torch.Tensor) -> torch.Tensor:
        """One decode step of a described llama model (a decoding.Llama): logits (vocab,) fp32 holding
        bf16 values; the keys and values of `pos` land in its cache (csrc/llama_cpu.cpp)."""
        if logits.dtype != torch.float32 or not logits.is_contiguous() or logits.numel() != model.vocab:
            raise ValueError(f"logits must be a contiguous float32 vector of {model.vocab}")
        if self._lib.qlora_llama_step(ctypes.byref(model.struct), token, pos, logits.data_ptr()) != 0:
            raise ValueError(f"token {token} or position {pos} out of range (vocab {model.vocab}, "
                             f"capacity {model.capacity})")
        return logits

    def llama_greedy(self, model, token: int, pos: int) -> int:
        """`llama_step` for greedy decoding: the argmax of its logits (lowest index on a tie), found
        through the model's int8 head screen if it has one."""
        best = self._lib.qlora_llama_greedy(ctypes.byref(model.struct), token, pos)
        if best < 0:
            raise ValueError(f"token {token} or position {pos} out of range (vocab {model.vocab}, "
                             f"capacity {model.capacity})")
        return best

    def argmax_gemv_bf16(self, w: torch.Tensor, screen, x: torch.Tensor) -> int:
        """argmax over o of bf16(w[o] · x), lowest index on a tie, reading w only where the int8
        screen (decoding.int8_screen(w)) cannot rule a row out."""
        q, scale, err = screen
        n, k = w.shape
        if w.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or x.numel() != k or not w.is_contiguous() \
                or q.shape != w.shape or scale.shape != (n,) or err.shape != (n,):
            raise ValueError("argmax_gemv_bf16: expected bf16 w (n, k), x (k,) and int8_screen(w)")
        x = x.contiguous()
        return self._lib.qlora_argmax_gemv_bf16(w.data_ptr(), q.data_ptr(), scale.data_ptr(), err.data_ptr(), n, k,
                                                x.data_ptr())

    # RMSNorm and SwiGLU for training (csrc/train_cpu.cpp; qlora/nn/fused.py checks the inputs:
    # contiguous bf16 CPU tensors of the shapes below)
    def rms_norm_forward(self, x: torch.Tensor, w: torch.Tensor, eps: float):
        """x (rows, d), w (d) -> (y (rows, d), rstd (rows,) fp32)."""
        rows, d = x.shape
        y, rstd = torch.empty_like(x), torch.empty(rows, dtype=torch.float32)
        self._lib.qlora_rms_norm_forward(x.data_ptr(), w.data_ptr(), rows, d, eps, y.data_ptr(), rstd.data_ptr(),
                                         torch.get_num_threads())
        return y, rstd

    def rms_norm_backward(self, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor):
        rows, d = x.shape
        dx = torch.empty_like(x)
        self._lib.qlora_rms_norm_backward(dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr(), rows, d,
                                          dx.data_ptr(), torch.get_num_threads())
        return dx

    def swiglu_forward(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        h = torch.empty_like(g)
        self._lib.qlora_swiglu_forward(g.data_ptr(), u.data_ptr(), h.data_ptr(), g.numel(), torch.get_num_threads())
        return h

    def swiglu_backward(self, dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
        dg, du = torch.empty_like(g), torch.empty_like(u)
        self._lib.qlora_swiglu_backward(dh.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(),
                                        g.numel(), torch.get_num_threads())
        return dg, du

    def cross_entropy_rows(self, z: torch.Tensor, targets: torch.Tensor, grad: bool) -> torch.Tensor:
        """Loss per row (fp32) of contiguous bf16 logits z (rows, v) at int64 targets; with grad, z is
        overwritten by softmax(z) - onehot(targets) in bf16."""
        rows, v = z.shape
        loss = torch.empty(rows, dtype=torch.float32)
        self._lib.qlora_cross_entropy_rows(z.data_ptr(), rows, v, targets.data_ptr(), loss.data_ptr(), int(grad),
                                           torch.get_num_threads())
        return loss

    def dropout(self, x: torch.Tensor, threshold: int, scale: float, seed: int) -> torch.Tensor:
        """where(mix(i, seed) >= threshold, x * scale, 0) for contiguous fp32/bf16 x (qlora/nn/dropout.py)."""
        out = torch.empty_like(x)
        self._lib.qlora_dropout(x.data_ptr(), out.data_ptr(), x.numel(), _DTYPE_CODES[x.dtype], threshold, scale, seed,
                                torch.get_num_threads())
        return out


def main(argv: list[str]) -> int:
    if argv[:1] != ["--build"] or not set(argv[1:]) <= {"--portable"}:
        print("usage: python -m qlora.quant --build [--portable]   (target: $QLORA_CPU_TARGET, default native)",
              file=sys.stderr)
        return 2
    target = cpu_target(portable="--portable" in argv)
    t0 = time.perf_counter()
    try:
        path = build(target=target)
    except (OSError, RuntimeError) as e:
        print(f"qlora: building the CPU kernels failed; qlora will use the PyTorch reference.\n{e}",
              file=sys.stderr)
        return 1
    k = kernels(target=target)
    kind = "unavailable on this CPU" if k is None else k.isa
    print(f"qlora CPU kernels (target {target}, ISA {kind}): {path} ({time.perf_counter() - t0:.1f} s)")
    return 0 if k is not None else 1
