"""The ARM64 driver's input (tests/quant/test_arm64.py): every kernel call, with inputs made from
qlora's own tables, serialized in the format tests/quant/arm64_driver.cpp reads."""

from __future__ import annotations

import io
import math
import struct

import torch

from qlora import quant
from qlora.quant import blockwise, codebooks
from qlora.quant.fast import quantize
from qlora.quant.fast.llama_structs import _blocked, block_keys, int8_screen

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # quantize._DTYPE_CODES
_DT_NAME = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


# ---- the calls: inputs and parameters, serialized for the driver ---------------------------------

def _bytes(t) -> bytes | None:
    if t is None or isinstance(t, bytes):
        return t
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


class Calls:
    """The driver's input: calls (name 'op/details', int64s, float32s, buffers), in order."""

    def __init__(self):
        self.calls: list[tuple[str, list[int], list[float], list[bytes | None]]] = []

    def add(self, name: str, ints=(), floats=(), bufs=()):
        assert name not in {c[0] for c in self.calls}, f"duplicate call name {name}"
        self.calls.append((name, [int(i) for i in ints], [float(f) for f in floats], [_bytes(b) for b in bufs]))

    def serialize(self) -> bytes:
        out = io.BytesIO()
        out.write(b"QA64IN01" + struct.pack("<I", len(self.calls)))
        for name, ints, floats, bufs in self.calls:
            raw = name.encode()
            out.write(struct.pack("<I", len(raw)) + raw)
            out.write(struct.pack(f"<I{len(ints)}q", len(ints), *ints))
            out.write(struct.pack(f"<I{len(floats)}f", len(floats), *floats))
            out.write(struct.pack("<I", len(bufs)))
            for b in bufs:
                out.write(struct.pack("<BQ", b is not None, 0 if b is None else len(b)) + (b or b""))
        return out.getvalue()


def _bf16_all() -> torch.Tensor:
    """All 65,536 bf16 bit patterns (NaNs, infinities, subnormals, both zeros)."""
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


_SPECIALS = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, -1e-45, 3.4028234663852886e38, 1.1754943508222875e-38)


def _specials(x: torch.Tensor, gen: torch.Generator, every: int = 37) -> torch.Tensor:
    """x with NaN/Inf/zeros/subnormals sprinkled in (as its dtype holds them)."""
    x = x.clone()
    flat = x.view(-1)
    for i, pos in enumerate(range(3, flat.numel(), every)):
        flat[pos] = _SPECIALS[i % len(_SPECIALS)]
    return x


def _scales(n: int, gen: torch.Generator, specials: bool) -> torch.Tensor:
    """Block scales over the whole fp32 range (signs too), optionally with NaN/Inf/0/subnormal."""
    s = torch.exp2(torch.rand(n, generator=gen, dtype=torch.float64) * 270 - 145)
    s = (s * torch.where(torch.rand(n, generator=gen) < 0.2, -1.0, 1.0)).float()
    return _specials(s, gen, every=5) if specials else s


def _quant_input(n: int, bs: int, dtype: torch.dtype, gen: torch.Generator, finite: bool) -> torch.Tensor:
    """Per block one value family: normal at a random scale, zeros, subnormals, huge, ties (values on
    the codebook's midpoints times a power-of-two absmax), and, unless `finite`, NaN/Inf."""
    fi = torch.finfo(dtype)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    nblocks = -(-n // bs)
    for b in range(nblocks):
        blk = x[b * bs: (b + 1) * bs]
        kind = b % 6
        if kind == 0:
            blk.mul_(2.0 ** float(torch.randint(-20, 20, (1,), generator=gen)))
        elif kind == 1:
            blk.mul_(fi.tiny / 16)  # subnormal values, subnormal absmax
        elif kind == 2:
            blk.mul_(min(fi.max / 8, 1e30))
        elif kind == 3:
            blk.zero_()
        elif kind == 4:
            blk.mul_(fi.tiny * 3)
    x = x.clamp(-fi.max, fi.max).to(dtype)
    if n >= 5 * bs:  # a tie block: midpoints of the NF4 table times 2 (exact in every dtype for most)
        b = 5 * bs
        mids = blockwise._bounds_and_order("nf4", torch.device("cpu"))[0].double() * 2
        blk = x[b - bs: b]
        blk.copy_(mids.repeat(-(-bs // 15))[:bs].to(dtype))
        blk[0] = 2.0
    if not finite:
        x = _specials(x, gen, every=max(3, bs // 2 + 1))
    return x


def _dq_scales(nblocks: int, nested_bs: int, gen: torch.Generator):
    """Random Double Quantization state: uint8 codes, nested fp32 scales, the signed dynamic map."""
    qabsmax = torch.randint(0, 256, (nblocks,), generator=gen, dtype=torch.uint8)
    nested = torch.rand(-(-nblocks // nested_bs), generator=gen) * 3
    return qabsmax, nested, codebooks.dynamic_map(signed=True)


def _linear(n: int, k: int, bs: int, gen: torch.Generator, dq: bool, r: int, bias: bool, scale: float = 0.05):
    """(ints, floats, bufs) of one QloraDecodeLinear, made with qlora.quantize and decoding's layouts."""
    w = torch.randn(n, k, generator=gen) * scale
    q = quant.quantize(w, "nf4", bs, double_quant=dq)
    (a32, qa, nested_absmax, code8), offset, nested_bs = quantize._scale_args(q.absmax, q.nested)
    lora_a = (torch.randn(r, k, generator=gen) * 0.05).bfloat16() if r else None
    lora_b = _blocked((torch.randn(n, r, generator=gen) * 0.05).bfloat16()) if r else None
    b = torch.randn(n, generator=gen) if bias else None
    return ([n, k, bs, nested_bs, r], [offset, 0.5 if r else 0.0],
            [q.data, a32, qa, nested_absmax, code8, q.code.float(), b, lora_a, lora_b])


def _add_linears(calls_args, linears):
    ints, floats, bufs = calls_args
    for li, lf, lb in linears:
        ints += li
        floats += lf
        bufs += lb


def make_calls() -> Calls:
    g = torch.Generator().manual_seed(20240611)
    c = Calls()
    c.add("info")

    # the C library itself, on the arguments its exp/log calls see (every bf16; fp32 in exp's range)
    probe = torch.cat([_bf16_all().float(), torch.rand(1 << 16, generator=g) * 200 - 110,
                       torch.exp2(torch.rand(1 << 14, generator=g) * 260 - 130)])
    c.add("libm", [probe.numel()], [], [probe])

    # the kernels' exp (qlora_exp): every bf16 value, fp32 over its range and beyond, ragged tails
    xs = torch.cat([_bf16_all().float(), torch.rand(1 << 17, generator=g) * 220 - 115,
                    torch.tensor([88.72283, 88.72284, -87.33655, -103.97208, -104.0, 89.0, 0.0, -0.0, 1e-45])])
    c.add(f"exp/n={xs.numel()}", [xs.numel()], [], [xs])
    for n in (1, 15, 17, 33):
        c.add(f"exp/n={n}", [n], [], [torch.randn(n, generator=g) * 30])

    # 4-bit quantize: every codebook, dtype, ragged sizes, finite and NaN/Inf inputs
    for qt in codebooks.QUANT_TYPES:
        bounds, order = quantize._code4_tables(qt)
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            for n, bs, finite in ((1, 32, True), (33, 32, True), (1000, 64, True), (4133, 128, True),
                                  (5000, 4096, True), (901, 64, False), (77, 32, False)):
                x = _quant_input(n, bs, dt, g, finite)
                c.add(f"quantize_4bit/{qt}/{_DT_NAME[dt]}/n={n}/bs={bs}/{'finite' if finite else 'nonfinite'}",
                      [_DTYPES[dt], n, bs], [], [x, bounds, order])

    # 4-bit dequantize: codebooks (one with subnormal and -0.0 entries), dtypes, plain and DQ scales
    weird = torch.tensor([-1.0, -0.5, -1e-40, -0.0, 0.0, 1e-42, 0.25, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95, 1.0])
    for cname, code in (("nf4", codebooks.code4("nf4")), ("fp4", codebooks.code4("fp4")), ("weird", weird)):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            for n, bs in ((1, 32), (65, 32), (1000, 64), (3001, 256), (4096, 64)):
                nblocks = -(-n // bs)
                packed = torch.randint(0, 256, ((n + 1) // 2,), generator=g, dtype=torch.uint8)
                base = f"dequantize_4bit/{cname}/{_DT_NAME[dt]}/n={n}/bs={bs}"
                c.add(base + "/fp32-scales", [_DTYPES[dt], n, bs, 1], [0.0],
                      [packed, _scales(nblocks, g, specials=True), None, None, None, code])
                nested_bs = 4 if nblocks > 4 else 256
                qa, nested, code8 = _dq_scales(nblocks, nested_bs, g)
                c.add(base + f"/double-quant-{nested_bs}", [_DTYPES[dt], n, bs, nested_bs], [0.0123],
                      [packed, None, qa, nested, code8, code])
    # ... and Double Quantization state as qlora.quantize makes it
    for dt in (torch.float32, torch.bfloat16):
        w = torch.randn(37, 96, generator=g) * 0.02
        q = quant.quantize(w, "nf4", 32, double_quant=True)
        (_, qa, nested_absmax, code8), offset, nested_bs = quantize._scale_args(q.absmax, q.nested)
        c.add(f"dequantize_4bit/quantize-dq/{_DT_NAME[dt]}/n={w.numel()}", [_DTYPES[dt], w.numel(), 32, nested_bs],
              [offset], [q.data, None, qa, nested_absmax, code8, q.code])

    # 8-bit quantize / dequantize (signed and unsigned dynamic maps, the LUT as fast/quantize.py pads it)
    for signed in (True, False):
        code = codebooks.dynamic_map(signed=signed)
        lut = quantize._padded_lut8(tuple(code.tolist()))
        sname = "signed" if signed else "unsigned"
        for n, bs, finite in ((1, 32, True), (100, 32, True), (1000, 256, True), (5000, 4096, True), (257, 64, True),
                              (700, 64, False)):
            x = _quant_input(n, bs, torch.float32, g, finite)
            if not signed:
                x = x.abs()
            c.add(f"quantize_8bit/{sname}/n={n}/bs={bs}/{'finite' if finite else 'nonfinite'}", [n, bs], [], [x, lut])
        for n, bs in ((1, 32), (100, 32), (1000, 256), (4099, 64)):
            qb = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
            c.add(f"dequantize_8bit/{sname}/n={n}/bs={bs}", [n, bs], [],
                  [qb, _scales(-(-n // bs), g, specials=True), code])

    # 4-bit GEMM: m = 1, 3, 8 and 13 (8 + 4 + 1 rows), plain and DQ scales, ragged n_out
    for k, n_out, bs in ((64, 37, 32), (192, 16, 64), (128, 5, 128)):
        for dq in (False, True):
            w = torch.randn(n_out, k, generator=g) * 0.1
            q = quant.quantize(w, "nf4", bs, double_quant=dq)
            (a32, qa, nested_absmax, code8), offset, nested_bs = quantize._scale_args(q.absmax, q.nested)
            for m in (1, 3, 8, 13):
                x = torch.randn(m, k, generator=g)
                if m == 3:
                    x = _specials(x, g, every=53)
                c.add(f"gemm_4bit/m={m}/k={k}/n={n_out}/bs={bs}/{'dq' if dq else 'fp32-scales'}",
                      [m, k, n_out, bs, nested_bs], [offset], [x, q.data, a32, qa, nested_absmax, code8, q.code])

    # dropout: fp32 and bf16, ragged, across the 65,536-element chunk, in place too
    for dt in (torch.float32, torch.bfloat16):
        for n in (1, 15, 16, 17, 1000, (1 << 16) + 37):
            x = _specials(torch.randn(n, generator=g).to(dt), g, every=41)
            for p, seed, inplace in ((0.1, 12345, 0), (0.5, 0xDEADBEEF, 1), (0.0, 7, 0)):
                threshold = min(int(p * 2 ** 32), 2 ** 32 - 1)
                c.add(f"dropout/{_DT_NAME[dt]}/n={n}/p={p}/inplace={inplace}",
                      [n, _DTYPES[dt], threshold, seed, inplace],
                      [1.0 / (1.0 - p)], [x])

    # RMSNorm forward and backward (a zero row and a huge row among them), ragged widths; bf16 and fp32
    for dt in (torch.bfloat16, torch.float32):
        for d in (1, 15, 16, 17, 64, 100, 583):
            rows = 4
            x = (torch.randn(rows, d, generator=g) * torch.tensor([[1.0], [0.0], [1e30], [1e-3]])).to(dt)
            w = (torch.randn(d, generator=g) * 0.2 + 1).to(dt)
            for eps in (1e-5, 1e-6):
                c.add(f"rms_norm_forward/{dt}/d={d}/eps={eps}", [rows, d, _DTYPES[dt]], [eps], [x, w])
            rstd = torch.rsqrt(x.float().pow(2).mean(1) + 1e-5)
            dy = torch.randn(rows, d, generator=g).to(dt)
            c.add(f"rms_norm_backward/{dt}/d={d}", [rows, d, _DTYPES[dt]], [], [dy, x, w, rstd])

    # SwiGLU forward and backward: ragged sizes across the 16,384-element chunk, and every bf16 gate
    for dt in (torch.bfloat16, torch.float32):
        for n in (1, 15, 16, 17, 1000, (1 << 14) + 17):
            gt = (torch.randn(n, generator=g) * 4).to(dt)
            u, dh = (torch.randn(n, generator=g).to(dt) for _ in range(2))
            c.add(f"swiglu_forward/{dt}/n={n}", [n, _DTYPES[dt]], [], [gt, u])
            c.add(f"swiglu_backward/{dt}/n={n}", [n, _DTYPES[dt]], [], [dh, gt, u])
        gt = _bf16_all().to(dt)
        u, dh = (torch.randn(65536, generator=g).to(dt) for _ in range(2))
        c.add(f"swiglu_forward/{dt}/every-bf16-gate", [65536, _DTYPES[dt]], [], [gt, u])
        c.add(f"swiglu_backward/{dt}/every-bf16-gate", [65536, _DTYPES[dt]], [], [dh, gt, u])

    # per-row cross-entropy, with and without the gradient; one row spans 1e4, one has -inf logits
    for v in (1, 15, 16, 17, 100, 1003):
        rows = 4
        z = torch.randn(rows, v, generator=g) * 3
        z[1] *= 3000
        z[2, ::3] = -math.inf
        z[2, 0] = 1.0
        targets = torch.randint(0, v, (rows,), generator=g)
        targets[2] = 0
        for grad in (0, 1):
            c.add(f"cross_entropy_rows/v={v}/grad={grad}", [rows, v, grad], [], [z.bfloat16(), targets])

    # one-token 4-bit linear + LoRA (decode_linear): shapes, DQ, rank, bias, several sharing x,
    # and one product above the two-lane threshold (64k weights) with the helper thread on
    for count, n, k, bs, dq, r, bias, threads in ((1, 1, 64, 64, False, 0, False, 1),
                                                  (1, 37, 128, 64, True, 5, True, 1),
                                                  (1, 16, 256, 128, True, 8, False, 1),
                                                  (3, 40, 192, 64, False, 1, True, 1),
                                                  (1, 272, 256, 64, True, 16, True, 2),
                                                  (1, 33, 64, 64, False, 3, False, 2)):
        args = ([count, threads], [], [])
        _add_linears(args, [_linear(n + 8 * i, k, bs, g, dq, r, bias) for i in range(count)])
        args[2].append(torch.randn(k, generator=g).bfloat16())
        c.add(f"decode_linear/count={count}/n={n}/k={k}/bs={bs}/dq={int(dq)}/r={r}/bias={int(bias)}/threads={threads}",
              *args)

    # bf16 GEMV (the output head), rounded and not, ragged k; two lanes above 64k weights
    for n, k, threads in ((1, 1, 1), (37, 31, 1), (37, 64, 1), (5, 200, 1), (300, 256, 2), (300, 256, 1)):
        w = torch.randn(n, k, generator=g).bfloat16()
        x = torch.randn(k, generator=g).bfloat16()
        for rnd in (0, 1):
            c.add(f"gemv_bf16/n={n}/k={k}/round={rnd}/threads={threads}", [n, k, rnd, threads], [], [w, x])

    # one-query attention over a bf16 cache: head grouping, D not a multiple of 16, ragged T
    for H, KV, D, T, extra, threads in ((4, 2, 16, 1, 0, 1), (4, 2, 16, 15, 16, 1), (4, 4, 24, 33, 0, 1),
                                        (2, 1, 64, 17, 16, 1), (8, 2, 8, 20, 0, 1), (8, 4, 64, 128, 0, 2)):
        capacity = -(-T // 16) * 16 + extra
        keys = torch.zeros(KV, capacity, D, dtype=torch.bfloat16)
        values = torch.zeros(KV, capacity, D, dtype=torch.bfloat16)
        keys[:, :T] = torch.randn(KV, T, D, generator=g).bfloat16()
        values[:, :T] = torch.randn(KV, T, D, generator=g).bfloat16()
        q = torch.randn(H, D, generator=g) * 2
        c.add(f"decode_attention/H={H}/KV={KV}/D={D}/T={T}/capacity={capacity}/threads={threads}",
              [capacity, T, H, KV, D, threads], [D ** -0.5], [q, block_keys(keys), values])

    # argmax through the int8 screen: a clear winner, a tie (lowest index wins), two lanes
    for n, k, tie, threads in ((300, 64, False, 1), (300, 64, True, 1), (1100, 64, False, 2), (7, 33, True, 1)):
        w = torch.randn(n, k, generator=g).bfloat16()
        if tie:
            w[n // 2] = w[n - 1] = w[1] * 4
        x = torch.randn(k, generator=g).bfloat16()
        sq, ss, se = int8_screen(w)
        c.add(f"argmax_gemv_bf16/n={n}/k={k}/tie={int(tie)}/threads={threads}", [n, k, threads], [], [w, sq, ss, se, x])

    # a tiny llama: 2 layers, grouped-query attention, LoRA on some projections; bf16 head (steps and
    # greedy through the int8 screen) and a 4-bit head (steps)
    hidden, heads, kv_heads, head_dim, inter, vocab, capacity, layers = 64, 4, 2, 16, 128, 97, 32, 2
    embed = (torch.randn(vocab, hidden, generator=g) * 0.5).bfloat16()
    norm = (1 + 0.1 * torch.randn(hidden, generator=g)).bfloat16()
    head = (torch.randn(vocab, hidden, generator=g) * 0.2).bfloat16()
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.outer(torch.arange(capacity).float(), inv_freq)
    emb = torch.cat([freqs, freqs], 1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    tokens = torch.randint(0, vocab, (9,), generator=g)
    per_layer = []
    for li in range(layers):
        n1, n2 = ((1 + 0.1 * torch.randn(hidden, generator=g)).bfloat16() for _ in range(2))
        lins = [_linear(heads * head_dim, hidden, 64, g, True, 4 if li == 0 else 0, False),
                _linear(kv_heads * head_dim, hidden, 64, g, True, 0, False),
                _linear(kv_heads * head_dim, hidden, 64, g, False, 4, False),
                _linear(hidden, heads * head_dim, 64, g, True, 2, True),
                _linear(inter, hidden, 64, g, True, 0, False),
                _linear(inter, hidden, 64, g, False, 8, False),
                _linear(hidden, inter, 64, g, True, 0, False)]
        per_layer.append((n1, n2, lins))
    head_q, head_scale, head_err = int8_screen(head)
    for head_kind, greedy, screen in (("bf16", 0, False), ("bf16", 1, True), ("bf16", 1, False), ("4bit", 0, False)):
        four = head_kind == "4bit"
        args = ([layers, hidden, heads, kv_heads, head_dim, inter, vocab, capacity, int(four), len(tokens), 1, greedy],
                [1e-5, head_dim ** -0.5],
                [embed, norm, None if four else head, head_q if screen else None, head_scale if screen else None,
                 head_err if screen else None, cos, sin, tokens])
        for n1, n2, lins in per_layer:
            args[2].extend([n1, n2])
            _add_linears(args, lins)
        if four:
            g4 = torch.Generator().manual_seed(99)
            _add_linears(args, [_linear(vocab, hidden, 64, g4, True, 0, False, scale=0.2)])
        c.add(f"llama/head={head_kind}/{'greedy' if greedy else 'step'}/screen={int(screen)}/steps={len(tokens)}",
              *args)
    return c
