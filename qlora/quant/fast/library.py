"""Building and loading the CPU kernels' library: csrc/*.cpp compiled once per machine with the
system C++ compiler (a few seconds) into $QLORA_KERNEL_CACHE or ~/.cache/qlora/kernels/<key>/.

csrc/*.cpp have no torch dependency and are called through ctypes with raw pointers (the bindings:
quantize.py, llama.py, training.py). Compared with torch.utils.cpp_extension this needs neither
ninja nor pybind11, builds ~30x faster than a translation unit that includes the torch headers, and
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
CPU lacks is refused rather than run (fast.kernels).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
from pathlib import Path

_CSRC = Path(__file__).parent.parent / "csrc"
_SOURCES = sorted(_CSRC.glob("*.cpp"))  # one library
# -ffp-contract=off: an FMA would skip a rounding the reference performs (see quant4_cpu.cpp), and
# the kernels fuse exactly where their defined order does (simd16.h). The target adds -march.
_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off")
_PORTABLE = "portable"
_OPENMP = ("-fopenmp",)  # dropped (single-threaded kernels) where the compiler lacks OpenMP
_LIB_NAME = "libqlora_quant.so"

# What each ISA needs from the CPU, as /proc/cpuinfo spells the flags (x86 only: NEON is AArch64's baseline)
_ISA_FLAGS = {"avx2": {"avx2", "fma", "f16c"}, "avx512": {"avx512f", "avx512bw"},
              "avx512-bf16": {"avx512f", "avx512bw", "avx512_bf16"}}


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
