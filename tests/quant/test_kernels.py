"""The compiled CPU kernels (fast/quantize.py, csrc/quant4_cpu.cpp, quant8_cpu.cpp) equal the reference
(blockwise.py) bit for bit: every build (conftest's k: native, which is AVX-512 where the CPU has it,
AVX2 and portable scalar), every dtype, block size and quant type,
odd and ragged element counts, and every value family including subnormals."""

from __future__ import annotations

import logging

import pytest
import torch

import qlora
from qlora.quant import blockwise as ref
from qlora.quant import fast, kernels
from qlora.quant.fast import library
from qlora.quant.codebooks import QUANT_TYPES, code4, dynamic_map

from .helpers import FAMILIES, assert_bits_equal, sample

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COUNTS = (1, 2, 3, 15, 16, 17, 31, 33, 63, 65, 127, 129, 4095, 4097, 65_537)


def _zero_some_blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = x.reshape(-1)
    if flat.numel() > 3 * blocksize:
        flat[:blocksize] = 0  # a full all-zero block
        flat[-(flat.numel() % blocksize or blocksize):] = 0  # and the (ragged) last block
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_quantize_and_dequantize_match_reference(k, dtype, quant_type):
    gen = torch.Generator().manual_seed(10 * DTYPES.index(dtype) + QUANT_TYPES.index(quant_type))
    for i, n in enumerate(COUNTS):
        blocksize = ref.BLOCKSIZES[i % len(ref.BLOCKSIZES)]
        code = code4(quant_type, "cpu", blocksize)  # bof4/bof4s: a table per block size
        x = _zero_some_blocks(sample((n,), dtype, FAMILIES[i % len(FAMILIES)], gen), blocksize)
        packed, absmax = ref.quantize_4bit_ref(x, quant_type, blocksize)
        fast_packed, fast_absmax = k.quant.quantize_4bit(x, quant_type, blocksize)
        assert_bits_equal(fast_packed, packed, f"packed n={n} bs={blocksize}")
        assert_bits_equal(fast_absmax, absmax, f"absmax n={n} bs={blocksize}")
        for out_dtype in DTYPES:
            want = ref.dequantize_4bit_ref(packed, absmax, code, blocksize, (n,), out_dtype)
            got = k.quant.dequantize_4bit(packed, absmax, code, blocksize, (n,), out_dtype)
            assert_bits_equal(got, want, f"dequantize n={n} bs={blocksize} -> {out_dtype}")


def test_random_configurations_match_reference(k):
    gen = torch.Generator().manual_seed(7)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]  # noqa: E731
    for _ in range(40):
        n = int(torch.randint(1, 20_000, (1,), generator=gen))
        dtype, quant_type, blocksize = pick(DTYPES), pick(QUANT_TYPES), pick(ref.BLOCKSIZES)
        x = _zero_some_blocks(sample((n,), dtype, pick(FAMILIES), gen), blocksize)
        what = f"n={n} {dtype} {quant_type} bs={blocksize}"
        packed, absmax = ref.quantize_4bit_ref(x, quant_type, blocksize)
        assert_bits_equal(k.quant.quantize_4bit(x, quant_type, blocksize)[0], packed, what)
        q8, absmax2 = ref.quantize_8bit_ref(absmax - absmax.mean(), dynamic_map(True), 256)
        fast_q8, fast_absmax2 = k.quant.quantize_8bit(absmax - absmax.mean(), dynamic_map(True), 256)
        assert_bits_equal(fast_q8, q8, what)
        assert_bits_equal(fast_absmax2, absmax2, what)
        nested = (absmax2, dynamic_map(True), absmax.mean(), 256)
        scales = ref.dequantize_8bit_ref(q8, absmax2, dynamic_map(True), 256) + absmax.mean()
        out_dtype = pick(DTYPES)
        code = code4(quant_type, "cpu", blocksize)
        want = ref.dequantize_4bit_ref(packed, scales, code, blocksize, (n,), out_dtype)
        got = k.quant.dequantize_4bit(packed, q8, code, blocksize, (n,), out_dtype, nested)
        assert_bits_equal(got, want, what)


def test_4bit_ties_go_to_the_lower_code(k):
    """Values exactly on the fp32 midpoints (absmax 1, so the scale is exact) take the lower code."""
    bounds, order = ref._bounds_and_order("fp4", torch.device("cpu"))
    x = torch.cat([bounds, torch.ones(1)])  # 16 values: the 15 midpoints, then the block's absmax
    x = torch.nn.functional.pad(x, (0, 48))
    packed, _ = k.quant.quantize_4bit(x, "fp4", 64)
    assert_bits_equal(packed, ref.quantize_4bit_ref(x, "fp4", 64)[0], "ties")
    codes = ref.unpack_nibbles(packed, 15)
    assert codes.tolist() == order[:15].tolist()  # midpoint i -> sorted code i, not i + 1


def test_fused_double_quant_dequantize_matches_reference(k):
    gen = torch.Generator().manual_seed(1)
    for n, blocksize in ((1, 64), (4097, 64), (3 * 256 * 64 + 5, 64), (70_001, 256), (123_457, 4096)):
        x = sample((n,), torch.bfloat16, "heavy", gen)
        q = qlora.quantize(x, "nf4", blocksize, double_quant=True)
        scales = ref.dequantize_8bit_ref(q.absmax, q.nested_absmax, q.nested_code, 256) + q.offset
        nested = (q.nested_absmax, q.nested_code, q.offset, 256)
        for out_dtype in DTYPES:
            want = ref.dequantize_4bit_ref(q.data, scales, q.code, blocksize, (n,), out_dtype)
            assert_bits_equal(k.quant.dequantize_4bit(q.data, q.absmax, q.code, blocksize, (n,), out_dtype, nested),
                              want)
            out = torch.full((n,), float("nan"), dtype=out_dtype)
            assert k.quant.dequantize_4bit_into(out, q.data, q.absmax, q.code, blocksize, nested) is out
            assert_bits_equal(out, want, f"into n={n} -> {out_dtype}")


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_matches_reference(k, signed):
    gen = torch.Generator().manual_seed(2)
    code = dynamic_map(signed)
    for i, (n, blocksize) in enumerate([(1, 256), (255, 256), (257, 256), (10_000, 2048), (65_537, 256),
                                        (1000, 7), (4096, 64), (300_001, 4096)]):
        x = sample((n,), torch.float32, FAMILIES[i % len(FAMILIES)], gen)
        x = x if signed else x.abs()  # the unsigned map holds Adam's second moment, never negative
        x = _zero_some_blocks(x, blocksize)
        x[min(n - 1, blocksize + 1)] = 0  # a zero beside nonzeros (NaN bin when absmax is subnormal)
        q, absmax = ref.quantize_8bit_ref(x, code, blocksize)
        fast_q, fast_absmax = k.quant.quantize_8bit(x, code, blocksize)
        assert_bits_equal(fast_q, q, f"q n={n} bs={blocksize}")
        assert_bits_equal(fast_absmax, absmax, f"absmax n={n} bs={blocksize}")
        want = ref.dequantize_8bit_ref(q, absmax, code, blocksize)
        assert_bits_equal(k.quant.dequantize_8bit(q, absmax, code, blocksize), want, f"dequantize n={n}")


def test_8bit_keeps_shape_and_takes_half_precision(k):
    x = torch.randn(7, 300, dtype=torch.bfloat16)
    q, absmax = k.quant.quantize_8bit(x, dynamic_map(True), 256)
    want_q, want_absmax = ref.quantize_8bit_ref(x, dynamic_map(True), 256)
    assert q.shape == x.shape and torch.equal(q, want_q) and torch.equal(absmax, want_absmax)
    assert k.quant.dequantize_8bit(q, absmax, dynamic_map(True), 256).shape == x.shape


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_threaded_kernels_match_reference(k, two_threads):
    """Above 2M elements the kernels split the blocks across threads (OpenMP)."""
    gen = torch.Generator().manual_seed(3)
    n = (1 << 21) + 4097  # ragged last block, odd count
    x = sample((n,), torch.bfloat16, "heavy", gen)
    packed, absmax = ref.quantize_4bit_ref(x, "fp4", 64)
    assert_bits_equal(k.quant.quantize_4bit(x, "fp4", 64)[0], packed)
    scales = ref.dequantize_8bit_ref(*ref.quantize_8bit_ref(absmax, dynamic_map(True), 256), dynamic_map(True), 256)
    want = ref.dequantize_4bit_ref(packed, scales, code4("fp4"), 64, (n,), torch.bfloat16)
    assert_bits_equal(k.quant.dequantize_4bit(packed, scales, code4("fp4"), 64, (n,), torch.bfloat16), want)
    q, absmax8 = ref.quantize_8bit_ref(x.float(), dynamic_map(True), 256)
    fast_q, fast_absmax8 = k.quant.quantize_8bit(x.float(), dynamic_map(True), 256)
    assert_bits_equal(fast_q, q)
    assert_bits_equal(fast_absmax8, absmax8)
    assert_bits_equal(k.quant.dequantize_8bit(q, absmax8, dynamic_map(True), 256),
                      ref.dequantize_8bit_ref(q, absmax8, dynamic_map(True), 256))


def test_noncontiguous_inputs(k):
    w = torch.randn(96, 130, dtype=torch.bfloat16).t()  # a transposed view
    assert_bits_equal(k.quant.quantize_4bit(w, "nf4", 64)[0], ref.quantize_4bit_ref(w, "nf4", 64)[0])


def test_nonfinite_raises_the_reference_error(k):
    x = torch.randn(1000)
    x[700] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf \(first in block 10, elements 640..703\)"):
        k.quant.quantize_4bit(x, "nf4", 64)
    with pytest.raises(ValueError, match=r"NaN or Inf \(first in block 2, elements 512..767\)"):
        k.quant.quantize_8bit(x, dynamic_map(True), 256)


def test_mismatched_sizes_raise(k):
    packed, absmax = k.quant.quantize_4bit(torch.randn(128), "nf4", 64)
    with pytest.raises(ValueError, match="expected 32 packed uint8 bytes for 64 elements, got 64"):
        k.quant.dequantize_4bit(packed, absmax, code4("nf4"), 64, (64,), torch.float32)
    with pytest.raises(ValueError, match="expected 3 block scales and a 16-entry codebook, got 2 and 16"):
        k.quant.dequantize_4bit_into(torch.empty(130), torch.zeros(65, 1, dtype=torch.uint8), absmax, code4("nf4"), 64)


# ---- dispatch (kernels.py) ----


def test_public_api_fast_equals_reference(monkeypatch):
    w = torch.randn(300, 257, dtype=torch.bfloat16)
    fast_q = qlora.quantize(w, "nf4", 64, double_quant=True)
    fast_w = qlora.dequantize(fast_q)
    monkeypatch.setenv("QLORA_REFERENCE_KERNELS", "1")
    ref_q = qlora.quantize(w, "nf4", 64, double_quant=True)
    for name in ("data", "absmax", "nested_absmax", "offset"):
        assert_bits_equal(getattr(fast_q, name), getattr(ref_q, name), name)
    assert_bits_equal(fast_w, qlora.dequantize(ref_q), "dequantized")


def test_reference_env_var_skips_the_library(monkeypatch):
    def refuse(portable=False):
        raise AssertionError("kernels() must not be consulted under QLORA_REFERENCE_KERNELS=1")

    monkeypatch.setenv("QLORA_REFERENCE_KERNELS", "1")
    monkeypatch.setattr(fast, "kernels", refuse)
    q = qlora.quantize(torch.randn(64, 64), "fp4", 64)
    assert qlora.dequantize(q).shape == (64, 64)


def test_into_falls_back_for_noncontiguous_out():
    q = qlora.quantize(torch.randn(40, 64), "nf4", 64, double_quant=True)
    nested = (q.nested_absmax, q.nested_code, q.offset, 256)
    out = torch.empty(40, 80, dtype=torch.bfloat16)[:, :64]  # (40, 64), not contiguous
    assert not out.is_contiguous()
    kernels.dequantize_4bit_into(out, q.data, q.absmax, q.code, 64, nested)
    assert_bits_equal(out.contiguous(), qlora.dequantize(q, torch.bfloat16))


def test_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(fast, "_loaded", {})
    monkeypatch.setenv("QLORA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    w = torch.randn(64, 64)
    with caplog.at_level(logging.WARNING, logger="qlora.quant.fast"):
        q1, q2 = qlora.quantize(w), qlora.quantize(w)
    warnings = [r for r in caplog.records if "kernels unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert torch.equal(q1.data, q2.data) and torch.equal(q1.data, ref.quantize_4bit_ref(w, "nf4", 64)[0])


def test_build_is_cached_per_machine():
    path = library.build()
    assert path.exists() and library.build() == path and library.library_path() == path
    assert library.library_path(portable=True) != path
