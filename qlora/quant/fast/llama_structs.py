"""ctypes mirrors of the one-token decode kernels' descriptions (csrc/decode.h, csrc/llama_cpu.cpp).

A description is raw pointers into tensors; each object here keeps the tensors it points into
alive (`keep`), including the ones it derives for the kernels (fp32 scales and bias, bf16 LoRA A
and B). Build it again if a weight changes: nothing here notices.
"""

from __future__ import annotations

import ctypes

import torch

from .quantize import _scale_args


class _DecodeLinear(ctypes.Structure):
    """struct QloraDecodeLinear of csrc/decode.h."""
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("packed", "absmax", "qabsmax", "nested_absmax", "code8", "code", "bias", "lora_a", "lora_b")]
    _fields_ += [("offset", ctypes.c_float), ("scaling", ctypes.c_float)]
    _fields_ += [(name, ctypes.c_int64) for name in ("nested_bs", "bs", "n", "k", "r")]


class DecodeLinears:
    """Linears that share one input, described for qlora_decode_linear: raw pointers to the 4-bit
    codes and scales, plus the tensors derived for the kernel (fp32 scales and bias, bf16 LoRA A
    and B), which this object keeps alive. Build it again if a weight changes."""

    def __init__(self, layers: list[dict]):
        self.keep: list[torch.Tensor] = []
        self.array = (_DecodeLinear * len(layers))(*(self._one(**layer) for layer in layers))
        self.k = layers[0]["shape"][1]
        self.n = sum(layer["shape"][0] for layer in layers)
        if any(layer["shape"][1] != self.k for layer in layers):
            raise ValueError("linears decoded together must share their input size")

    @staticmethod
    def supports(shape, blocksize: int) -> bool:
        """The kernel's layout condition: whole blocks per row, 64-weight steps per block."""
        return len(shape) == 2 and shape[1] % blocksize == 0 and blocksize % 64 == 0

    def _ptr(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        self.keep.append(t)
        return t.data_ptr()

    def _one(self, packed, absmax, code, blocksize, shape, nested=None, bias=None, lora_a=None, lora_b=None,
             scaling=0.0) -> _DecodeLinear:
        n, k = shape
        if not self.supports(shape, blocksize) or packed.dtype != torch.uint8 or packed.numel() * 2 != n * k:
            raise ValueError(f"4-bit weight {tuple(shape)} with blocksize {blocksize}: the decode kernel needs "
                             "in_features % blocksize == 0 and blocksize % 64 == 0")
        (a32, qa, nested_absmax, code8), offset, nested_bs = _scale_args(absmax, nested)
        r = 0 if lora_a is None else lora_a.shape[0]
        if r and (tuple(lora_a.shape) != (r, k) or tuple(lora_b.shape) != (n, r)):
            raise ValueError(f"LoRA A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not fit {tuple(shape)}")
        def bf16(t):
            return None if t is None else t.detach().to(torch.bfloat16).contiguous()

        return _DecodeLinear(
            self._ptr(packed.contiguous()), self._ptr(a32), self._ptr(qa), self._ptr(nested_absmax),
            self._ptr(code8), self._ptr(code.float().contiguous()),
            self._ptr(None if bias is None else bias.detach().float().contiguous()),
            self._ptr(bf16(lora_a)), self._ptr(None if lora_b is None else _blocked(bf16(lora_b))), offset,
            float(scaling), nested_bs, blocksize, n, k, r)


def _blocked(b: torch.Tensor) -> torch.Tensor:
    """LoRA B (n, r) as the kernel reads it: blocks of 16 rows, each transposed, (ceil(n/16), r, 16),
    zero rows past n."""
    n, r = b.shape
    padded = torch.zeros(-(-n // 16) * 16, r, dtype=b.dtype)
    padded[:n] = b
    return padded.view(-1, 16, r).transpose(1, 2).contiguous()


class _LlamaLayer(ctypes.Structure):
    """struct QloraLlamaLayer of csrc/llama_cpu.cpp."""
    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p)]
    _fields_ += [(name, ctypes.POINTER(_DecodeLinear)) for name in ("qkv", "o", "gate_up", "down")]
    _fields_ += [("keys", ctypes.c_void_p), ("values", ctypes.c_void_p)]


class _Llama(ctypes.Structure):
    """struct QloraLlama of csrc/llama_cpu.cpp."""
    _fields_ = [("layers", ctypes.POINTER(_LlamaLayer))]
    _fields_ += [(name, ctypes.c_void_p) for name in ("embed", "norm", "head")]
    _fields_ += [("head_4bit", ctypes.POINTER(_DecodeLinear))]
    _fields_ += [(name, ctypes.c_void_p) for name in ("head_q", "head_scale", "head_err", "cos", "sin")]
    _fields_ += [(name, ctypes.c_int64) for name in
                 ("n_layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "capacity")]
    _fields_ += [("eps", ctypes.c_float), ("scale", ctypes.c_float)]


def int8_screen(w: torch.Tensor, rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For argmax_gemv_bf16: w (n, k) as int8 q with per-row fp32 scales s = max|w[o]| / 127, and
    err[o] >= ||w[o] - s[o] q[o]||_2. In fp32, `rows` at a time: the residual as computed is off by
    at most 2^-16 s per element (one rounding of s·q, near w), the norm by far less than 1e-4."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale, err = torch.empty(n), torch.empty(n)
    for i in range(0, n, rows):
        block = w[i: i + rows].float()
        s = (block.abs().amax(1) / 127).clamp_min(1e-30)
        qi = (block / s[:, None]).round_().clamp_(-127, 127)
        q[i: i + rows] = qi.to(torch.int8)
        residual = block.sub_(qi.mul_(s[:, None])).norm(dim=1)
        err[i: i + rows] = residual * (1 + 1e-4) + s * (2 * k ** 0.5 * 2.0 ** -16)
        scale[i: i + rows] = s
    return q, scale, err


def block_keys(keys: torch.Tensor) -> torch.Tensor:
    """Keys (..., T, D) as the attention kernel stores them: blocks of 16 positions, each transposed,
    (..., ceil(T / 16), D, 16), zeros past T."""
    *lead, length, d = keys.shape
    padded = keys.new_zeros(*lead, -(-length // 16) * 16, d)
    padded[..., :length, :] = keys
    return padded.view(*lead, -1, 16, d).transpose(-1, -2).contiguous()


def unblock_keys(blocked: torch.Tensor, length: int) -> torch.Tensor:
    """block_keys' inverse: (..., blocks, D, 16) -> (..., length, D) (a copy)."""
    *lead, blocks, d, _ = blocked.shape
    return blocked.transpose(-1, -2).reshape(*lead, blocks * 16, d)[..., :length, :]


class Llama:
    """A llama-family model described for qlora_llama_step. `layers`: per layer (norm1, norm2,
    qkv, o, gate_up, down), norms bf16 (hidden,), the rest DecodeLinears; keys: bf16 (layers,
    kv_heads, capacity / 16, head_dim, 16) (block_keys' layout), values: bf16 (layers, kv_heads,
    capacity, head_dim); cos/sin: bf16 (capacity, head_dim); head: bf16 (vocab, hidden) or a
    DecodeLinears; screen: int8_screen(head) for greedy steps, or None."""

    def __init__(self, layers, keys, values, embed, norm, head, cos, sin, heads: int, eps: float, scale: float,
                 screen: tuple | None = None):
        n_layers, kv_heads, capacity, head_dim = values.shape
        bf16 = [embed, norm, cos, sin] + [t for layer in layers for t in layer[:2]]
        if any(t.dtype != torch.bfloat16 or not t.is_contiguous() for t in bf16):
            raise ValueError("embedding, norms and rotary tables must be contiguous bf16")
        if keys.dtype != torch.bfloat16 or values.dtype != torch.bfloat16 or not keys.is_contiguous() \
                or not values.is_contiguous() or capacity % 16 \
                or tuple(keys.shape) != (n_layers, kv_heads, capacity // 16, head_dim, 16):
            raise ValueError("keys and values must be contiguous bf16 (layers, kv_heads, capacity / 16, head_dim, "
                             "16) and (layers, kv_heads, capacity, head_dim), capacity a multiple of 16")
        if len(layers) != n_layers or tuple(cos.shape) != (capacity, head_dim) or cos.shape != sin.shape:
            raise ValueError("cache, layers and rotary tables disagree on the layer count, capacity or head dim")
        self.keep = [keys, values, embed, norm, head, cos, sin, layers, screen]
        self.vocab, self.capacity = embed.shape[0], capacity
        ptr = lambda d: ctypes.cast(ctypes.byref(d.array), ctypes.POINTER(_DecodeLinear))  # noqa: E731
        intermediate = layers[0][5].k
        self._layers = (_LlamaLayer * n_layers)(*(
            _LlamaLayer(n1.data_ptr(), n2.data_ptr(), ptr(qkv), ptr(o), ptr(gu), ptr(down),
                        keys[i].data_ptr(), values[i].data_ptr())
            for i, (n1, n2, qkv, o, gu, down) in enumerate(layers)))
        for i, (_, _, qkv, o, gu, down) in enumerate(layers):
            sizes = [len(qkv.array), len(o.array), len(gu.array), len(down.array)]
            if sizes != [3, 1, 2, 1] or qkv.n != (heads + 2 * kv_heads) * head_dim or o.k != heads * head_dim \
                    or gu.n != 2 * intermediate or down.k != intermediate:
                raise ValueError(f"layer {i}: projections do not fit {heads} heads, {kv_heads} kv heads of {head_dim}")
        head_bf16 = isinstance(head, torch.Tensor)
        if head_bf16 and (head.dtype != torch.bfloat16 or not head.is_contiguous() or head.shape != embed.shape):
            raise ValueError("the output head must be contiguous bf16 (vocab, hidden)")
        if screen is not None:
            q, s, err = screen
            if not head_bf16 or q.shape != head.shape or q.dtype != torch.int8 or s.shape != (head.shape[0],) \
                    or err.shape != s.shape:
                raise ValueError("the screen must be int8_screen(head) of a bf16 head")
        q, s, err = (None, None, None) if screen is None else (t.data_ptr() for t in screen)
        self.struct = _Llama(
            self._layers, embed.data_ptr(), norm.data_ptr(), head.data_ptr() if head_bf16 else None,
            None if head_bf16 else ptr(head), q, s, err, cos.data_ptr(), sin.data_ptr(),
            n_layers, embed.shape[1], heads, kv_heads, head_dim, intermediate, self.vocab, capacity, eps, scale)
