"""Codebooks: one exact copy each; derivations and bitsandbytes' tables agree bit for bit."""

from __future__ import annotations

import pytest
import torch

from qlora.quant import codebooks
from qlora.quant.codebooks import NF4, QUANT_TYPES, code4, derive_nf4, dynamic_map

from .helpers import assert_bits_equal


def test_nf4_derivation_equals_table():
    assert_bits_equal(derive_nf4(), torch.tensor(NF4, dtype=torch.float32), "derive_nf4()")


def test_nf4_shape_of_the_table():
    code = code4("nf4")
    assert code[0].item() == -1.0 and code[7].item() == 0.0 and code[15].item() == 1.0
    assert int((code > 0).sum()) == 8 and int((code < 0).sum()) == 7  # asymmetric: 8 positive, 7 negative
    assert bool((code[1:] > code[:-1]).all())


def test_fp4_e3m0_and_int4_values():
    e3m0 = [0.0] + [2.0 ** (e - 7) for e in range(1, 8)]  # exponent field 0 is zero, no mantissa
    # code 8 is +0.0 as in FP4 (a -0.0 there broke the re-quantization fixed point, test_properties)
    assert_bits_equal(code4("fp4_e3m0"), torch.tensor(e3m0 + [0.0] + [-v for v in e3m0[1:]]), "fp4_e3m0")
    int4 = [i / 7 for i in range(7, -1, -1)] + [-i / 7 for i in range(0, 8)]  # code 8 is +0.0
    assert_bits_equal(code4("int4"), torch.tensor(int4).float(), "int4")


# int4 is left out: bitsandbytes 0.50's get_4bit_type("int4") raises (it divides an integer
# tensor in place); test_fp4_e3m0_and_int4_values checks the values it means, i / 7.
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_tables_match_bitsandbytes(quant_type):
    F = pytest.importorskip("bitsandbytes.functional")
    # fp4 code 8 is +0.0 in both (bitsandbytes builds it from the integer -0)
    assert_bits_equal(code4(quant_type), F.get_4bit_type(quant_type, device="cpu").float(), quant_type)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_bitsandbytes(signed):
    F = pytest.importorskip("bitsandbytes.functional")
    ours = dynamic_map(signed)
    assert ours.shape == (256,) and bool((ours[1:] >= ours[:-1]).all()) and ours[-1].item() == 1.0
    assert_bits_equal(ours, F.create_dynamic_map(signed=signed).float(), f"dynamic_map(signed={signed})")


def test_unknown_quant_type():
    with pytest.raises(ValueError, match="unknown quant_type 'nf5'; choose one of nf4, fp4, fp4_e3m0, int4"):
        code4("nf5")


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_tables_are_copies(quant_type):
    """Editing a returned table (e.g. a state-dict tensor) must not change the format."""
    code4(quant_type).zero_()
    dynamic_map(True).zero_()
    assert code4(quant_type).abs().max().item() == 1.0
    assert dynamic_map(True).equal(codebooks._dynamic_map_cpu(True)) and dynamic_map(True)[-1].item() == 1.0
