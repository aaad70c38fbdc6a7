// Helpers shared by the kernel files: one definition of the bf16 rounding, of a Double-Quantized
// block scale, of the exp polynomial's constants, of which instruction set a build uses, and of
// the 16-lane AVX-512 conversions and exp.
//
// Instruction sets, chosen at compile time by the target (fast/library.py: -march=native, or
// QLORA_CPU_TARGET): AVX-512 kernels where the target has AVX-512 (QLORA_AVX512; decode's bf16 dot
// products with AVX512-BF16, QLORA_GEMV_BF16); everything else is written once over the 16-lane
// type of simd16.h, whose AVX2 (+FMA, F16C), NEON and scalar versions give the same bits.
// QLORA_PORTABLE forces the scalar versions (the definition the tests compare the others with).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(QLORA_PORTABLE)
#define QLORA_AVX512 1
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    !defined(QLORA_PORTABLE) && defined(__AVX512BF16__)
#define QLORA_AVX512_BF16 1  // hardware fp32 -> bf16 conversion (vcvtne2ps2bf16)
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && !defined(QLORA_PORTABLE)
#define QLORA_GEMV_BF16 1  // decode's bf16 dot products (vdpbf16ps)
#endif

// The training ops (fused_cpu.cpp, train_cpu.cpp) use threads from this many elements up: torch's own
// elementwise grain is 32k, and they run between torch ops that use all threads anyway (unlike
// quant.h's layer-sized calls).
constexpr int64_t kElementwiseParallelMin = int64_t(1) << 16;

// exp(x) = 2^n · p(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts, the first exact in
// 16 bits so n · hi is exact), p the degree-6 Taylor polynomial (|r| <= ln 2 / 2: ~1 ulp). x is
// clamped first: below -104 the result is 0, above 89 it is inf, in every version.
namespace exp_poly {
constexpr float kMax = 89.0f, kMin = -104.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-06f;
constexpr float kC6 = 1.0f / 720;  // then p = p * r + c for each c of kPoly
constexpr float kPoly[6] = {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
}  // namespace exp_poly

namespace {

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// fp32 -> bf16, round to nearest even, as c10::BFloat16 (a NaN becomes the canonical 0x7fc0).
inline uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7fc0;
  const uint32_t u = bits_of(f);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t h) { return float_of(uint32_t(h) << 16); }

// fp16 <-> fp32 as c10::Half does it (M. Dukhan's FP16 library): exact widening, RNE narrowing.
inline float half_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
  return float_of(sign | (two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized)));
}

inline uint16_t float_to_half(float f) {
  float base = (std::abs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_of(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_of(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// Short names for the kernels' scalar paths.
inline float bf(uint16_t h) { return bf16_to_float(h); }
inline uint16_t to_bf(float f) { return float_to_bf16(f); }

// The scale of 4-bit block b: absmax[b], or with Double Quantization (qabsmax not null)
// code8[qabsmax[b]] * nested_absmax[b / nested_bs] + offset.
inline float block_scale(const float* absmax, const uint8_t* qabsmax, const float* nested_absmax,
                         const float* code8, float offset, int64_t nested_bs, int64_t b) {
  if (qabsmax == nullptr) return absmax[b];
  const float s = code8[qabsmax[b]] * nested_absmax[b / nested_bs];  // Double Quantization, then
  return s + offset;                                                  // + offset as a second rounding
}

#ifdef QLORA_AVX512
// 16 lanes of float_to_bf16, in integers (the hardware conversion would flush subnormals).
inline __m256i to_bf16_16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// 16 bf16 values from p, widened to fp32 (exact).
inline __m512 load_bf16_16(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Round 16 lanes to bf16 and back: the value a bf16 tensor op would store.
inline __m512 round_bf16_16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_16(v)), 16));
}

// exp on 16 lanes (the constants above); scalef handles over- and underflow.
inline __m512 exp16(__m512 x) {
  using namespace exp_poly;
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(kMax)), _mm512_set1_ps(kMin));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kC6);
  for (const float c : kPoly) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
#endif

}  // namespace
