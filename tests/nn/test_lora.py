import math

import pytest
import torch

from qlora.nn import Linear4bit, LoRALinear


def test_step0_equals_base_and_scaling():
    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(64, 32))
    layer = LoRALinear(base, r=8, alpha=16)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), base(x))
    assert layer.scaling == 2.0
    assert LoRALinear(base, r=16, alpha=16, rslora=True).scaling == 16 / math.sqrt(16)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert layer.lora_A.weight.abs().max() <= bound


def test_only_lora_params_train():
    base = torch.nn.Linear(32, 16)
    layer = LoRALinear(base, r=4, alpha=8)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}


def test_forward_formula_and_gradients():
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 16)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 32)
    expected = base(x) + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected)
    layer(x).sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert base.weight.grad is None


@pytest.mark.parametrize("four_bit", [True, False])
def test_merge_is_inverse_of_wrapping(four_bit):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    base = Linear4bit.from_linear(lin, compute_dtype=torch.float32) if four_bit else lin
    layer = LoRALinear(base, r=8, alpha=16)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    merged = layer.merge(torch.float32)
    x = torch.randn(4, 64)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    assert isinstance(merged, torch.nn.Linear) and not merged.weight.requires_grad


def test_nested_adapters_merge():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    inner = LoRALinear(lin, r=2, alpha=2)
    outer = LoRALinear(inner, r=2, alpha=4)
    for layer in (inner, outer):
        torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16)
    torch.testing.assert_close(outer.merge(torch.float32)(x), outer(x), rtol=1e-5, atol=1e-5)


def test_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(torch.nn.Linear(4, 4), r=0)


def _composed(layer: LoRALinear, x: torch.Tensor, seed: int | None) -> torch.Tensor:
    """The LoRA formula written out under autograd: dequantized base + s·B·A·drop(x)."""
    from qlora.nn import dropout as D

    base = layer.base
    w = base.dequantized_weight(x.dtype)
    xd = D._SeededDropout.apply(x, layer.dropout, seed) if seed is not None else x
    a, b = layer.lora_A.weight.to(x.dtype), layer.lora_B.weight.to(x.dtype)
    return torch.nn.functional.linear(x, w, base.bias) + (xd @ a.t() @ b.t()) * layer.scaling


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fused_4bit_training_path_matches_the_formula(dtype, tol, p):
    """LoRALinear over Linear4bit trains through one autograd function (_LoRA4bit): output and
    gradients for x, A and B equal the composed formula with the same dropout mask."""
    from qlora.nn import dropout as D

    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(128, 96), compute_dtype=dtype)
    layer = LoRALinear(base, r=8, alpha=16, dropout=p)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 96, dtype=dtype)
    results = []
    for fused in (True, False):
        torch.manual_seed(1)
        y = layer(x) if fused else _composed(layer, x, D.draw_seed() if p > 0 else None)
        y.backward(g)
        results.append([y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad])
        x.grad = None
        layer.zero_grad()
    assert layer.lora_A.weight.dtype == torch.float32  # fp32 parameters, fp32 gradients
    assert results[0][2].dtype == torch.float32 and results[0][3].dtype == torch.float32
    for fused, composed in zip(*results):
        rel = ((fused.float() - composed.float()).norm() / composed.float().norm()).item()
        assert rel < tol, rel


def test_eval_mode_disables_dropout():
    torch.manual_seed(0)
    layer = LoRALinear(Linear4bit.from_linear(torch.nn.Linear(32, 16)), r=4, alpha=8, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_few_token_no_grad_path_is_the_fp32_formula():
    """Generation (no grad, <= DECODE_ROWS tokens on CPU): base from the 4-bit codes and LoRA from
    the fp32 adapter weights, all in fp32, one cast to the activation dtype at the end."""
    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(128, 48), compute_dtype=torch.bfloat16)
    layer = LoRALinear(base, r=8, alpha=16, dropout=0.1).eval()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(1, 2, 128, dtype=torch.bfloat16)
    w = base.dequantized_weight(torch.float32)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expected = x.float() @ w.t() + base.bias.float() + 2.0 * (x.float() @ a.t() @ b.t())
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y, expected.to(torch.bfloat16), rtol=0, atol=0.02)


def _pair(base, dropout=0.0):
    """(fp32 layer, bf16 layer) over `base` holding the same bf16-representable A and B."""
    torch.manual_seed(0)
    fp32 = LoRALinear(base, r=8, alpha=16, dropout=dropout)
    torch.nn.init.normal_(fp32.lora_B.weight)
    bf16 = LoRALinear(base, r=8, alpha=16, dropout=dropout, dtype=torch.bfloat16)
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            w = getattr(fp32, name).weight
            w.copy_(w.bfloat16())
            getattr(bf16, name).weight.copy_(w)
    return fp32, bf16


def test_bf16_init_is_the_fp32_init_rounded():
    base = Linear4bit.from_linear(torch.nn.Linear(576, 192))
    torch.manual_seed(0)
    fp32 = LoRALinear(base, r=64, alpha=16)
    after_fp32 = torch.rand(4)
    torch.manual_seed(0)
    bf16 = LoRALinear(base, r=64, alpha=16, dtype=torch.bfloat16)
    assert bf16.lora_A.weight.dtype == bf16.lora_B.weight.dtype == torch.bfloat16
    assert torch.equal(bf16.lora_A.weight, fp32.lora_A.weight.bfloat16())
    assert torch.count_nonzero(bf16.lora_B.weight) == 0
    assert torch.equal(torch.rand(4), after_fp32)  # the same random draws were consumed


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_bf16_lora_training_path_is_the_fp32_path_with_rounded_weights(p):
    """The product is formed in the bf16 compute dtype either way, so bf16 A and B give the fp32
    layer's output bit for bit when it holds the same (rounded) values; their gradients are the
    fp32 layer's, which are bf16 products themselves, without the widening."""
    base = Linear4bit.from_linear(torch.nn.Linear(128, 96), compute_dtype=torch.bfloat16)
    fp32, bf16 = _pair(base, dropout=p)
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 5, 96, dtype=torch.bfloat16)
    results = []
    for layer in (fp32, bf16):
        torch.manual_seed(1)  # the same dropout seed for both
        y = layer(x)
        y.backward(g)
        results.append((y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad))
        x.grad = None
    (y32, gx32, ga32, gb32), (y16, gx16, ga16, gb16) = results
    assert ga16.dtype == gb16.dtype == torch.bfloat16 and ga32.dtype == torch.float32
    assert torch.equal(y16, y32) and torch.equal(gx16, gx32)
    assert torch.equal(ga16.float(), ga32) and torch.equal(gb16.float(), gb32)


def test_bf16_lora_no_grad_and_16bit_base_paths_equal_fp32_with_rounded_weights():
    base4 = Linear4bit.from_linear(torch.nn.Linear(128, 48), compute_dtype=torch.bfloat16)
    base16 = torch.nn.Linear(128, 48).to(torch.bfloat16)
    x_decode = torch.randn(1, 2, 128, dtype=torch.bfloat16)  # the fp32 few-token path
    x_prefill = torch.randn(2, 40, 128, dtype=torch.bfloat16)  # the 4-bit no-grad path
    for base, x in ((base4, x_decode), (base4, x_prefill), (base16, x_prefill)):
        fp32, bf16 = (m.eval() for m in _pair(base))
        with torch.no_grad():
            assert torch.equal(bf16(x), fp32(x))
    fp32, bf16 = _pair(base16)
    y32, y16 = fp32(x_prefill), bf16(x_prefill)  # 16-bit base with grad: plain autograd
    assert torch.equal(y16, y32)
    y32.sum().backward()
    y16.sum().backward()
    assert torch.equal(bf16.lora_A.weight.grad.float(), fp32.lora_A.weight.grad)
