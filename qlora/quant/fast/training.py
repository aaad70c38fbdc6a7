"""Bindings for training ops (users: qlora/nn/fused.py, loss.py, dropout.py): RMSNorm and SwiGLU
forward and backward, cross-entropy rows, seeded dropout (csrc/fused_cpu.cpp, train_cpu.cpp,
dropout_cpu.cpp).
The callers check the inputs: contiguous CPU tensors of the shapes below, bf16 or fp32 (all of a call
the same; cross-entropy rows: bf16).
"""

from __future__ import annotations

import ctypes

import torch

from .quantize import _DTYPE_CODES


class TrainingOps:
    def __init__(self, lib: ctypes.CDLL):
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        lib.qlora_dropout.argtypes = [p, p, i64, i32, ctypes.c_uint32, f32, ctypes.c_uint32, i32]
        lib.qlora_rms_norm_forward.argtypes = [p, p, i64, i64, f32, p, p, i32, i32]
        lib.qlora_rms_norm_backward.argtypes = [p, p, p, p, i64, i64, p, i32, i32]
        lib.qlora_swiglu_forward.argtypes = [p, p, p, i64, i32, i32]
        lib.qlora_swiglu_backward.argtypes = [p, p, p, p, p, i64, i32, i32]
        lib.qlora_cross_entropy_rows.argtypes = [p, i64, i64, p, p, i32, i32]
        self._lib = lib

    def rms_norm_forward(self, x: torch.Tensor, w: torch.Tensor, eps: float):
        """x (rows, d), w (d) -> (y (rows, d), rstd (rows,) fp32)."""
        rows, d = x.shape
        y, rstd = torch.empty_like(x), torch.empty(rows, dtype=torch.float32)
        self._lib.qlora_rms_norm_forward(x.data_ptr(), w.data_ptr(), rows, d, eps, y.data_ptr(), rstd.data_ptr(),
                                         _DTYPE_CODES[x.dtype], torch.get_num_threads())
        return y, rstd

    def rms_norm_backward(self, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor):
        rows, d = x.shape
        dx = torch.empty_like(x)
        self._lib.qlora_rms_norm_backward(dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr(), rows, d,
                                          dx.data_ptr(), _DTYPE_CODES[x.dtype], torch.get_num_threads())
        return dx

    def swiglu_forward(self, g: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.empty_like(g) if out is None else out
        self._lib.qlora_swiglu_forward(g.data_ptr(), u.data_ptr(), h.data_ptr(), g.numel(), _DTYPE_CODES[g.dtype],
                                       torch.get_num_threads())
        return h

    def swiglu_backward(self, dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, out=None):
        """(dg, du), into `out` = (dg, du) if given (contiguous, like g; may be g and u themselves)."""
        dg, du = (torch.empty_like(g), torch.empty_like(u)) if out is None else out
        self._lib.qlora_swiglu_backward(dh.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(),
                                        g.numel(), _DTYPE_CODES[g.dtype], torch.get_num_threads())
        return dg, du

    def cross_entropy_rows(self, z: torch.Tensor, targets: torch.Tensor, grad: bool) -> torch.Tensor:
        """Loss per row (fp32) of contiguous bf16 logits z (rows, v) at int64 targets; with grad, z is
        overwritten by softmax(z) - onehot(targets) in bf16."""
        rows, v = z.shape
        loss = torch.empty(rows, dtype=torch.float32)
        self._lib.qlora_cross_entropy_rows(z.data_ptr(), rows, v, targets.data_ptr(), loss.data_ptr(), int(grad),
                                           torch.get_num_threads())
        return loss

    def dropout(self, x: torch.Tensor, threshold: int, scale: float, seed: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """where(mix(i, seed) >= threshold, x * scale, 0) for contiguous fp32/bf16 x (qlora/nn/dropout.py),
        into `out` if given (contiguous, like x; x itself works)."""
        out = torch.empty_like(x) if out is None else out
        self._lib.qlora_dropout(x.data_ptr(), out.data_ptr(), x.numel(), _DTYPE_CODES[x.dtype], threshold, scale, seed,
                                torch.get_num_threads())
        return out
