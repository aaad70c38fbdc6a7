// Attention of one query row over a KV cache for the decode step (llama_cpu.cpp; qlora/quant/fast/llama.py
// through ctypes), and the vectorized exp it and the SiLU use. An AVX-512 version (the AVX512-BF16
// build's) and one over simd16.h (AVX2, NEON, or scalar in the portable build), the same fp32
// operations in the same order, so those three builds give the same bits (AVX-512 differs in exp
// of the last n % 16 elements, which it takes from std::exp).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "decode.h"
#include "gemv.h"
#include "lanes.h"
#include "simd16.h"

namespace {

#ifdef QLORA_GEMV_BF16
using qlora::gemv::load_bf16;
#endif

// p[0..16) = scale · (q · K) for the 16 positions of key block kb ((D, 16) bf16): two
// accumulators over alternate j (the last odd j into the first), fused, then summed and scaled.
inline void score_block(const float* qh, const uint16_t* kb, int64_t D, float scale, float* p) {
#ifdef QLORA_GEMV_BF16
  __m512 s0 = _mm512_setzero_ps(), s1 = s0;
  int64_t j = 0;
  for (; j + 2 <= D; j += 2) {
    s0 = _mm512_fmadd_ps(_mm512_set1_ps(qh[j]), load_bf16(kb + j * 16, 0xffff), s0);
    s1 = _mm512_fmadd_ps(_mm512_set1_ps(qh[j + 1]), load_bf16(kb + j * 16 + 16, 0xffff), s1);
  }
  if (j < D) s0 = _mm512_fmadd_ps(_mm512_set1_ps(qh[j]), load_bf16(kb + j * 16, 0xffff), s0);
  _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_add_ps(s0, s1), _mm512_set1_ps(scale)));
#else
  v16::F16 s0 = v16::zero(), s1 = s0;
  int64_t j = 0;
  for (; j + 2 <= D; j += 2) {
    s0 = v16::fma(v16::set1(qh[j]), v16::load_bf16(kb + j * 16), s0);
    s1 = v16::fma(v16::set1(qh[j + 1]), v16::load_bf16(kb + j * 16 + 16), s1);
  }
  if (j < D) s0 = v16::fma(v16::set1(qh[j]), v16::load_bf16(kb + j * 16), s0);
  v16::store(p, v16::mul(v16::add(s0, s1), v16::set1(scale)));
#endif
}

#ifndef QLORA_GEMV_BF16
// o = (sum over t of p[t] · V[t]) / sum, D = 16 · NV (NV = 0: D / 16 at run time, up to 16), one
// accumulator per 16 columns, fused.
template <int NV>
void attend_v16(const float* p, const uint16_t* V, int64_t T, int64_t D, float sum, float* o) {
  const int64_t nv = NV > 0 ? NV : D / 16;
  v16::F16 acc[NV > 0 ? NV : 16];
  for (int64_t v = 0; v < nv; ++v) acc[v] = v16::zero();
  for (int64_t t = 0; t < T; ++t) {
    const v16::F16 pt = v16::set1(p[t]);
    for (int64_t v = 0; v < nv; ++v) acc[v] = v16::fma(pt, v16::load_bf16(V + t * D + v * 16), acc[v]);
  }
  for (int64_t v = 0; v < nv; ++v) v16::store(o + v * 16, v16::div(acc[v], v16::set1(sum)));
}
#endif

// The vector path of o = softmax-weighted V for D % 16 == 0, D <= 256; false for other D.
inline bool attend_values(const float* p, const uint16_t* V, int64_t T, int64_t D, float sum, float* o) {
  if (!(D % 16 == 0 && D <= 256)) return false;
#ifdef QLORA_GEMV_BF16
  __m512 acc[16];
  for (int64_t v = 0; v < D / 16; ++v) acc[v] = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    const __m512 pt = _mm512_set1_ps(p[t]);
    for (int64_t v = 0; v < D / 16; ++v)
      acc[v] = _mm512_fmadd_ps(pt, load_bf16(V + t * D + v * 16, 0xffff), acc[v]);
  }
  for (int64_t v = 0; v < D / 16; ++v) _mm512_storeu_ps(o + v * 16, _mm512_div_ps(acc[v], _mm512_set1_ps(sum)));
#else
  if (D == 64) attend_v16<4>(p, V, T, D, sum, o);  // the common head sizes with the accumulators in registers
  else if (D == 128) attend_v16<8>(p, V, T, D, sum, o);
  else attend_v16<0>(p, V, T, D, sum, o);
#endif
  return true;
}

}  // namespace

namespace qlora {

// x[i] = exp(x[i]) (common.h's polynomial, ~1 ulp), 16 lanes at a time.
void exp_inplace(float* x, int64_t n) {
  int64_t i = 0;
#ifdef QLORA_GEMV_BF16
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, exp16(_mm512_loadu_ps(x + i)));
  for (; i < n; ++i) x[i] = std::exp(x[i]);
#else
  for (; i + 16 <= n; i += 16) v16::store(x + i, v16::exp(v16::load(x + i)));
  if (i < n) v16::store_upto(x + i, v16::exp(v16::load_upto(x + i, n - i)), n - i);
#endif
}

// Attention of one query row: for each of the H heads (head h reads kv head h / (H / KV), as
// repeat_kv orders them), softmax(scale · q·Kᵀ) · V over the first T cached positions, in fp32.
// The cache is bf16 (the model's keys and values are bf16: exact, and half the bytes of fp32 to
// stream per token). Keys are stored in blocks of 16 positions, each transposed ((KV, capacity / 16,
// D, 16)), so 16 scores build up in the lanes of one register, with no horizontal sums; values are
// (KV, capacity, D). The softmax's max and sum run one position at a time.
// Heads [h0, h1) of attention() below.
void attention_heads(const float* q, const uint16_t* keys, const uint16_t* values, int64_t capacity, int64_t T,
                     int64_t H, int64_t KV, int64_t D, float scale, float* out, int64_t h0, int64_t h1) {
  thread_local std::vector<float> p;  // the running thread's own scores
  const int64_t blocks = (T + 15) / 16;
  p.resize(blocks * 16);
  for (int64_t h = h0; h < h1; ++h) {
    const float* qh = q + h * D;
    const uint16_t* K = keys + (h / (H / KV)) * capacity * D;
    const uint16_t* V = values + (h / (H / KV)) * capacity * D;
    float* o = out + h * D;
    for (int64_t b = 0; b < blocks; ++b) score_block(qh, K + b * D * 16, D, scale, p.data() + b * 16);
    const float m = *std::max_element(p.begin(), p.begin() + T);
    for (int64_t t = 0; t < T; ++t) p[t] -= m;
    exp_inplace(p.data(), T);
    float sum = 0.0f;
    for (int64_t t = 0; t < T; ++t) sum += p[t];
    if (attend_values(p.data(), V, T, D, sum, o)) continue;
    std::fill(o, o + D, 0.0f);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < D; ++j) o[j] += p[t] * bf16_to_float(V[t * D + j]);
    for (int64_t j = 0; j < D; ++j) o[j] /= sum;
  }
}

void attention(const float* q, const uint16_t* keys, const uint16_t* values, int64_t capacity, int64_t T,
               int64_t H, int64_t KV, int64_t D, float scale, float* out) {
  if (T * H * D < lanes::kSplitMin || H < 2) {  // short contexts: one lane
    attention_heads(q, keys, values, capacity, T, H, KV, D, scale, out, 0, H);
    return;
  }
  lanes::two_lanes([&](int lane, bool) {  // each head is one lane's, so the split changes nothing
    attention_heads(q, keys, values, capacity, T, H, KV, D, scale, out, lane == 0 ? 0 : H / 2, lane == 0 ? H / 2 : H);
  });
}

}  // namespace qlora

extern "C" {

// out (H, D) = attention of q (H, D) over the first T positions of keys (KV, capacity / 16, D, 16)
// and values (KV, capacity, D), both bf16.
void qlora_decode_attention(const float* q, const uint16_t* keys, const uint16_t* values, int64_t capacity, int64_t T,
                            int64_t H, int64_t KV, int64_t D, float scale, float* out) {
  qlora::attention(q, keys, values, capacity, T, H, KV, D, scale, out);
}

// x[i] = exp(x[i]) in place over n fp32 values: the exp of the decode step's softmax and SiLU.
void qlora_exp(float* x, int64_t n) { qlora::exp_inplace(x, n); }

}  // extern "C"
