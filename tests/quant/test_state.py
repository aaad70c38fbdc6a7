"""QuantizedTensor: the bitsandbytes state-dict layout in both directions, bits per parameter,
all-zero tensors, and the errors bad input gets."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlora
from qlora.quant import QUANT_TYPES
from qlora.quant.blockwise import BLOCKSIZES
from qlora.quant.codebooks import code4

from .helpers import assert_bits_equal, bnb_dequantize_4bit

FIELDS = ("data", "absmax", "code", "offset", "nested_absmax", "nested_code")


@pytest.fixture(params=["fast", "reference"])
def kernel_path(request, monkeypatch):
    monkeypatch.setenv("QLORA_REFERENCE_KERNELS", "1" if request.param == "reference" else "0")
    return request.param


def _assert_same_quantized(a: qlora.QuantizedTensor, b: qlora.QuantizedTensor) -> None:
    meta = lambda q: (q.shape, q.dtype, q.quant_type, q.blocksize, q.double_quant)  # noqa: E731
    assert meta(a) == meta(b)
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert_bits_equal(x.reshape(-1), y.reshape(-1), name)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip_through_safetensors(quant_type, double_quant, tmp_path):
    w = torch.randn(33, 70, dtype=torch.bfloat16)
    q = qlora.quantize(w, quant_type, 128, double_quant)
    sd = qlora.to_state_dict(q, "layer.weight")
    nested = ["layer.weight.nested_absmax", "layer.weight.nested_quant_map"] if double_quant else []
    assert list(sd) == ["layer.weight", "layer.weight.absmax", "layer.weight.quant_map", *nested,
                        f"layer.weight.quant_state.bitsandbytes__{quant_type}"]
    meta = json.loads(bytes(sd[f"layer.weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
    extra = ["nested_blocksize", "nested_dtype", "nested_offset"] if double_quant else []
    assert list(meta) == ["quant_type", "blocksize", "dtype", "shape", *extra]
    assert meta["shape"] == [33, 70] and meta["dtype"] == "bfloat16" and meta["blocksize"] == 128
    save_file(sd, str(tmp_path / "q.safetensors"))
    q2 = qlora.from_state_dict(load_file(str(tmp_path / "q.safetensors")), "layer.weight")
    _assert_same_quantized(q, q2)
    assert_bits_equal(qlora.dequantize(q2), qlora.dequantize(q))


# ---- bitsandbytes interchange ----


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bnb_functional_state_dict_both_ways(kernel_path, quant_type, double_quant, dtype):
    F = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(64, 256).to(dtype)
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    theirs = {"w": packed, **{f"w.{k}": v for k, v in state.as_dict(packed=True).items()}}
    ours = qlora.to_state_dict(qlora.quantize(x, quant_type, 64, double_quant), "w")
    assert list(ours) == list(theirs)
    for key in ours:  # the same bytes, the JSON blob included
        assert_bits_equal(ours[key].reshape(-1), theirs[key].reshape(-1), key)
    w = bnb_dequantize_4bit(packed, state)  # its PyTorch definition: native CPU kernels differ by ISA
    assert_bits_equal(qlora.dequantize(qlora.from_state_dict(theirs, "w")), w, "theirs -> ours")
    back = F.QuantState.from_dict({k[2:]: v for k, v in ours.items() if k != "w"}, device=torch.device("cpu"))
    assert_bits_equal(bnb_dequantize_4bit(ours["w"], back), w, "ours -> theirs")


def test_bnb_linear4bit_state_dict_both_ways(kernel_path):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    theirs = bnb.nn.Linear4bit(256, 96, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # bitsandbytes quantizes on the move to a device
    w = bnb_dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    sd = theirs.state_dict()
    q = qlora.from_state_dict(sd, "weight")
    assert_bits_equal(qlora.dequantize(q), w, "bnb Linear4bit -> ours")
    _assert_same_quantized(q, qlora.quantize(linear.weight.detach(), "nf4", 64, double_quant=True))

    ours = qlora.to_state_dict(q, "weight")
    stats = {k[len("weight."):]: v for k, v in ours.items() if k != "weight"}
    back = bnb.nn.Linear4bit(256, 96, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    back.weight = bnb.nn.Params4bit.from_prequantized(ours["weight"], stats, requires_grad=False, device="cpu")
    assert_bits_equal(bnb_dequantize_4bit(back.weight.data, back.weight.quant_state), w, "ours -> bnb")


# ---- storage cost ----


@pytest.mark.parametrize("shape,blocksize,double_quant", [
    ((4096, 4096), 64, False), ((4096, 4096), 64, True), ((3, 5), 64, True), ((1, 4097), 256, True),
    ((1000, 1000), 4096, False), ((1, 1), 32, False),
])
def test_bits_per_parameter_from_stored_sizes(shape, blocksize, double_quant):
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    scale_bytes = blocks + 4 + 4 * -(-blocks // 256) if double_quant else 4 * blocks  # uint8 + offset + fp32 c1
    q = qlora.quantize(torch.ones(shape), "nf4", blocksize, double_quant)
    assert qlora.bits_per_parameter(q) == ((n + 1) // 2 + scale_bytes) * 8 / n
    if shape == (4096, 4096):  # the paper's figures: 4 + 32/64 = 4.5, 4 + 8/64 + 32/(64*256) ~= 4.127
        assert qlora.bits_per_parameter(q) == pytest.approx(4.127 if double_quant else 4.5, abs=5e-4)


# ---- zeros and bad input ----


# bof4/bof4s have no zero level (MSE does not ask for one): an all-zero block comes back as
# code x scale with scale 0 (or a DQ-rounded one), not as exact zeros; README says so
@pytest.mark.parametrize("quant_type", [t for t in QUANT_TYPES if 0.0 in code4(t).tolist()])
@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_tensor_dequantizes_to_exact_zeros(kernel_path, quant_type, double_quant):
    q = qlora.quantize(torch.zeros(10, 70, dtype=torch.float16), quant_type, 64, double_quant)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = qlora.dequantize(q, dtype)
        assert w.shape == (10, 70) and w.dtype == dtype
        assert bool((w.view(torch.int16 if dtype != torch.float32 else torch.int32) == 0).all())  # +0.0


def test_nan_and_inf_are_rejected(kernel_path):
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError,
                       match=r"contains NaN or Inf \(first in block 1, elements 64..127\); fix the weights"):
        qlora.quantize(w)
    w[1, 3] = float("-inf")
    with pytest.raises(ValueError, match=r"NaN or Inf \(first in block 2, elements 64..95\)"):
        qlora.quantize(w, blocksize=32)


@pytest.mark.parametrize("w,kwargs,message", [
    (torch.empty(0, 64), {}, r"cannot quantize an empty tensor \(shape \(0, 64\)\)"),
    (torch.arange(64), {}, r"cannot quantize a torch.int64 tensor: use float32, float16 or bfloat16"),
    (torch.randn(64, dtype=torch.float64), {}, r"cannot quantize a torch.float64 tensor"),
    (torch.randn(64), {"blocksize": 48}, r"blocksize 48 is not supported; choose one of \(32, 64, 128"),
    (torch.randn(64), {"blocksize": 8192}, r"blocksize 8192 is not supported"),
    (torch.randn(64), {"quant_type": "nf5"}, r"unknown quant_type 'nf5'; choose one of nf4, fp4, fp4_e3m0, int4"),
    (torch.full((4, 64), 3e38), {}, r"double quantization overflows float32.*double_quant=False"),
], ids=["empty", "int", "float64", "blocksize-48", "blocksize-8192", "quant-type", "dq-overflow"])
def test_bad_input_is_a_clear_value_error(kernel_path, w, kwargs, message):
    with pytest.raises(ValueError, match=message):
        qlora.quantize(w, **kwargs)


def test_huge_values_quantize_without_double_quant():
    w = torch.full((4, 64), 3e38)
    assert bool((qlora.dequantize(qlora.quantize(w, double_quant=False)) == w).all())


def test_bad_dequantize_dtype_and_state_dict():
    q = qlora.quantize(torch.randn(8, 64))
    with pytest.raises(ValueError, match="cannot dequantize to torch.int32"):
        qlora.dequantize(q, torch.int32)
    sd = qlora.to_state_dict(q, "w")
    with pytest.raises(ValueError, match=r"expected exactly one 'x.quant_state.bitsandbytes__<type>' key"):
        qlora.from_state_dict(sd, "x")
    sd["w.absmax"] = sd["w.absmax"][:-1]
    with pytest.raises(ValueError, match=r"'w.absmax': expected 8 block scales, got 7"):
        qlora.from_state_dict(sd, "w")


def test_every_blocksize_round_trips():
    w = torch.randn(3, 4099)
    for blocksize in BLOCKSIZES:
        q = qlora.quantize(w, "nf4", blocksize)
        assert qlora.dequantize(q).shape == w.shape
