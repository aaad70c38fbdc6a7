"""ARM64 verified without ARM hardware: every kernel of qlora/quant/csrc, cross-compiled for aarch64
(Debian's g++-aarch64-linux-gnu) and run under qemu-user, byte for byte against the same kernels
built portable (-DQLORA_PORTABLE), and against the portable x86 build run natively.

tests/quant/arm64_driver.cpp is compiled together with csrc/*.cpp into one program per build; it
reads the calls written here (inputs made with qlora's own tables: codebooks, the 8-bit LUT as
fast/quantize.py pads it, Double Quantization scales from qlora.quantize, LoRA B blocked as
fast/llama_structs.py blocks it), calls each extern "C" kernel as the bindings in qlora/quant/fast/
do, and writes every output.

What is compared, and how exactly: every output, element by element, as bits (+0.0 != -0.0;
NaN where the other build has a number fails), with one exception everywhere: two NaNs are equal
whatever their sign and payload bits. Neither IEEE 754 nor the compiler fixes those: x86 creates
0xffc00000 (0 * inf, inf - inf) where AArch64 creates 0x7fc00000, and when two NaNs meet, the
hardware keeps the one in a given operand position, which the compiler is free to swap (a + b
for b + a, vfmadd132 for vfmadd231). bf16 stores canonicalize NaN anyway; fp32 and fp16 stores
keep the bits. Within one architecture such NaN-only differences are reported as a warning.

  aarch64 NEON      vs aarch64 portable  exact (as above). Two NEON builds: -march=armv8-a (NEON is
  aarch64 v8.6+SVE                       baseline) and armv8.6-a+fp16+sve (what -march=native gives
                                         on a recent ARM server: bf16, i8mm, dot products, SVE).
  aarch64 portable  vs x86 portable      exact, the portable kernels being the same canonical
                                         arithmetic on both. What the C library computes is the
                                         one thing not in the sources: today the portable kernels
                                         call only sqrtf (IEEE-exact everywhere) and logf (the
                                         cross-entropy's loss); exp is the kernels' own polynomial
                                         (qlora_exp). Checked once over all 2^32 fp32 inputs
                                         (Debian 12, glibc 2.36): logf is the same on x86-64 and
                                         aarch64; expf differs at exactly two, by 1 ulp: 32.564632
                                         (0x4202422f) and -63.09946 (0xc27c65d9), where x86-64's
                                         FMA variant rounds the wrong way. So every kernel is
                                         compared exactly. The driver's "libm" call compares the
                                         two C libraries on every bf16 value and 80k fp32
                                         arguments each run: should they disagree there (another
                                         C library), the kernels that call or called them
                                         (_LIBM_OPS) are reported in a warning instead of failing,
                                         and the rest must still match.
  x86-64-v3 / native vs x86 portable     exact (the AVX2 kernels; an AVX-512 host's own kernels are
                                         tested against the reference in test_kernels.py).

Sizes are small (qemu runs the whole set in a few seconds) and ragged (n not a multiple of
16/32/64 where the API allows), with NaN, Inf, subnormal and tie inputs for quantization.
Builds are cached in library.cache_dir()/arm64-driver/<hash of driver, sources, compiler, flags>/.
Needs: scripts/install_arm64_tools.sh (g++-aarch64-linux-gnu, qemu-user-static); skipped without.
"""

from __future__ import annotations

import warnings

import pytest

from .arm64_build import DRIVER, Runs, compare, info, report, sources

# kernels whose portable code calls (logf: cross-entropy) or called (expf, before qlora_exp) the C library
_LIBM_OPS = frozenset({"swiglu_forward", "swiglu_backward", "cross_entropy_rows", "decode_attention", "llama"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    r = Runs(tmp_path_factory.mktemp("arm64"))
    r.prebuild(["aarch64-neon", "aarch64-v8.6-sve", "aarch64-portable", "x86-portable", "x86-64-v3", "x86-native"])
    return r


# ---- the comparisons ---------------------------------------------------------------------------------

def _check(a, b, what: str, excuse=lambda d: False, warn_nan: bool = True) -> None:
    """Fail on any difference but NaN sign/payload (warned about where `warn_nan`); differences
    `excuse` accepts are warned about instead."""
    diffs, nan_only = compare(a, b)
    excused = [d for d in diffs if excuse(d)]
    diffs = [d for d in diffs if not excuse(d)]
    if nan_only and warn_nan:
        warnings.warn(report(nan_only, f"{what}: NaN sign/payload only (not a failure)"))
    if excused:
        warnings.warn(report(excused, f"{what}: excused"))
    assert not diffs, report(diffs, what)


@pytest.mark.parametrize("name", ["aarch64-neon", "aarch64-v8.6-sve"])
def test_neon_build_equals_portable_build_on_aarch64(runs, name):
    """The NEON kernels (-march=armv8-a: NEON is baseline; and armv8.6-a with fp16 and SVE) against
    the portable scalar kernels, all aarch64 under qemu: every output bit for bit."""
    neon = runs.output(name)
    _check(neon, runs.output("aarch64-portable"), f"{name} build ({info(neon)}) vs aarch64 portable build")


def test_aarch64_portable_equals_x86_portable(runs):
    """The portable kernels compute the same canonical arithmetic on both architectures: bit for bit
    (but NaN payloads), and for kernels calling expf/logf, as long as the C libraries agree."""
    a64, x86 = runs.output("aarch64-portable"), runs.output("x86-portable")
    libm_differs = any(d.call == "libm" for d in compare(a64, x86)[0])
    what = "aarch64 portable build vs x86 portable build"
    if any(d.call.split("/")[0] in _LIBM_OPS for d in compare(a64, x86)[0]):
        what += (f" (of these, {', '.join(sorted(_LIBM_OPS))} call expf/logf, and glibc's expf differs between "
                 "x86-64 and aarch64 at 0x4202422f and 0xc27c65d9: see this file's docstring)")
    _check(a64, x86, what, warn_nan=False,  # the two default NaNs differ
           excuse=lambda d: libm_differs and (d.call == "libm" or d.call.split("/")[0] in _LIBM_OPS))


@pytest.mark.parametrize("name", ["x86-64-v3", "x86-native"])
def test_x86_simd_build_equals_portable(runs, name):
    """The x86 SIMD build (AVX2 for x86-64-v3; fast/library.py's -march=native on a host without AVX-512)
    against the portable build: every output bit for bit."""
    simd = runs.output(name)
    _check(simd, runs.output("x86-portable"), f"{name} build ({info(simd)}) vs x86 portable build")


def test_driver_covers_every_kernel():
    """Every extern "C" kernel of csrc/*.cpp is called by the driver (a new kernel needs a case here)."""
    import re

    exported = set()  # functions named qlora_* defined at the start of a line (the extern "C" ones)
    for src in sources():
        exported |= set(re.findall(r"^\w[\w\s\*]*?\b(qlora_\w+)\s*\([^;]*?\)\s*\{", src.read_text(), re.M))
    # not kernels: build/introspection switches and memory advice
    ignored = {"qlora_simd", "qlora_gemv_simd", "qlora_isa", "qlora_advise_hugepages", "qlora_decode_threads"}
    called = set(re.findall(r"\b(qlora_\w+)\s*\(", DRIVER.read_text().split("namespace {", 1)[1]))
    missing = exported - ignored - called
    assert exported and not missing, f"kernels the ARM64 driver does not call: {sorted(missing)}"
