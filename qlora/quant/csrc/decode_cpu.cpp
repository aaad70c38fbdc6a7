// Kernels for one-token decode steps, called from qlora/quant/fast.py through ctypes (same library
// as quant_cpu.cpp): a 4-bit linear with its LoRA branch in one call, a bf16 matrix times a bf16
// vector (the output head), and attention of one query row over a KV cache.
//
// Decoding one token reads every weight once and does two flops with it, so the speed is how fast
// the weights stream in and get unpacked. qlora_gemm_4bit (quant_cpu.cpp) spends ~8 vector
// instructions per 16 weights turning codes into fp32 weights; here a 64-weight block costs ~12
// for all 64, with AVX512-BF16:
//   - one 16-bit permute maps 32 codes to the codebook as bf16. A codebook value is not a bf16
//     number, so it is kept as hi + lo (two bf16 tables; hi + lo equals the fp32 value to 2^-17
//     relative) and both halves are multiplied: the weights stay the fp32 values, as in the
//     reference, not bf16-rounded ones;
//   - vdpbf16ps multiplies 32 bf16 pairs exactly and adds them into 16 fp32 lanes;
//   - the block scale multiplies the block's sum once instead of each weight.
// x is bf16 (the compute dtype's activations are), rearranged once per call into the order the
// unpacked codes come in. The sums are fp32 in an order of their own (as qlora_gemm_4bit's are):
// results equal x · dequantize(W, fp32)ᵀ up to fp32 summation order.
//
// Single-threaded on purpose, like qlora_gemm_4bit: called from a server's handler threads, an
// OpenMP region made `qlora serve` end in std::terminate at exit now and then.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && !defined(QLORA_PORTABLE)
#define QLORA_GEMV_BF16 1
#include <immintrin.h>
#endif

#include "decode.h"

namespace {

// Scratch for the rearranged inputs, per thread (serve decodes on several).
thread_local std::vector<uint16_t> t_x, t_xa_hi, t_xa_lo;
thread_local std::vector<float> t_xa, t_scales;

inline void split_bf16(const float* v, int64_t n, uint16_t* hi, uint16_t* lo) {
  for (int64_t i = 0; i < n; ++i) {
    hi[i] = float_to_bf16(v[i]);
    lo[i] = float_to_bf16(v[i] - bf16_to_float(hi[i]));  // v - hi is exact: what hi left out
  }
}

// The block scales of a 4-bit weight in storage order, as block_scale (common.h) computes them,
// without its two integer divisions per block (a 64-bit division costs about as much as the
// block's 64 multiply-adds): the nested index advances with a counter.
struct Scales {
  const QloraDecodeLinear& L;
  int64_t b = 0, nested = 0, in_nested = 0;
  std::vector<float>& buf;
  explicit Scales(const QloraDecodeLinear& layer) : L(layer), buf(t_scales) {}
  float* next_rows(int64_t rows) {  // the scales of the next `rows` rows: (rows, k / bs)
    const int64_t count = rows * (L.k / L.bs);
    buf.resize(std::max<size_t>(buf.size(), count));
    for (int64_t i = 0; i < count; ++i, ++b) {
      if (L.qabsmax == nullptr) {
        buf[i] = L.absmax[b];
        continue;
      }
      const float s = L.code8[L.qabsmax[b]] * L.nested_absmax[nested];
      buf[i] = s + L.offset;
      if (++in_nested == L.nested_bs) in_nested = 0, ++nested;
    }
    return buf.data();
  }
};

#ifdef QLORA_GEMV_BF16

inline __mmask32 lanes32(int64_t k) { return k >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << k) - 1); }

inline __m512 dot(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }

// out[o..o+R) = W[o..o+R) · (hi + lo) for a bf16 W (n, k) and x split into two bf16 halves (lo
// may be null: x is bf16). R rows at once share each load of x.
template <int R>
inline void gemv16_rows(const uint16_t* w, int64_t k, const uint16_t* hi, const uint16_t* lo, int64_t o, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; j += 32) {
    const __mmask32 m = lanes32(k - j);
    const __m512i xh = _mm512_maskz_loadu_epi16(m, hi + j);
    const __m512i xl = lo ? _mm512_maskz_loadu_epi16(m, lo + j) : _mm512_setzero_si512();
    for (int r = 0; r < R; ++r) {
      const __m512i wv = _mm512_maskz_loadu_epi16(m, w + (o + r) * k + j);
      acc[r] = dot(acc[r], wv, xh);
      if (lo) acc[r] = dot(acc[r], wv, xl);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// The codebook as 32 16-bit lanes (entry i = code[i % 16]), hi or lo half: a permute then reads
// the low 5 bits of each index, so a whole byte stands for its low nibble.
inline __m512i code_table(const float* code, bool lo) {
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) {
    const uint16_t h = float_to_bf16(code[i % 16]);
    t[i] = lo ? float_to_bf16(code[i % 16] - bf16_to_float(h)) : h;
  }
  return _mm512_load_si512(t);
}

// x (bf16) -> per 64-element step: the 32 even elements, then the 32 odd ones. Unpacking 32 bytes
// gives the high nibbles (even elements) in one vector and the low nibbles (odd) in another.
inline void even_odd(const uint16_t* x, int64_t k, uint16_t* out) {
  for (int64_t j = 0; j < k; j += 64)
    for (int i = 0; i < 32; ++i) out[j + i] = x[j + 2 * i], out[j + 32 + i] = x[j + 2 * i + 1];
}

template <int R>
inline void gemv4_rows(const QloraDecodeLinear& L, const uint16_t* xeo, __m512i thi, __m512i tlo, int64_t o,
                       Scales& scales, float* out) {
  const int64_t k = L.k, bs = L.bs, kb = k / bs;
  float* s = scales.next_rows(R);  // (R, kb)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < k; j0 += bs) {
    __m512 d[R];
    for (int r = 0; r < R; ++r) d[r] = _mm512_setzero_ps();
    for (int64_t j = j0; j < j0 + bs; j += 64) {
      const __m512i xe = _mm512_loadu_si512(xeo + j), xo = _mm512_loadu_si512(xeo + j + 32);
      for (int r = 0; r < R; ++r) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(L.packed + ((o + r) * k + j) / 2));
        const __m512i w = _mm512_cvtepu8_epi16(bytes), h = _mm512_srli_epi16(w, 4);
        d[r] = dot(d[r], _mm512_permutexvar_epi16(h, thi), xe);
        d[r] = dot(d[r], _mm512_permutexvar_epi16(w, thi), xo);
        d[r] = dot(d[r], _mm512_permutexvar_epi16(h, tlo), xe);
        d[r] = dot(d[r], _mm512_permutexvar_epi16(w, tlo), xo);
      }
    }
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(d[r], _mm512_set1_ps(s[r * kb + j0 / bs]), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// Rows in groups of 4 (then 1): R independent accumulator chains hide vdpbf16ps's latency.
template <typename F> inline void by_rows(int64_t n, F&& rows) {
  int64_t o = 0;
  for (; o + 4 <= n; o += 4) rows(o, std::integral_constant<int, 4>());
  for (; o < n; ++o) rows(o, std::integral_constant<int, 1>());
}

void gemv16(const uint16_t* w, int64_t n, int64_t k, const uint16_t* hi, const uint16_t* lo, float* out) {
  by_rows(n, [&](int64_t o, auto R) { gemv16_rows<decltype(R)::value>(w, k, hi, lo, o, out + o); });
}

void gemv4(const QloraDecodeLinear& L, const uint16_t* x, float* out) {
  t_x.resize(L.k);
  even_odd(x, L.k, t_x.data());
  const __m512i thi = code_table(L.code, false), tlo = code_table(L.code, true);
  Scales scales(L);
  by_rows(L.n, [&](int64_t o, auto R) { gemv4_rows<decltype(R)::value>(L, t_x.data(), thi, tlo, o, scales, out + o); });
}

#else  // portable: the same sums in scalar fp32

void gemv16(const uint16_t* w, int64_t n, int64_t k, const uint16_t* hi, const uint16_t* lo, float* out) {
  for (int64_t o = 0; o < n; ++o) {
    float acc = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      const float wv = bf16_to_float(w[o * k + j]);
      acc += wv * bf16_to_float(hi[j]);
      if (lo) acc += wv * bf16_to_float(lo[j]);
    }
    out[o] = acc;
  }
}

void gemv4(const QloraDecodeLinear& L, const uint16_t* x, float* out) {
  const int64_t k = L.k, bs = L.bs;
  Scales scales(L);
  for (int64_t o = 0; o < L.n; ++o) {
    const float* s = scales.next_rows(1);
    float acc = 0.0f;
    for (int64_t j0 = 0; j0 < k; j0 += bs) {
      float d = 0.0f;
      for (int64_t j = j0; j < j0 + bs; ++j) {
        const uint8_t byte = L.packed[(o * k + j) / 2];
        d += L.code[j % 2 ? byte & 0xF : byte >> 4] * bf16_to_float(x[j]);
      }
      acc += d * s[j0 / bs];
    }
    out[o] = acc;
  }
}

#endif

}  // namespace

namespace qlora {

// out = W4·x + bias + s·B(A·x): xa = A·x is fp32 and goes into B as two bf16 halves, so the LoRA
// branch is as exact as fp32 A·x and B·xa with bf16-stored A and B would be.
void decode_linear(const QloraDecodeLinear& L, const uint16_t* x, float* out) {
  ::gemv4(L, x, out);
  if (L.bias)
    for (int64_t o = 0; o < L.n; ++o) out[o] += L.bias[o];
  if (!L.lora_a) return;
  t_xa.resize(L.r), t_xa_hi.resize(L.r), t_xa_lo.resize(L.r);
  ::gemv16(L.lora_a, L.r, L.k, x, nullptr, t_xa.data());
  split_bf16(t_xa.data(), L.r, t_xa_hi.data(), t_xa_lo.data());
  std::vector<float>& delta = t_xa;  // reused below only after xa is split
  delta.resize(L.n);
  ::gemv16(L.lora_b, L.n, L.r, t_xa_hi.data(), t_xa_lo.data(), delta.data());
  for (int64_t o = 0; o < L.n; ++o) out[o] += L.scaling * delta[o];
}

void gemv_bf16(const uint16_t* w, int64_t n, int64_t k, const uint16_t* x, float* out) {
  ::gemv16(w, n, k, x, nullptr, out);
}

namespace {
// a · b over n fp32 values (16 lanes, then across them, with AVX-512).
inline float dot32(const float* a, const float* b, int64_t n) {
  int64_t j = 0;
  float s = 0.0f;
#ifdef QLORA_GEMV_BF16
  __m512 acc = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

}  // namespace

// Attention of one query row: for each of the H heads (head h reads kv head h / (H / KV), as
// repeat_kv orders them), softmax(scale · q·Kᵀ) · V over the first T cached positions, in fp32.
void attention(const float* q, const float* keys, const float* values, int64_t stride, int64_t T, int64_t H,
               int64_t KV, int64_t D, float scale, float* out) {
  thread_local std::vector<float> p;
  p.resize(T);
  for (int64_t h = 0; h < H; ++h) {
    const float* qh = q + h * D;
    const float* K = keys + (h / (H / KV)) * stride;
    const float* V = values + (h / (H / KV)) * stride;
    float m = -INFINITY;
    for (int64_t t = 0; t < T; ++t) {
      p[t] = dot32(qh, K + t * D, D) * scale;
      m = std::max(m, p[t]);
    }
    float sum = 0.0f;
    for (int64_t t = 0; t < T; ++t) sum += (p[t] = std::exp(p[t] - m));
    float* o = out + h * D;
    std::fill(o, o + D, 0.0f);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < D; ++j) o[j] += p[t] * V[t * D + j];
    for (int64_t j = 0; j < D; ++j) o[j] /= sum;
  }
}

}  // namespace qlora

extern "C" {

// 1 when the bf16 dot-product kernels are built (AVX512-BF16), 0 for the portable scalar ones.
int qlora_gemv_simd(void) {
#ifdef QLORA_GEMV_BF16
  return 1;
#else
  return 0;
#endif
}

// `count` linears that share the input x (bf16, k): their outputs one after another in out (fp32).
// Each needs k % bs == 0 and bs % 64 == 0 (fast.py checks).
void qlora_decode_linear(const QloraDecodeLinear* layers, int64_t count, const uint16_t* x, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    qlora::decode_linear(layers[i], x, out);
    out += layers[i].n;
  }
}

// out (n, fp32) = W (n, k, bf16) · x (k, bf16), fp32 sums; with `round`, each rounded to bf16 as a
// bf16 matmul's output would be (kept as fp32: an argmax over fp32 is 4x faster in torch).
void qlora_gemv_bf16(const uint16_t* w, int64_t n, int64_t k, const uint16_t* x, float* out, int round) {
  qlora::gemv_bf16(w, n, k, x, out);
  if (round)
    for (int64_t o = 0; o < n; ++o) out[o] = bf16_to_float(float_to_bf16(out[o]));
}

// out (H, D) = attention of q (H, D) over keys/values laid out (KV, stride / D, D), first T rows.
void qlora_decode_attention(const float* q, const float* keys, const float* values, int64_t stride, int64_t T,
                            int64_t H, int64_t KV, int64_t D, float scale, float* out) {
  qlora::attention(q, keys, values, stride, T, H, KV, D, scale, out);
}

}  // extern "C"
