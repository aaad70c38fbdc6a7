// Seeded dropout on CPU, called from qlora/nn/dropout.py through ctypes (built into the same
// library as the other csrc/*.cpp; see qlora/quant/fast/library.py).
//
//   out[i] = keep(i) ? x[i] * scale : 0,   keep(i) = mix(i, seed) >= threshold
//
// The mask is a pure function of (element index, 32-bit seed): backward re-applies it to the
// gradient instead of storing it, and the PyTorch reference (dropout.keep_mask) computes the same
// bits on any device. mix() is MurmurHash3's 32-bit finaliser over a Weyl-sequence counter.
// torch's bernoulli_ spent 18% of a SmolLM2 training step drawing these masks; this is one pass.
// An AVX-512 version and one over simd16.h (AVX2, NEON, scalar): integer hashing and one fp32
// multiply per element, so every build gives the reference's bits.

#include <cstdint>

#include "common.h"  // float_to_bf16 (c10::BFloat16's rounding, so x * scale in bf16 equals torch's), AVX-512
#include "simd16.h"

namespace {

constexpr uint32_t kWeyl = 0x9E3779B9u, kMix1 = 0x85EBCA6Bu, kMix2 = 0xC2B2AE35u;  // MurmurHash3's fmix32

inline uint32_t mix(uint32_t i, uint32_t seed) {
  uint32_t h = (i * kWeyl) ^ seed;
  h ^= h >> 16;
  h *= kMix1;
  h ^= h >> 13;
  h *= kMix2;
  h ^= h >> 16;
  return h;
}

constexpr int64_t kParallelMin = int64_t(1) << 21;  // as in quant.h: small calls stay on one thread

#ifdef QLORA_AVX512
// 16 lanes of the same arithmetic: mix() in 32-bit integer lanes, the bf16 rounding in integers
// (the hardware conversion would flush subnormals), NaN -> 0x7FC0.
inline __m512i mix16(__m512i i, __m512i seed) {
  __m512i h = _mm512_xor_si512(_mm512_mullo_epi32(i, _mm512_set1_epi32(int(kWeyl))), seed);
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(int(kMix1)));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(int(kMix2)));
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
#else  // the same over simd16.h

inline v16::U16 mix16(v16::U16 i, v16::U16 seed) {
  using namespace v16;
  U16 h = uxor(umullo(i, uset1(kWeyl)), seed);
  h = uxor(h, usrli<16>(h));
  h = umullo(h, uset1(kMix1));
  h = uxor(h, usrli<13>(h));
  h = umullo(h, uset1(kMix2));
  return uxor(h, usrli<16>(h));
}

// Elements [lo, hi) 16 at a time; returns where it stopped. A dropped element is +0.0 (bf16 0x0000).
template <bool BF16>
int64_t dropout_simd(const void* x, void* out, int64_t lo, int64_t hi, uint32_t threshold, float scale, uint32_t seed) {
  const v16::U16 vseed = v16::uset1(seed), vthr = v16::uset1(threshold);
  const v16::F16 vs = v16::set1(scale);
  int64_t i = lo;
  for (; i + 16 <= hi; i += 16) {
    const v16::U16 keep = v16::uge(mix16(v16::iota(uint32_t(i)), vseed), vthr);
    if constexpr (BF16) {
      const v16::F16 v = v16::load_bf16(static_cast<const uint16_t*>(x) + i);
      v16::store_bf16(static_cast<uint16_t*>(out) + i, v16::and_mask(v16::mul(v, vs), keep));
    } else {
      const v16::F16 v = v16::load(static_cast<const float*>(x) + i);
      v16::store(static_cast<float*>(out) + i, v16::and_mask(v16::mul(v, vs), keep));
    }
  }
  return i;
}
#endif

// One contiguous range, vector body and scalar tail.
void dropout_range(const void* x, void* out, int64_t lo, int64_t hi, int dtype, uint32_t threshold, float scale,
                   uint32_t seed) {
  int64_t i = dtype == 2 ? dropout_simd<true>(x, out, lo, hi, threshold, scale, seed)
                         : dropout_simd<false>(x, out, lo, hi, threshold, scale, seed);
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

// x, out: n contiguous elements, dtype 0 = fp32, 2 = bf16 (quant.h's enum Dtype). out may alias x.
void qlora_dropout(const void* x, void* out, int64_t n, int dtype, uint32_t threshold, float scale, uint32_t seed,
                   int nthreads) {
  const int64_t chunk = int64_t(1) << 16;  // multiple of 16: every chunk but the last is all vector body
  const int64_t nchunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= kParallelMin && nthreads > 1)
  for (int64_t c = 0; c < nchunks; ++c)
    dropout_range(x, out, c * chunk, c * chunk + chunk < n ? c * chunk + chunk : n, dtype, threshold, scale, seed);
}

}  // extern "C"
