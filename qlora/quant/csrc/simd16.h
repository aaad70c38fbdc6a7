// A 16-lane fp32 vector (v16::F16) and 16-lane uint32 vector (v16::U16), for the kernels' paths
// that are not AVX-512: written once over these, they run on AVX2 + FMA + F16C (simd16_avx2.h),
// AArch64 NEON (simd16_neon.h) or plain C++ (simd16_scalar.h, also QLORA_PORTABLE), and the three
// give the same bits.
//
// 16 lanes because the AVX-512 kernels have 16: a sum keeps 16 partial sums (element j of a loop
// in lane j % 16), fused where the AVX-512 code fuses, and ends in _mm512_reduce_add_ps's tree,
// so these kernels follow the AVX-512 kernels' order. That order is the definition of every
// summing kernel's result in the portable build too.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

#if !defined(QLORA_PORTABLE) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "simd16_avx2.h"
#elif !defined(QLORA_PORTABLE) && defined(__aarch64__) && defined(__ARM_NEON)
#include "simd16_neon.h"
#else
#include "simd16_scalar.h"
#endif

namespace {
namespace v16 {

// exp on 16 lanes (common.h's exp_poly; AVX-512: exp16): scalef(p, n) = p · 2^n is two exact-
// or-once-rounded products, p · 2^n1 (exact: p is in [0.7, 1.42] and n1 = clamp(n, -125, 127))
// times 2^(n - n1), the only rounding (to a subnormal or to inf), as scalef rounds once.
inline F16 exp(F16 x) {
  using namespace exp_poly;
  x = max(min(x, set1(kMax)), set1(kMin));
  const F16 n = round_even(mul(x, set1(kLog2e)));
  F16 r = fnma(n, set1(kLn2Hi), x);
  r = fnma(n, set1(kLn2Lo), r);
  F16 p = set1(kC6);
  for (const float c : kPoly) p = fma(p, r, set1(c));
  const F16 n1 = min(max(n, set1(-125.0f)), set1(127.0f));
  return mul(mul(p, pow2i(n1)), pow2i(sub(n, n1)));
}

// ---- by element type (quant.h's Dtype numbering: 0 fp32, 1 fp16, 2 bf16) ------------------------

template <int D> constexpr size_t kElemBytes = D == 0 ? 4 : 2;

template <int D> inline F16 load_as(const void* x, int64_t i) {
  if constexpr (D == 0) return load(static_cast<const float*>(x) + i);
  if constexpr (D == 1) return load_f16(static_cast<const uint16_t*>(x) + i);
  if constexpr (D == 2) return load_bf16(static_cast<const uint16_t*>(x) + i);
}
template <int D> inline void store_as(void* out, int64_t i, F16 v) {
  if constexpr (D == 0) store(static_cast<float*>(out) + i, v);
  if constexpr (D == 1) store_f16(static_cast<uint16_t*>(out) + i, v);
  if constexpr (D == 2) store_bf16(static_cast<uint16_t*>(out) + i, v);
}
// The first n < 16 elements, the other lanes zero.
template <int D> inline F16 load_part(const void* x, int64_t i, int64_t n) {
  alignas(64) uint8_t buf[64] = {};
  std::memcpy(buf, static_cast<const uint8_t*>(x) + i * kElemBytes<D>, size_t(n) * kElemBytes<D>);
  return load_as<D>(buf, 0);
}
template <int D> inline void store_part(void* out, int64_t i, F16 v, int64_t n) {
  alignas(64) uint8_t buf[64];
  store_as<D>(buf, 0, v);
  std::memcpy(static_cast<uint8_t*>(out) + i * kElemBytes<D>, buf, size_t(n) * kElemBytes<D>);
}
// load_as or load_part, by how many of the 16 exist
template <int D> inline F16 load_upto(const void* x, int64_t i, int64_t n) {
  return n >= 16 ? load_as<D>(x, i) : load_part<D>(x, i, n);
}
template <int D> inline void store_upto(void* out, int64_t i, F16 v, int64_t n) {
  if (n >= 16) store_as<D>(out, i, v);
  else store_part<D>(out, i, v, n);
}

inline F16 load_upto(const float* x, int64_t n) { return load_upto<0>(x, 0, n); }
inline F16 load_bf16_upto(const uint16_t* x, int64_t n) { return load_upto<2>(x, 0, n); }
inline void store_upto(float* out, F16 v, int64_t n) { store_upto<0>(out, 0, v, n); }
inline void store_bf16_upto(uint16_t* out, F16 v, int64_t n) { store_upto<2>(out, 0, v, n); }

}  // namespace v16
}  // namespace
