"""The kernel library's test-only entry points: the llama step's bf16 output-head product and its exp
(softmax, SiLU). The package calls both only inside qlora_llama_step (csrc/decode_cpu.cpp, common.h);
the tests check them alone, against PyTorch and across builds."""

from __future__ import annotations

import ctypes

import torch


def _lib(k) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    k.lib.qlora_gemv_bf16.argtypes = [p, i64, i64, p, p, ctypes.c_int]
    k.lib.qlora_exp.argtypes = [p, i64]
    return k.lib


def gemv_bf16(k, w: torch.Tensor, x: torch.Tensor, round_bf16: bool = False) -> torch.Tensor:
    """w (n, k) bf16 · x (k,) bf16 -> (n,) fp32 (fp32 sums), single-threaded; `round_bf16`: the
    values rounded to bf16 (a bf16 linear's output), still stored as fp32."""
    n, dim = w.shape
    assert w.dtype == x.dtype == torch.bfloat16 and x.numel() == dim and w.is_contiguous()
    out, x = torch.empty(n, dtype=torch.float32), x.contiguous()
    _lib(k).qlora_gemv_bf16(w.data_ptr(), n, dim, x.data_ptr(), out.data_ptr(), int(round_bf16))
    return out


def exp_(k, x: torch.Tensor) -> torch.Tensor:
    """x = exp(x) in place for a contiguous fp32 tensor: common.h's polynomial (~1 ulp)."""
    assert x.dtype == torch.float32 and x.is_contiguous()
    _lib(k).qlora_exp(x.data_ptr(), x.numel())
    return x
