// Seeded dropout on CPU, called from qlora/nn/dropout.py through ctypes (built into the same
// library as quant_cpu.cpp; see qlora/quant/fast.py).
//
//   out[i] = keep(i) ? x[i] * scale : 0,   keep(i) = mix(i, seed) >= threshold
//
// The mask is a pure function of (element index, 32-bit seed): backward re-applies it to the
// gradient instead of storing it, and the PyTorch reference (dropout.keep_mask) computes the same
// bits on any device. mix() is MurmurHash3's 32-bit finaliser over a Weyl-sequence counter.
// torch's bernoulli_ spent 18% of a SmolLM2 training step drawing these masks; this is one pass.

#include <cstdint>

#include "common.h"  // float_to_bf16 (c10::BFloat16's rounding, so x * scale in bf16 equals torch's), AVX-512

namespace {

inline uint32_t mix(uint32_t i, uint32_t seed) {
  uint32_t h = (i * 0x9E3779B9u) ^ seed;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

constexpr int64_t kParallelMin = int64_t(1) << 21;  // as in quant_cpu.cpp: small calls stay on one thread

#ifdef QLORA_AVX512
// 16 lanes of the same arithmetic: mix() in 32-bit integer lanes, the bf16 rounding in integers
// (the hardware conversion would flush subnormals), NaN -> 0x7FC0.
inline __m512i mix16(__m512i i, __m512i seed) {
  __m512i h = _mm512_xor_si512(_mm512_mullo_epi32(i, _mm512_set1_epi32(int(0x9E3779B9u))), seed);
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(int(0x85EBCA6Bu)));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(int(0xC2B2AE35u)));
  return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}

// Elements [lo, hi) with hi - lo a multiple of 16; returns where it stopped.
template <bool BF16>
int64_t dropout_simd(const void* x, void* out, int64_t lo, int64_t hi, uint32_t threshold, float scale, uint32_t seed) {
  const __m512i vseed = _mm512_set1_epi32(int(seed)), vthr = _mm512_set1_epi32(int(threshold));
  const __m512i step = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 vs = _mm512_set1_ps(scale);
  int64_t i = lo;
  for (; i + 16 <= hi; i += 16) {
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(i))), step);
    const __mmask16 keep = _mm512_cmp_epu32_mask(mix16(idx, vseed), vthr, _MM_CMPINT_NLT);
    if constexpr (BF16) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
      const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      const __m256i r = to_bf16_16(_mm512_mul_ps(v, vs));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i),
                          _mm256_maskz_mov_epi16(keep, r));
    } else {
      const __m512 v = _mm512_loadu_ps(static_cast<const float*>(x) + i);
      _mm512_storeu_ps(static_cast<float*>(out) + i, _mm512_maskz_mul_ps(keep, v, vs));
    }
  }
  return i;
}
#endif

// One contiguous range, vector body and scalar tail.
void dropout_range(const void* x, void* out, int64_t lo, int64_t hi, int dtype, uint32_t threshold, float scale,
                   uint32_t seed) {
  int64_t i = lo;
#ifdef QLORA_AVX512
  i = dtype == 2 ? dropout_simd<true>(x, out, lo, hi, threshold, scale, seed)
                 : dropout_simd<false>(x, out, lo, hi, threshold, scale, seed);
#endif
  if (dtype == 2) {
    const uint16_t* in = static_cast<const uint16_t*>(x);
    uint16_t* o = static_cast<uint16_t*>(out);
    for (; i < hi; ++i) o[i] = mix(uint32_t(i), seed) >= threshold ? float_to_bf16(bf16_to_float(in[i]) * scale) : uint16_t(0);
  } else {
    const float* in = static_cast<const float*>(x);
    float* o = static_cast<float*>(out);
    for (; i < hi; ++i) o[i] = mix(uint32_t(i), seed) >= threshold ? in[i] * scale : 0.0f;
  }
}

}  // namespace

extern "C" {

// x, out: n contiguous elements, dtype 0 = fp32, 2 = bf16 (fast.py's numbering). out may alias x.
void qlora_dropout(const void* x, void* out, int64_t n, int dtype, uint32_t threshold, float scale, uint32_t seed,
                   int nthreads) {
  const int64_t chunk = int64_t(1) << 16;  // multiple of 16: every chunk but the last is all vector body
  const int64_t nchunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= kParallelMin && nthreads > 1)
  for (int64_t c = 0; c < nchunks; ++c)
    dropout_range(x, out, c * chunk, c * chunk + chunk < n ? c * chunk + chunk : n, dtype, threshold, scale, seed);
}

}  // extern "C"
