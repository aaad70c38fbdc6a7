"""Bindings for the llama decode step (user: qlora/decoder.py): the one-token 4-bit products with
their LoRA branch, one query row's attention, and the whole step (csrc/decode_cpu.cpp,
attention_cpu.cpp, llama_cpu.cpp). The models and weights they take are described in llama_structs.py.
"""

from __future__ import annotations

import ctypes
import os

import torch


def default_decode_threads() -> int:
    """$QLORA_DECODE_THREADS, else 2 where this process may use two CPUs, else 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return int(os.environ.get("QLORA_DECODE_THREADS") or min(2, cpus))


class LlamaOps:
    """The decode step's entry points (CPU tensors only)."""

    def __init__(self, lib: ctypes.CDLL):
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        lib.qlora_decode_linear.argtypes = [p, i64, p, p]
        lib.qlora_decode_attention.argtypes = [p, p, p, i64, i64, i64, i64, i64, f32, p]
        lib.qlora_llama_step.argtypes = [p, i64, i64, p]
        lib.qlora_llama_step.restype = i32
        lib.qlora_llama_greedy.argtypes = [p, i64, i64]
        lib.qlora_llama_greedy.restype = i64
        lib.qlora_argmax_gemv_bf16.argtypes = [p, p, p, p, i64, i64, p]
        lib.qlora_argmax_gemv_bf16.restype = i64
        lib.qlora_decode_threads.argtypes = [i32]
        self._lib = lib
        self.decode_threads(default_decode_threads())

    def decode_threads(self, n: int) -> None:
        """1: decode products on the calling thread only; 2: split by rows with one helper thread
        (decode_cpu.cpp; results are identical). The library starts with default_decode_threads()."""
        self._lib.qlora_decode_threads(n)

    def decode_linears(self, specs, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (fp32, the specs' summed n) = each linear of `specs` (a llama_structs.DecodeLinears)
        applied to x (bf16, k), outputs one after another; see csrc/decode_cpu.cpp. One token only."""
        if x.dtype != torch.bfloat16 or not x.is_contiguous() or x.numel() != specs.k:
            raise ValueError(f"x must be a contiguous bfloat16 vector of {specs.k}, got {x.dtype} {tuple(x.shape)}")
        if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != specs.n:
            raise ValueError(f"out must be a contiguous float32 vector of {specs.n}, "
                             f"got {out.dtype} {tuple(out.shape)}")
        self._lib.qlora_decode_linear(ctypes.byref(specs.array), len(specs.array), x.data_ptr(), out.data_ptr())
        return out

    def decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int,
                         scale: float, out: torch.Tensor) -> torch.Tensor:
        """softmax(scale · q·Kᵀ)·V for one query row in fp32: q (H, D) fp32; keys (KV, capacity / 16,
        D, 16) (llama_structs.block_keys' layout) and values (KV, capacity, D) bf16, contiguous, the first
        `length` positions used; kv head of head h = h // (H // KV)."""
        heads, d = q.shape
        kv, capacity, dv = values.shape
        if not (q.dtype == out.dtype == torch.float32 and keys.dtype == values.dtype == torch.bfloat16 and dv == d
                and tuple(keys.shape) == (kv, capacity // 16, d, 16) and capacity % 16 == 0 and heads % kv == 0
                and 0 < length <= capacity and all(t.is_contiguous() for t in (q, keys, values, out))
                and out.shape == q.shape):
            raise ValueError("decode_attention: expected contiguous fp32 q and out (H, D), bf16 keys "
                             f"(KV, capacity / 16, D, 16) and values (KV, capacity, D); got {tuple(q.shape)}, "
                             f"{tuple(keys.shape)}, "
                             f"{tuple(values.shape)}, length {length}")
        self._lib.qlora_decode_attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(), capacity, length,
                                         heads, kv, d, scale, out.data_ptr())
        return out

    def llama_step(self, model, token: int, pos: int, logits: torch.Tensor) -> torch.Tensor:
        """One decode step of a described llama model (a llama_structs.Llama): logits (vocab,) fp32 holding
        bf16 values; the keys and values of `pos` land in its cache (csrc/llama_cpu.cpp)."""
        if logits.dtype != torch.float32 or not logits.is_contiguous() or logits.numel() != model.vocab:
            raise ValueError(f"logits must be a contiguous float32 vector of {model.vocab}")
        if self._lib.qlora_llama_step(ctypes.byref(model.struct), token, pos, logits.data_ptr()) != 0:
            raise ValueError(f"token {token} or position {pos} out of range (vocab {model.vocab}, "
                             f"capacity {model.capacity})")
        return logits

    def llama_greedy(self, model, token: int, pos: int) -> int:
        """`llama_step` for greedy decoding: the argmax of its logits (lowest index on a tie), found
        through the model's int8 head screen if it has one."""
        best = self._lib.qlora_llama_greedy(ctypes.byref(model.struct), token, pos)
        if best < 0:
            raise ValueError(f"token {token} or position {pos} out of range (vocab {model.vocab}, "
                             f"capacity {model.capacity})")
        return best

    def argmax_gemv_bf16(self, w: torch.Tensor, screen, x: torch.Tensor) -> int:
        """argmax over o of bf16(w[o] · x), lowest index on a tie, reading w only where the int8
        screen (llama_structs.int8_screen(w)) cannot rule a row out."""
        q, scale, err = screen
        n, k = w.shape
        if w.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or x.numel() != k or not w.is_contiguous() \
                or q.shape != w.shape or scale.shape != (n,) or err.shape != (n,):
            raise ValueError("argmax_gemv_bf16: expected bf16 w (n, k), x (k,) and int8_screen(w)")
        x = x.contiguous()
        return self._lib.qlora_argmax_gemv_bf16(w.data_ptr(), q.data_ptr(), scale.data_ptr(), err.data_ptr(), n, k,
                                                x.data_ptr())
