"""The ARM64 driver's machinery (tests/quant/test_arm64.py): its output format and the bitwise comparison,
and the builds (aarch64 cross-compiled and run under qemu-user, x86 native), cached and run once per session."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import platform
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from qlora.quant.fast import library

from .arm64_calls import make_calls

REPO = Path(__file__).resolve().parents[2]
# $QLORA_ARM64_CSRC: test another copy of the kernel sources (e.g. a commit's, from git archive)
CSRC = Path(os.environ.get("QLORA_ARM64_CSRC") or REPO / "qlora" / "quant" / "csrc")
DRIVER = Path(__file__).with_name("arm64_driver.cpp")
# fast/library.py's _FLAGS for a program instead of a shared library (-fPIC -shared dropped), without -fopenmp:
# the kernels' OpenMP regions start at 2M elements, far above the sizes here.
_COMMON = ("-O3", "-std=c++17", "-ffp-contract=off", "-w")
_INSTALL = "run `bash scripts/install_arm64_tools.sh` (Debian: g++-aarch64-linux-gnu qemu-user-static)"


# ---- the driver's output ----------------------------------------------------------------------------

def parse_outputs(raw: bytes) -> list[tuple[str, list[tuple[str, bytes]]]]:
    assert raw[:8] == b"QA64OUT1", "not a driver output file"
    (ncalls,), at = struct.unpack_from("<I", raw, 8), 12
    calls = []
    for _ in range(ncalls):
        (ln,) = struct.unpack_from("<I", raw, at)
        name, at = raw[at + 4: at + 4 + ln].decode(), at + 4 + ln
        (nout,) = struct.unpack_from("<I", raw, at)
        at += 4
        outs = []
        for _ in range(nout):
            (ll,) = struct.unpack_from("<I", raw, at)
            label, at = raw[at + 4: at + 4 + ll].decode(), at + 4 + ll
            (nb,) = struct.unpack_from("<Q", raw, at)
            outs.append((label, raw[at + 8: at + 8 + nb]))
            at += 8 + nb
        calls.append((name, outs))
    assert at == len(raw), "trailing bytes in the driver's output"
    return calls


_INT_DTYPE = {"f32": np.uint32, "f16": np.uint16, "bf16": np.uint16, "u8": np.uint8, "i64": np.int64}


def _is_nan(bits: np.ndarray, kind: str) -> np.ndarray:
    if kind == "f32":
        return (bits & 0x7FFFFFFF) > 0x7F800000
    if kind == "f16":
        return (bits & 0x7FFF) > 0x7C00
    if kind == "bf16":
        return (bits & 0x7FFF) > 0x7F80
    return np.zeros(bits.shape, dtype=bool)


def _show(bits, kind: str) -> str:
    b = int(bits)
    if kind == "f32":
        return f"{np.array([b], np.uint32).view(np.float32)[0]!r} (0x{b:08x})"
    if kind == "f16":
        return f"{float(np.array([b], np.uint16).view(np.float16)[0])!r} (0x{b:04x})"
    if kind == "bf16":
        return f"{float(np.array([b << 16], np.uint32).view(np.float32)[0])!r} (0x{b:04x})"
    return str(b)


@dataclass
class Difference:
    call: str
    label: str
    count: int
    total: int
    first: int
    a: str
    b: str

    def __str__(self):
        return (f"{self.call} -> {self.label}: {self.count} of {self.total} elements differ, "
                f"first at index {self.first}: {self.a} vs {self.b}")


def compare(a, b) -> tuple[list[Difference], list[Difference]]:
    """Every output of every call, element by element, as bits. Returns (differences, NaN-only
    differences): outputs where the only mismatches are two NaNs with different sign or payload."""
    assert [n for n, _ in a] == [n for n, _ in b], "the two runs made different calls"
    diffs, nan_only = [], []
    for (name, outs_a), (_, outs_b) in zip(a, b):
        assert [lbl for lbl, _ in outs_a] == [lbl for lbl, _ in outs_b], f"{name}: different outputs"
        for (label, da), (_, db) in zip(outs_a, outs_b):
            if label.startswith("info_") or da == db:
                continue
            kind = label.rsplit(":", 1)[1]
            if len(da) != len(db):
                diffs.append(Difference(name, label, -1, -1, -1, f"{len(da)} bytes", f"{len(db)} bytes"))
                continue
            x, y = np.frombuffer(da, _INT_DTYPE[kind]), np.frombuffer(db, _INT_DTYPE[kind])
            bad = x != y
            real = bad & ~(_is_nan(x, kind) & _is_nan(y, kind))
            worst = real if real.any() else bad
            i = int(np.flatnonzero(worst)[0])
            d = Difference(name, label, int(worst.sum()), worst.size, i, _show(x[i], kind), _show(y[i], kind))
            (diffs if real.any() else nan_only).append(d)
    return diffs, nan_only


# ---- builds -----------------------------------------------------------------------------------------

def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


@dataclass
class Build:
    name: str
    cxx: str | None          # None: not available here
    flags: tuple[str, ...]
    runner: tuple[str, ...] = ()
    why_not: str = ""        # when cxx is None
    key_extra: str = ""      # what else the binary depends on (-march=native: the CPU)
    static: bool = False


def _builds() -> dict[str, Build]:
    host = platform.machine()
    native_cxx = library._compiler()
    builds: dict[str, Build] = {}
    # aarch64: cross-compiled and run under qemu-user on another host, native on an ARM64 host
    if host == "aarch64":
        cross, runner, why = native_cxx, (), "" if native_cxx else "no C++ compiler"
    else:
        cross = os.environ.get("QLORA_ARM64_CXX") or shutil.which("aarch64-linux-gnu-g++")
        qemu = (os.environ.get("QLORA_QEMU_AARCH64") or shutil.which("qemu-aarch64-static")
                or shutil.which("qemu-aarch64"))
        runner = (qemu,) if qemu else ()
        why = ("no aarch64 cross compiler (aarch64-linux-gnu-g++)" if not cross else
               "no qemu-aarch64 (qemu-user-static / qemu-user)" if not qemu else "")
        if why:
            cross = None
            why += f": {_INSTALL}"
    # armv8-a: NEON only (the baseline); armv8.6-a+fp16+sve: what -march=native gives on a recent ARM
    # server (bf16, i8mm, dot products, fp16 arithmetic, SVE), should a kernel use those (qemu-user
    # emulates them all: its default CPU is "max")
    for name, march in (("aarch64-neon", ("-march=armv8-a",)), ("aarch64-v8.6-sve", ("-march=armv8.6-a+fp16+sve",)),
                        ("aarch64-portable", ("-march=armv8-a", "-DQLORA_PORTABLE"))):
        builds[name] = Build(name, cross, march, runner, why, static=host != "aarch64")
    # x86-64: run natively
    flags = _cpu_flags()
    x86 = host in ("x86_64", "AMD64")
    no_x86 = "" if x86 else f"the host is {host}, not x86-64"
    cxx = native_cxx if x86 and native_cxx else None
    why = no_x86 or ("" if native_cxx else "no C++ compiler")
    builds["x86-portable"] = Build("x86-portable", cxx, ("-march=native", "-DQLORA_PORTABLE"), (), why,
                                   key_extra=library._cpu_signature())
    v3 = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"} <= flags
    builds["x86-64-v3"] = Build("x86-64-v3", cxx if v3 else None, ("-march=x86-64-v3",), (),
                                why or ("" if v3 else "this CPU lacks AVX2/FMA (x86-64-v3)"))
    avx512 = "avx512f" in flags
    builds["x86-native"] = Build("x86-native", None if avx512 else cxx, ("-march=native",), (),
                                 why or ("" if not avx512 else "AVX-512 host: those kernels sum in their own order and "
                                         "are tested against the reference in test_kernels.py"),
                                 key_extra=library._cpu_signature())
    return builds


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def _compiler_id(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return cxx


def _cache_root() -> Path:
    return library.cache_dir() / "arm64-driver"


def build(b: Build) -> Path:
    """The driver + kernels for `b`, compiled unless cached (keyed by the sources, compiler and flags)."""
    h = hashlib.sha256()
    for f in [DRIVER, *sorted(CSRC.iterdir())]:
        h.update(f.name.encode() + f.read_bytes())
    for part in (b.cxx, _compiler_id(b.cxx), " ".join(_COMMON + b.flags), str(b.static), b.key_extra):
        h.update(part.encode())
    path = _cache_root() / h.hexdigest()[:16] / b.name
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{b.name}.{os.getpid()}.tmp")
    base = [b.cxx, *_COMMON, *b.flags, f"-I{CSRC}", str(DRIVER), *map(str, sources()), "-o", str(tmp), "-pthread"]
    proc = subprocess.run(base + (["-static"] if b.static else []), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{b.name}: {' '.join(base)} failed:\n{proc.stderr[-3000:]}")
    os.replace(tmp, path)
    return path


class Runs:
    """Builds and runs on demand, each once per session; the same input for all."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.builds = _builds()
        self.input = workdir / "in.bin"
        self.input.write_bytes(make_calls().serialize())
        self._out: dict[str, list] = {}
        self._binaries: dict[str, Path | Exception] = {}

    def prebuild(self, names) -> None:
        todo = [self.builds[n] for n in names if self.builds[n].cxx and n not in self._binaries]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as ex:
            for b, fut in [(b, ex.submit(build, b)) for b in todo]:
                try:
                    self._binaries[b.name] = fut.result()
                except Exception as e:  # reported by the test that needs it
                    self._binaries[b.name] = e

    def output(self, name: str):
        if name in self._out:
            return self._out[name]
        b = self.builds[name]
        if b.cxx is None:
            pytest.skip(f"{name}: {b.why_not}")
        self.prebuild([name])
        binary = self._binaries[name]
        if isinstance(binary, Exception):
            raise binary
        out = self.workdir / f"{name}.out"
        proc = subprocess.run([*b.runner, str(binary), str(self.input), str(out)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{name}: the driver failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        self._out[name] = parse_outputs(out.read_bytes())
        return self._out[name]


def report(diffs: list[Difference], what: str, limit: int = 40) -> str:
    lines = [f"{what}: {len(diffs)} outputs differ"] + [f"  {d}" for d in diffs[:limit]]
    if len(diffs) > limit:
        lines.append(f"  ... and {len(diffs) - limit} more")
    return "\n".join(lines)


def info(out) -> str:
    info = dict(next(o for n, o in out if n == "info"))
    return ", ".join(f"{k.split(':')[0][5:]}={v.decode() if k.endswith(':str') else int.from_bytes(v, 'little')}"
                     for k, v in info.items())
