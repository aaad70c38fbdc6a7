"""One-token decode steps of our own for llama-family models, over the HF modules' weights.

At batch 1 a token of SmolLM2-135M is ~1,000 tiny ops. Through transformers' forward, its per-layer
Python (cache objects, masks, keyword plumbing) and bf16 SDPA on one query row cost more than the
weights' arithmetic. Here the whole step is one compiled call (csrc/llama_cpu.cpp): per layer the
4-bit codes and the LoRA branch of each projection in one pass (csrc/decode_cpu.cpp), the rest on
one row; keys and values go to a cache allocated once for the whole generation.

The arithmetic is LlamaDecoderLayer's in bf16, rounding to bf16 at the same points (norm outputs,
each projection, rotary, activations, residual adds, logits), with three differences:
  - attention runs in fp32 (over the same bf16 keys and values; bf16 SDPA on one query row is
    4-10x slower on CPU, and no more exact);
  - 4-bit weights and LoRA products are summed in another order (fp32 sums either way);
  - LoRA A and B are used as bf16 copies, as the training forward uses them (qlora/nn/lora.py);
    the fp32 product A·x enters B in full.
`Decoder.reference_step` is the same step in PyTorch ops, readable, and the tests' reference. Logits
match the model's own forward to a tolerance, not bit for bit (tests/test_decoder.py): the same
distance as between qlora's fused 4-bit kernel and dequantize-then-matmul.

A model loaded in fp32 (`--compute-dtype auto` on a CPU without native bf16) decodes through the
same step: the 4-bit codes are read as they are, its embeddings, norms and head are used as bf16
copies made once per plan, and the prompt's fp32 keys and values enter the bf16 cache. A token's
products still sum in fp32; activations are rounded to bf16 between ops, so the logits sit within
bf16 rounding of the fp32 forward (tested) — and a token costs what it costs a bf16 model.

Prefill stays the model's forward (many tokens: its matmuls are the right tool); its cache is
copied into ours. `decoder()` returns None for anything this does not cover, and generate.py keeps
using the model's own forward; QLORA_DECODE=model forces that everywhere (debugging, comparisons).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .nn import Linear4bit, LoRALinear
from .quant import kernels
from .quant.fast.llama_structs import DecodeLinears, Llama, block_keys, int8_screen, unblock_keys

_ARCHS = ("llama",)
_ROPE_TYPES = ("default", "linear", "llama3")  # inv_freq fixed at init ("dynamic" changes with length)
_DTYPES = (torch.bfloat16, torch.float32)  # compute dtypes decoded (an fp32 model through bf16 copies)


class Plan:
    """What a decode step needs from the weights, prepared once (bf16 LoRA copies, kernel
    descriptions). Rebuilt when `key(model)` changes: another adapter, weights modified in place."""

    def __init__(self, model):
        cfg, body = model.config, model.model
        self.key = key(model)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = 1 / math.sqrt(self.head_dim)  # LlamaAttention.scaling
        self.eps = float(body.norm.variance_epsilon)
        bf16 = _Bf16Copies()  # an fp32 model's embeddings, norms and head as bf16 (a bf16 model's as they are)
        self.embed, self.norm = bf16(body.embed_tokens.weight), bf16(body.norm.weight)
        self.rotary = body.rotary_emb
        head = model.lm_head
        self.head = DecodeLinears([_spec(head)]) if isinstance(head, Linear4bit) else bf16(head.weight)
        self.screen = _head_screen(model, head.weight, self.head) if isinstance(self.head, torch.Tensor) else None
        self.layers = []  # per layer: (norm1, norm2, qkv, o, gate_up, down)
        for layer in body.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((bf16(layer.input_layernorm.weight), bf16(layer.post_attention_layernorm.weight),
                                DecodeLinears([_spec(a.q_proj), _spec(a.k_proj), _spec(a.v_proj)]),
                                DecodeLinears([_spec(a.o_proj)]), DecodeLinears([_spec(m.gate_proj), _spec(m.up_proj)]),
                                DecodeLinears([_spec(m.down_proj)])))
        self.intermediate = self.layers[0][5].k


class Decoder:
    """One generation: the KV cache and the position. bf16 as the model's keys and values are;
    values (layers, kv heads, capacity, head dim), keys in blocks of 16 positions, transposed
    (llama_structs.block_keys), for the kernel."""

    def __init__(self, plan: Plan, capacity: int):
        p = plan
        capacity = -(-capacity // 16) * 16
        self.plan, self.capacity, self.pos = plan, capacity, 0
        self.keys = torch.zeros(len(p.layers), p.kv_heads, capacity // 16, p.head_dim, 16, dtype=torch.bfloat16)
        self.values = torch.zeros(len(p.layers), p.kv_heads, capacity, p.head_dim, dtype=torch.bfloat16)
        # the rotary module's own cos/sin (bf16) for every position, computed once
        cos, sin = p.rotary(p.embed[:1].unsqueeze(0), torch.arange(capacity).unsqueeze(0))
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        self.kernels = kernels.cpu_kernels(p.embed)
        self.model = Llama(p.layers, self.keys, self.values, p.embed, p.norm, p.head, self.cos, self.sin,
                           p.heads, p.eps, p.scale, p.screen)
        self.logits = torch.empty(p.embed.shape[0])

    def load(self, cache, length: int, row: int = 0) -> None:
        """Take the prompt's keys and values from the model's own cache (a transformers Cache; `row`:
        which sequence of a batched prefill)."""
        for i, layer in enumerate(cache.layers):
            blocked = block_keys(layer.keys[row, :, :length])
            self.keys[i, :, : blocked.shape[1]] = blocked
            self.values[i, :, :length] = layer.values[row, :, :length]
        self.pos = length

    def step(self, token: int) -> torch.Tensor:
        """Logits (vocab,) for the token after `token`, which goes in at the current position: fp32
        holding bf16 values (the model's logits are bf16; argmax over fp32 is faster). The tensor is
        reused by the next step."""
        self.kernels.llama.llama_step(self.model, token, self.pos, self.logits)
        self.pos += 1
        return self.logits

    def greedy(self, token: int) -> int:
        """The step for greedy decoding: the next token, int(step(token).argmax()) without the logits
        (exact: the int8 screen of the head only skips rows that cannot win)."""
        best = self.kernels.llama.llama_greedy(self.model, token, self.pos)
        self.pos += 1
        return best

    def reference_step(self, token: int) -> torch.Tensor:
        """`step` in PyTorch ops: the definition the compiled step is tested against."""
        p, k, pos = self.plan, self.kernels, self.pos
        h = p.embed[token]
        cos, sin = self.cos[pos], self.sin[pos]
        nq, nkv, d = p.heads * p.head_dim, p.kv_heads * p.head_dim, p.head_dim
        for i, (norm1, norm2, qkv_proj, o_proj, gate_up_proj, down_proj) in enumerate(p.layers):
            qkv = _linear(k, qkv_proj, _rms_norm(h, norm1, p.eps))
            qk = _rotary(qkv[: nq + nkv].view(-1, d), cos, sin)  # q heads, then k heads
            self.keys[i, :, pos // 16, :, pos % 16] = qk[p.heads:]
            self.values[i, :, pos] = qkv[nq + nkv:].view(-1, d)
            att = F.scaled_dot_product_attention(  # fp32, over the cache so far
                qk[: p.heads].float().view(1, p.heads, 1, d), unblock_keys(self.keys[i], pos + 1).float().unsqueeze(0),
                self.values[i, :, : pos + 1].float().unsqueeze(0), scale=p.scale, enable_gqa=True)
            h = h + _linear(k, o_proj, att.to(torch.bfloat16).view(-1))
            gate, up = _linear(k, gate_up_proj, _rms_norm(h, norm2, p.eps)).split(p.intermediate)
            h = h + _linear(k, down_proj, F.silu(gate) * up)
        self.pos += 1
        x = _rms_norm(h, p.norm, p.eps)
        if isinstance(p.head, DecodeLinears):
            return _linear(k, p.head, x).float()
        return F.linear(x, p.head).float()


class _Bf16Copies:
    """Detached bf16 views of a model's tensors: a bf16 tensor as it is, an fp32 one converted once
    (tied embeddings and head are one tensor, so one copy)."""

    def __init__(self):
        self.made: dict[tuple, torch.Tensor] = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.dtype == torch.bfloat16:
            return t
        where = (t.data_ptr(), tuple(t.shape), t.stride())  # not id(): detach() makes a new object each time
        if where not in self.made:
            self.made[where] = t.to(torch.bfloat16).contiguous()
        return self.made[where]


def _head_screen(model, weight: torch.Tensor, head: torch.Tensor) -> tuple:
    """Greedy steps read an int8 copy of the bf16 head (half its bytes), and exact rows only where that
    copy cannot decide (llama_structs.int8_screen: the argmax stays exact). Built once per head weight (0.6 s
    for SmolLM2's 49152 x 576), kept apart from the Plan: a new adapter does not change the head."""
    cached = getattr(model, "_qlora_head_screen", None)
    if cached is None or cached[0] != _version(weight):
        cached = (_version(weight), int8_screen(head))
        model._qlora_head_screen = cached
    return cached[1]


def _linear(k, specs: DecodeLinears, x: torch.Tensor) -> torch.Tensor:
    """The projections of `specs` on x (bf16), each output rounded to bf16 as a bf16 layer returns it."""
    return k.llama.decode_linears(specs, x.contiguous(), torch.empty(specs.n)).to(torch.bfloat16)


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm, the same ops in the same dtypes."""
    x = h.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb on (heads, D) bf16: x·cos + rotate_half(x)·sin, rounded as there."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[:, half:], x[:, :half]), dim=-1) * sin


def decoder(model, capacity: int) -> Decoder | None:
    """A Decoder for `model` with room for `capacity` positions, or None where this module does
    not apply (another architecture, no compiled kernels, anything unusual): use the model's forward."""
    if os.environ.get("QLORA_DECODE", "") == "model" or not supported(model):
        return None
    plan = getattr(model, "_qlora_decode_plan", None)
    if plan is None or plan.key != key(model):
        plan = Plan(model)
        model._qlora_decode_plan = plan  # derived data only; the key says when it is stale
    return Decoder(plan, capacity)


def supported(model) -> bool:
    """Whether `decoder` covers this model: a llama-family bf16 or fp32 model whose projections are all
    4-bit (with at most one live, dropout-free LoRA each) in a layout the kernels take, on CPU."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in _ARCHS or getattr(cfg, "hidden_act", None) != "silu":
        return False
    if model.training and getattr(cfg, "attention_dropout", 0.0):
        return False  # the forward would drop attention weights; the step never does
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    body = getattr(model, "model", None)
    if rope not in _ROPE_TYPES or body is None or not hasattr(body, "layers"):
        return False
    embed = body.embed_tokens.weight
    if embed.dtype not in _DTYPES or embed.device.type != "cpu" or kernels.cpu_kernels(embed) is None:
        return False
    head = model.lm_head
    if isinstance(head, Linear4bit):
        if _spec(head) is None or head.bias is not None:
            return False
    elif not (type(head) is torch.nn.Linear and head.bias is None and head.weight.dtype in _DTYPES):
        return False
    return all(_spec(lin) is not None for layer in body.layers for lin in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))


def key(model) -> tuple:
    """Identity and version of every tensor a Plan derives from."""
    parts = []
    for module in model.modules():
        if isinstance(module, LoRALinear):
            parts += [_version(module.lora_A.weight), _version(module.lora_B.weight), module.scaling]
        elif isinstance(module, Linear4bit):
            q = module.weight
            parts += [_version(q.data), _version(q.absmax), _version(module.bias)]
    return tuple(parts)


def _version(t: torch.Tensor | None):
    return None if t is None else (t.data_ptr(), t._version)


def _spec(module) -> dict | None:
    """The kernel's description of a (LoRA over a) 4-bit bf16/fp32 linear, or None if it is not one."""
    lora = None
    if isinstance(module, LoRALinear):
        if (module.training and module.dropout > 0) or module.dora:  # the kernel adds plain s·BA only
            return None
        lora, module = module, module.base
    if not isinstance(module, Linear4bit) or module.compute_dtype not in _DTYPES:
        return None
    q = module.weight
    if not DecodeLinears.supports(q.shape, q.blocksize):
        return None
    spec = dict(packed=q.data, absmax=q.absmax, code=q.code, blocksize=q.blocksize, shape=tuple(q.shape),
                nested=q.nested, bias=module.bias)
    if lora is not None:
        spec.update(lora_a=lora.lora_A.weight, lora_b=lora.lora_B.weight, scaling=lora.scaling)
    return spec
