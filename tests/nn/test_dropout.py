"""Seeded dropout (nn/dropout.py): the compiled kernel equals the hashed-mask reference bit for
bit, the mask keeps 1-p of the elements at the right scale, and backward applies the same mask."""

import pytest
import torch

from qlora.nn import dropout as D


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _fmix32_python(i: int, seed: int) -> int:
    """MurmurHash3's finaliser in plain Python ints: an independent statement of the hash."""
    h = ((i * 0x9E3779B9) & 0xFFFFFFFF) ^ seed
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_keep_mask_is_fmix32_over_the_index():
    seed, p = 0x5EED1234, 0.3
    expected = [_fmix32_python(i, seed) >= round(p * 2**32) for i in range(4096)]
    assert D.keep_mask(4096, seed, p).tolist() == expected
    assert D.threshold(0.0) == 0 and D.threshold(0.25) == 2**30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_reference_bitwise(k, dtype, monkeypatch):
    """Every build (conftest's k: native, avx2, portable), vector body and ragged tail. (No NaN: torch's
    own bf16 rounding writes 0xffff for it in vectorized ops and 0x7fc0 in scalar ones.)"""
    for n, p, seed in ((3 * 1000 * 37, 0.1, 987654321), (17, 0.5, 3), ((1 << 16) + 33, 0.3, 0xFFFFFFFF)):
        x = torch.randn(n, dtype=dtype)
        x[:4] = torch.tensor([float("inf"), -float("inf"), -0.0, 1e-40])
        fast_out = k.train.dropout(x, D.threshold(p), 1 / (1 - p), seed)
        monkeypatch.setenv("QLORA_REFERENCE_KERNELS", "1")
        ref_out = D.apply(x, p, seed)
        monkeypatch.delenv("QLORA_REFERENCE_KERNELS")
        assert torch.equal(_bits(fast_out), _bits(ref_out)), (n, p)


def test_mask_rate_scale_and_seed():
    x = torch.ones(200_000)
    out = D.apply(x, 0.2, 7)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.005
    assert torch.equal(out[kept], torch.full((int(kept.sum()),), 1 / 0.8))
    assert torch.equal(D.apply(x, 0.2, 7), out)  # same seed, same mask
    assert not torch.equal(D.apply(x, 0.2, 8) != 0, kept)


def test_backward_reapplies_the_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 48, requires_grad=True)
    y = D.dropout(x, 0.3)
    g = torch.randn_like(y)
    y.backward(g)
    mask = y != 0
    torch.testing.assert_close(x.grad, torch.where(mask, g / 0.7, torch.zeros(())))


def test_identity_when_not_training_or_p_zero():
    x = torch.randn(5, 5)
    assert D.dropout(x, 0.0) is x and D.dropout(x, 0.5, training=False) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        D.threshold(1.0)


def test_torch_seed_governs_the_mask():
    x = torch.ones(1000)
    torch.manual_seed(3)
    a = D.dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(D.dropout(x, 0.5), a)
