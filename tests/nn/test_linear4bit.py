import pytest
import torch

from qlora import dequantize
from qlora.nn import Linear4bit
from quant.helpers import bnb_dequantize_4bit  # tests/quant/helpers.py: the same bits on every CPU


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "fp4_e3m0", "int4"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_match_autograd_through_dequantized_weight(quant_type, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=bias)
    q = Linear4bit.from_linear(lin, quant_type=quant_type)
    x = torch.randn(2, 5, 96, requires_grad=True)
    y = q(x)
    (y * torch.arange(40.0)).sum().backward()
    w = dequantize(q.weight, torch.bfloat16).requires_grad_()
    x2 = x.detach().bfloat16().requires_grad_()
    y2 = torch.nn.functional.linear(x2, w, None if q.bias is None else q.bias)
    (y2.float() * torch.arange(40.0)).sum().backward()
    assert y.dtype == torch.float32  # output in the input's dtype, computed in bf16
    assert torch.equal(y, y2.float())
    assert torch.equal(x.grad, x2.grad.float())
    assert not any(p.requires_grad for p in q.parameters())


def test_backward_keeps_no_dequantized_weight_alive():
    q = Linear4bit.from_linear(torch.nn.Linear(64, 64))
    x = torch.randn(4, 64, requires_grad=True)
    y = q(x)
    saved = [t for t in (y.grad_fn.saved_tensors if hasattr(y.grad_fn, "saved_tensors") else ())]
    # the autograd node of the 4-bit matmul saves no tensor at all (the weight is re-dequantized)
    node = y.grad_fn
    while node is not None and "Matmul4bit" not in type(node).__name__:
        node = node.next_functions[0][0] if node.next_functions else None
    assert node is not None
    assert node.saved_tensors == ()
    assert saved == [] or all(t.numel() < 64 * 64 for t in saved)


def test_state_dict_round_trip_and_bnb_keys():
    q = Linear4bit.from_linear(torch.nn.Linear(64, 32))
    sd = q.state_dict()
    assert list(sd) == ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", "bias"]
    other = Linear4bit.from_linear(torch.nn.Linear(64, 32))
    other.load_state_dict(sd)
    assert torch.equal(other.dequantized_weight(), q.dequantized_weight())
    assert torch.equal(other.bias, q.bias)


def test_bitsandbytes_linear4bit_state_dict_loads_both_ways():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 48).to(torch.bfloat16)
    ref = bnb.nn.Linear4bit(128, 48, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu")  # quantizes
    if ref.weight.dtype != torch.uint8:
        ref.weight = bnb.nn.Params4bit(ref.weight.data, requires_grad=False, quant_type="nf4").to("cpu")
    theirs = ref.state_dict()
    ours = Linear4bit.from_linear(torch.nn.Linear(128, 48), compute_dtype=torch.bfloat16)
    ours.load_state_dict(theirs)
    expected = bnb_dequantize_4bit(ref.weight.data, ref.weight.quant_state)
    assert torch.equal(ours.dequantized_weight(expected.dtype), expected)
    # ours -> theirs
    mine = Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)
    sd = mine.state_dict()
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    state = bnb.functional.QuantState.from_dict(stats, device=torch.device("cpu"))
    got = bnb_dequantize_4bit(sd["weight"], state)
    assert torch.equal(got, mine.dequantized_weight(got.dtype))


def test_packed_bytes_unchanged_by_inference():
    q = Linear4bit.from_linear(torch.nn.Linear(64, 64))
    before = q.weight.data.clone()
    with torch.no_grad():
        for _ in range(3):
            q(torch.randn(1, 64))
    assert torch.equal(q.weight.data, before)


def test_gpt2_conv1d_transpose():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 64)  # (in=64, out=24); weight stored (in, out)
    q = Linear4bit.from_linear(conv, transpose=True, compute_dtype=torch.float32)
    x = torch.randn(20, 64)  # > DECODE_ROWS tokens: dequantize + F.linear, bit for bit
    ref = torch.nn.functional.linear(x, dequantize(q.weight, torch.float32), conv.bias)
    assert q(x).shape == conv(x).shape
    assert torch.equal(q(x), ref)
    assert (q(x) - conv(x)).abs().max() < 0.2
    torch.testing.assert_close(q(x[:3]), ref[:3])  # decode path: same weights, another summation order
