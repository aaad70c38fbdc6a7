// What the quantization kernel files (quant4_cpu.cpp, quant8_cpu.cpp, gemm4_cpu.cpp) share: the
// element types, the threading threshold, and block absmax, in AVX-512 and over simd16.h.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "simd16.h"

namespace {

enum Dtype : int { kF32 = 0, kF16 = 1, kBF16 = 2 };  // same numbering as fast/quantize.py and simd16.h's load_as
// Below 2M elements (a quarter millisecond alone) one thread finishes: a team costs a wake-up, and
// on a busy machine a member that is not scheduled stalls the call for a whole time slice (20 ms
// measured on 2 shared cores, against 40 us for a 576x576 weight alone).
constexpr int64_t kParallelMin = int64_t(1) << 21;

#ifdef QLORA_AVX512

inline __mmask16 lanes(int64_t k) { return k >= 16 ? __mmask16(0xffff) : __mmask16((1u << k) - 1); }

template <int D> inline __m512 load16(const void* x, int64_t i, __mmask16 m) {
  if constexpr (D == kF32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(x) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + i);
  if constexpr (D == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int D> inline void store16(void* out, int64_t i, __m512 v, __mmask16 m) {
  if constexpr (D == kF32) {
    _mm512_mask_storeu_ps(static_cast<float*>(out) + i, m, v);
  } else if constexpr (D == kF16) {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + i, m, h);
  } else {  // float_to_bf16, 16 lanes at once
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), _mm512_set1_epi32(0x7fc0), r);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + i, m, _mm512_cvtepi32_epi16(r));
  }
}

template <int D> float absmax_simd(const void* x, int64_t start, int64_t len) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i m = _mm512_setzero_si512();
  for (int64_t i = 0; i < len; i += 16) {
    const __m512 v = load16<D>(x, start + i, lanes(len - i));
    m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_castps_si512(v), abs_mask));
  }
  return float_of(_mm512_reduce_max_epu32(m));
}

// 8 bytes -> 16 codebook values: each 64-bit lane takes one byte as (high nibble, whole byte);
// the permute reads only the low 4 bits of each index, so the whole byte stands for its low nibble.
inline __m512 unpack16(const uint8_t* p, int64_t nbytes, __m512 codebook) {
  const __m512i w = _mm512_cvtepu8_epi64(_mm_maskz_loadu_epi8(__mmask16((1u << nbytes) - 1), p));
  return _mm512_permutexvar_ps(_mm512_or_si512(_mm512_srli_epi64(w, 4), _mm512_slli_epi64(w, 32)), codebook);
}

#endif  // QLORA_AVX512

// max |x| of a block as fp32 bits: for non-negative floats the integer order is the float
// order, and Inf (0x7f800000) and NaN (above it) win, so a bad value survives into absmax.
template <int D> float absmax_v16(const void* x, int64_t start, int64_t len) {
  const v16::U16 abs_mask = v16::uset1(0x7fffffffu);
  v16::U16 m = v16::uset1(0);
  for (int64_t i = 0; i < len; i += 16)  // absent lanes load as 0
    m = v16::umax(m, v16::uand(v16::bits(v16::load_upto<D>(x, start + i, len - i)), abs_mask));
  return float_of(v16::ureduce_max(m));
}

template <int D> float block_absmax(const void* x, int64_t start, int64_t len) {
#ifdef QLORA_AVX512
  return absmax_simd<D>(x, start, len);
#else
  return absmax_v16<D>(x, start, len);
#endif
}

// Whether a block's absmax is NaN or Inf (the caller raises).
inline bool nonfinite(float absmax) { return (bits_of(absmax) & 0x7fffffffu) >= 0x7f800000u; }

}  // namespace
