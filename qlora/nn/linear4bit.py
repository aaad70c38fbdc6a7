"""Linear4bit: a frozen linear layer whose weight lives as 4-bit codes (QLoRA paper, eq. 5).

    Y = X · doubleDequant(c1, c2, W_4bit)^T + b     computed in the compute dtype (bf16)

The custom autograd function dequantizes in forward and *again* in backward, saves nothing but
a reference to the module, and returns a gradient for the input only: the 4-bit weight is frozen,
so no dequantized copy stays alive between forward and backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from ..quant import QuantizedTensor, kernels
from ..quant.spec import DEFAULT

# Scratch buffers per (use, dtype, device), each sized to the largest request seen: every layer
# dequantizes into the "weight" one right before its matmul (and qlora.nn.lora puts its transient
# dropout and SwiGLU outputs in others). Safe because nothing keeps what is written there (the
# autograd functions save no such tensor), and it saves an allocation and its page faults per call:
# tensors above glibc's fixed mmap threshold (qlora/memory/allocator.py) each get fresh pages.
_SCRATCH: dict = {}
# QuantizedTensor fields held as Parameters (see Linear4bit.weight)
_QFIELDS = ("data", "absmax", "code", "offset", "nested_absmax", "nested_code")
# Up to this many rows (tokens) a no-grad forward on CPU multiplies by the 4-bit codes directly
# (kernels.matmul_4bit); longer inputs (prefill, scoring) dequantize once and use a bf16 matmul.
# Measured on a 1536x576 weight, one thread: 358 vs 567 us at 1 row, 939 vs 1202 at 8, 1639 vs
# 1430 at 16 (fp32 FMAs against AVX512-BF16 dot products: the codes win while reading dominates).
DECODE_ROWS = 8


def scratch(shape, dtype: torch.dtype, device: torch.device, use: str = "weight") -> torch.Tensor:
    """A transient tensor of `shape` in the buffer for `use`: valid until the next request for `use`."""
    n = math.prod(shape)
    buf = _SCRATCH.get((use, dtype, device))
    if buf is None or buf.numel() < n:
        buf = _SCRATCH[(use, dtype, device)] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


class _Matmul4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Linear4bit", bias: torch.Tensor | None):
        ctx.layer = layer
        return F.linear(x, layer.transient_weight(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # dL/dx = dL/dy · W   (W dequantized again: (out, in))
        grad_x = grad_out @ ctx.layer.transient_weight(grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class Linear4bit(nn.Module):
    """Frozen 4-bit linear layer. `weight` is a QuantizedTensor (a view of the frozen parameters
    below), not a Parameter."""

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None = None, compute_dtype=torch.bfloat16):
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight, got shape {tuple(qweight.shape)}")
        self.weight = qweight
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype = compute_dtype
        bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.register_parameter("bias", bias)

    # The QuantizedTensor's tensors are registered as frozen Parameters `weight_<field>`, so that
    # .to(device), parameter counts and FSDP2 sharding (distributed.shard_base) see the codes and
    # scales like any weight; the non-tensor fields live in `_qmeta`. `weight` rebuilds the
    # QuantizedTensor from whatever Parameters are registered now (FSDP2 swaps them between sharded
    # and gathered around each forward and backward), so nothing here caches them.
    @property
    def weight(self) -> QuantizedTensor:
        p = self._parameters
        shape, dtype, quant_type, blocksize = self._qmeta
        return QuantizedTensor(p["weight_data"], p["weight_absmax"], shape, dtype, quant_type, blocksize,
                               p["weight_code"], p["weight_offset"], p["weight_nested_absmax"], p["weight_nested_code"])

    @weight.setter
    def weight(self, q: QuantizedTensor) -> None:
        for field in _QFIELDS:
            t = getattr(q, field)
            self.register_parameter("weight_" + field, None if t is None else nn.Parameter(t, requires_grad=False))
        self._qmeta = (q.shape, q.dtype, q.quant_type, q.blocksize)

    @classmethod
    def from_linear(cls, linear: nn.Module, quant_type=DEFAULT.quant_type, blocksize=DEFAULT.blocksize,
                    double_quant=DEFAULT.double_quant, compute_dtype=torch.bfloat16, transpose=False) -> "Linear4bit":
        """Quantize an nn.Linear (or a GPT-2 Conv1D with transpose=True: its weight is (in, out))."""
        w = linear.weight.detach()
        w = w.t().contiguous() if transpose else w
        return cls(quant.quantize(w, quant_type, blocksize, double_quant), linear.bias, compute_dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh dequantized copy (out, in) the caller may keep (merge, export)."""
        return quant.dequantize(self.weight, dtype or self.compute_dtype)

    def transient_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in the shared scratch buffer: valid until the next layer's call."""
        q = self.weight
        out = scratch(q.shape, dtype, q.data.device)
        return kernels.dequantize_4bit_into(out, q.data, q.absmax, q.code, q.blocksize, q.nested)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = self.bias
        if torch.is_grad_enabled() and x.requires_grad:
            y = _Matmul4bit.apply(x, self, bias)
        elif self.decodes(x):
            y = self.decode_fp32(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.transient_weight(x.dtype), bias)
        return y.to(out_dtype)

    def decodes(self, x: torch.Tensor) -> bool:
        """Whether a no-grad forward of x takes the few-token path (decode_fp32)."""
        return x.numel() <= DECODE_ROWS * self.in_features and x.device.type == "cpu"

    def decode_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, out) fp32 for x (rows, in), few rows (generation): multiplies by the 4-bit codes
        directly (fp32 weights and accumulation), reading the weight once instead of writing and
        re-reading a 16-bit copy. Bias included."""
        q = self.weight
        y = kernels.matmul_4bit(x, q.data, q.absmax, q.code, q.blocksize, q.shape, q.nested)
        if self.bias is not None:
            y += self.bias
        return y

    def extra_repr(self) -> str:
        q = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, quant_type={q.quant_type}, "
                f"blocksize={q.blocksize}, double_quant={q.double_quant}, compute_dtype={self.compute_dtype}")

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() move the codes and scales too; dtype casts (model.to(bfloat16),
        # .half()) never touch them: they are a storage format, not values.
        quant = {n: self._parameters.pop(n) for n in [f"weight_{f}" for f in _QFIELDS]}
        super()._apply(fn, recurse)
        data = quant["weight_data"]
        device = fn(torch.empty(0, dtype=torch.uint8, device=data.device)).device
        for name, p in quant.items():
            moved = p is not None and p.device != device
            self._parameters[name] = nn.Parameter(p.data.to(device), requires_grad=False) if moved else p
        return self

    # bitsandbytes layout: weight, weight.absmax, weight.quant_map, [weight.nested_*],
    # weight.quant_state.bitsandbytes__<type>, bias
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for k, v in quant.to_state_dict(self.weight, prefix + "weight").items():
            destination[k] = v
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {k: v for k, v in state_dict.items() if k.startswith(prefix + "weight")}
        if not own:
            missing_keys.append(prefix + "weight")
        else:
            q = quant.from_state_dict(own, prefix + "weight")
            if tuple(q.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight: shape {tuple(q.shape)} != {(self.out_features, self.in_features)}")
            else:
                self.weight = q.to(self.weight_data.device)
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            else:
                missing_keys.append(prefix + "bias")
