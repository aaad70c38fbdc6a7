"""Where bitsandbytes' native CPU dequantize_4bit differs from its canonical semantics (its PyTorch
definition, helpers.bnb_canonical), measured on the CPU this runs on. Informative: it passes on
every CPU and prints what it measured (pytest -rP or -s shows the table); what it asserts is that
the kernel was given canonical codes and scales, and that every difference falls in a case listed
below for the kernel bitsandbytes chose.

The parity tests (test_parity_bnb.py) compare with the canonical semantics only, so that they mean
the same on every CPU. Which kernel bitsandbytes 0.50.2 runs for dequantize_4bit on a CPU tensor
(backends/cpu/ops.py, then libbitsandbytes_cpu's run-time dispatch, read from its machine code):
- "pytorch": the row length (last dim) is odd, or torch reports AVX-512 and blocksize >= 2048 ->
  the PyTorch definition itself. No difference.
- "avx512": the CPU has AVX-512F, the row length is a multiple of 16 and blocksize >= 16. It (a)
  applies the wrong absmax when a row is not a whole number of blocks, and (b) for bf16 rounds a
  subnormal fp32 product (code * absmax) to zero. (bitsandbytes itself avoids it for blocksize >=
  2048, for "accuracy issues", when torch reports AVX-512; any difference is accepted there.)
- "scalar": every other case (every CPU without AVX-512; rows whose length is not a multiple of 16
  on any CPU; blocksize >= 2048 where torch does not report AVX-512). It decodes FP4 code 8 as
  -0.0 (0.0 * -1, as bitsandbytes' CUDA kernel does) where the definition gives +0.0: the same
  value, another bit pattern. Otherwise bit-identical (subnormals included).
"""

from __future__ import annotations

import itertools
import platform
from pathlib import Path

import pytest
import torch

from .helpers import FAMILIES, assert_bits_equal, bits, bnb_canonical, bnb_default_op, sample

pytestmark = pytest.mark.bnb_native  # registered in pyproject.toml; -m bnb_native -rP shows the table

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional
cpu_ops = pytest.importorskip("bitsandbytes.backends.cpu.ops")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES = (64, 128, 256, 4096)
# whole blocks per row (a multiple of 16); rows of 96 (a multiple of 16, not of any blocksize); rows
# of 40 (not a multiple of 16: scalar on every CPU); odd rows (the PyTorch path); 4096-long rows.
SHAPES = ((16, 256), (32, 96), (4, 40), (3, 7), (1, 4096))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _has_avx512f() -> bool:
    try:
        return bool(bnb.cextension.lib.has_avx512f_cpu())
    except (AttributeError, OSError, RuntimeError):
        return False


def kernel_for(n: int, blocksize: int) -> str:
    """The dequantize_4bit kernel bitsandbytes 0.50.2 runs for rows of n elements on this CPU."""
    if n % 2 or (cpu_ops._has_avx512 and blocksize >= 2048):
        return "pytorch"
    if _has_avx512f() and n % 16 == 0 and blocksize >= 16:
        return "avx512"
    return "scalar"


def _codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:numel]


def _classify(native, canonical, canonical_fp32, codes, quant_type, kernel, rows_whole, blocksize=64) -> dict:
    """Every differing element -> the listed case it falls in ("unexplained" when none)."""
    differ = (bits(native) != bits(canonical)).reshape(-1)
    native, canonical, canonical_fp32 = native.reshape(-1), canonical.reshape(-1), canonical_fp32.reshape(-1)
    zero_sign = differ & (codes == 8) & (canonical == 0) & (native == 0) & torch.signbit(native)
    if quant_type != "fp4":
        zero_sign = torch.zeros_like(differ)
    subnormal = (canonical_fp32 != 0) & (canonical_fp32.abs() < torch.finfo(torch.float32).tiny)
    flushed = differ & subnormal & (native == 0) if native.dtype == torch.bfloat16 else torch.zeros_like(differ)
    allowed = {"pytorch": {}, "scalar": {"fp4 code 8 -> -0.0": zero_sign},
               "avx512": {"bf16 subnormal -> 0": flushed}}[kernel]
    if kernel == "avx512" and not rows_whole:
        allowed["absmax of rows not whole blocks"] = differ
    if kernel == "avx512" and blocksize >= 2048:  # only where torch does not report AVX-512 (see kernel_for)
        allowed["blocksize >= 2048"] = differ
    out, explained = {}, torch.zeros_like(differ)
    for case, mask in allowed.items():
        mask = mask & ~explained
        explained |= mask
        out[case] = int(mask.sum())
    out["unexplained"] = int((differ & ~explained).sum())
    out["differ"] = int(differ.sum())
    return out


def test_bnb_native_dequantize_4bit_differs_from_its_definition_only_where_listed(monkeypatch):
    # bitsandbytes runs its PyTorch path (odd rows here) through torch.compile, which recompiles for
    # every shape and dtype (minutes in all): run it eagerly, the same operations.
    default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    compute = default_ops._dequantize_4bit_compute
    monkeypatch.setattr(default_ops, "_dequantize_4bit_compute", getattr(compute, "__wrapped__", compute))
    default_quantize = bnb_default_op("quantize_4bit")
    rows, unexplained = [], []
    for j, (dtype, quant_type, blocksize) in enumerate(itertools.product(DTYPES, ("nf4", "fp4"), BLOCKSIZES)):
        t = {"kernels": [], "elements": 0, "differ": 0, "max_abs": 0.0, "cases": {}}
        for i, shape in enumerate(SHAPES):  # the families rotate: each dtype sees every (shape, family) pair
            family = FAMILIES[(i + j) % len(FAMILIES)]
            kernel = kernel_for(shape[-1], blocksize)
            t["kernels"] += [kernel] if kernel not in t["kernels"] else []
            x = sample(shape, dtype, family, torch.Generator().manual_seed(10 * j + i))
            packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
            # what the native kernel is given is bitsandbytes' canonical quantization
            ref_packed, ref_absmax = default_quantize(x, blocksize, quant_type, torch.uint8)
            assert_bits_equal(packed, ref_packed, "packed")
            assert_bits_equal(state.absmax, ref_absmax, "absmax")
            native = F.dequantize_4bit(packed, state)
            with bnb_canonical():
                canonical = F.dequantize_4bit(packed, state)
                state.dtype = torch.float32
                canonical_fp32 = F.dequantize_4bit(packed, state)
            c = _classify(native, canonical, canonical_fp32, _codes(packed, x.numel()), quant_type, kernel,
                          shape[-1] % blocksize == 0, blocksize)
            t["elements"] += x.numel()
            t["differ"] += c.pop("differ")
            if c["unexplained"]:
                unexplained.append((str(dtype)[6:], quant_type, blocksize, shape, family, kernel, c["unexplained"]))
            for case, count in c.items():
                t["cases"][case] = t["cases"].get(case, 0) + count
            finite = torch.isfinite(native.float()) & torch.isfinite(canonical.float())
            diff = (native.float() - canonical.float())[finite]
            t["max_abs"] = max(t["max_abs"], float(diff.abs().max()) if diff.numel() else 0.0)
        rows.append((str(dtype)[6:], quant_type, blocksize, t))

    print(f"\nbitsandbytes {bnb.__version__} native dequantize_4bit vs its PyTorch definition on {_cpu_name()} "
          f"(torch capability {torch.backends.cpu.get_cpu_capability()}, AVX-512F {_has_avx512f()}); "
          f"shapes {', '.join('x'.join(map(str, s)) for s in SHAPES)}, value families in rotation:")
    print(f"{'dtype':9}{'type':5}{'block':>6}  {'kernels':16}{'bits differ':>16} {'max |diff|':>11}  cases")
    for dtype, quant_type, blocksize, t in rows:
        cases = ", ".join(f"{k}: {v}" for k, v in t["cases"].items() if v)
        print(f"{dtype:9}{quant_type:5}{blocksize:>6}  {'+'.join(t['kernels']):16}{t['differ']:>7}/{t['elements']:<8} "
              f"{t['max_abs']:>11.3g}  {cases}")
    assert not unexplained, \
        f"outside the listed cases (dtype, type, block, shape, family, kernel, count): {unexplained}"
    assert any(k != "pytorch" for *_, t in rows for k in t["kernels"]), "no native kernel ran: nothing was measured"


def test_bnb_native_kernel_choice_covers_every_path_here():
    """The shapes above reach both the PyTorch path and this CPU's native kernel."""
    kernels = {kernel_for(shape[-1], b) for shape in SHAPES for b in BLOCKSIZES}
    assert "pytorch" in kernels and "scalar" in kernels  # odd rows; rows of 40
    assert ("avx512" in kernels) == _has_avx512f()


def test_bnb_native_classification_accepts_only_the_listed_cases():
    """The classifier above, on made-up kernel outputs (so that it is checked on every CPU, also for
    the kernels this CPU does not run)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([sample((256,), torch.bfloat16, "normal", gen), sample((256,), torch.bfloat16, "subnormal", gen)])
    x[1:256:8] = 1e-4  # rounds to FP4's zero, as code 8 (the value is positive)
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="fp4")
    codes = _codes(packed, x.numel())
    with bnb_canonical():
        canonical = F.dequantize_4bit(packed, state)
        state.dtype = torch.float32
        canonical_fp32 = F.dequantize_4bit(packed, state)
    zero8 = (codes == 8) & (canonical == 0)
    tiny = (canonical_fp32 != 0) & (canonical_fp32.abs() < torch.finfo(torch.float32).tiny)
    assert bool(zero8.any()) and bool(tiny.any())
    signed_zero = torch.where(zero8, -canonical, canonical)
    flushed = torch.where(tiny, torch.zeros_like(canonical), canonical)
    off = canonical.clone()
    off[3] = off[3] * 2 + 1

    def unexplained(native, kernel, rows_whole=True):
        return _classify(native, canonical, canonical_fp32, codes, "fp4", kernel, rows_whole)["unexplained"]

    assert unexplained(signed_zero, "scalar") == 0 and unexplained(signed_zero, "pytorch") == int(zero8.sum())
    n_flushed = int((bits(flushed) != bits(canonical)).sum())  # some subnormal products round to 0 in bf16 anyway
    assert n_flushed > 0 and unexplained(flushed, "avx512") == 0 and unexplained(flushed, "scalar") == n_flushed
    assert unexplained(off, "scalar") == unexplained(off, "avx512") == 1
    assert unexplained(off, "avx512", rows_whole=False) == 0  # (a): any value in rows that are not whole blocks
    assert unexplained(signed_zero, "avx512") == int(zero8.sum())
    assert unexplained(off, "avx512") == 1 and _classify(off, canonical, canonical_fp32, codes, "fp4", "avx512", True,
                                                         blocksize=4096)["unexplained"] == 0
