// The 16-lane operations of simd16.h in plain C++, one lane at a time: the definition the AVX2
// (simd16_avx2.h) and NEON (simd16_neon.h) versions reproduce bit for bit. Every lane operation is
// one IEEE fp32 operation (std::fma where the vector versions fuse; the library is built with
// -ffp-contract=off so nothing else is fused), so the compiler may vectorize these loops without
// changing a bit. Included by simd16.h only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {
namespace v16 {

constexpr const char* kIsa = "scalar";
constexpr bool kVector = false;

struct F16 { float v[16]; };     // 16 fp32 lanes
struct U16 { uint32_t v[16]; };  // 16 uint32 lanes (masks are all ones or zero)

template <class Fn> inline F16 fmap(Fn f) {
  F16 r;
  for (int l = 0; l < 16; ++l) r.v[l] = f(l);
  return r;
}
template <class Fn> inline U16 umap(Fn f) {
  U16 r;
  for (int l = 0; l < 16; ++l) r.v[l] = f(l);
  return r;
}

inline F16 zero() { return fmap([](int) { return 0.0f; }); }
inline F16 set1(float x) { return fmap([x](int) { return x; }); }
inline F16 load(const float* p) { return fmap([p](int l) { return p[l]; }); }
inline void store(float* p, F16 v) { std::memcpy(p, v.v, sizeof v.v); }
inline F16 load_bf16(const uint16_t* p) { return fmap([p](int l) { return bf16_to_float(p[l]); }); }
// 16 bf16 in "even/odd" lanes: lanes 0-7 hold elements 0, 2, .., 14, lanes 8-15 elements 1, 3, .., 15
// (AVX2 widens a pair of bf16 in one 32-bit lane with a shift and a mask, no shuffle); from_eo
// puts such lanes back in element order. Lane-wise sums over eo vectors, then from_eo, equal the
// same sums over load_bf16's lanes bit for bit.
inline F16 load_bf16_eo(const uint16_t* p) {
  return fmap([p](int l) { return bf16_to_float(p[l < 8 ? 2 * l : 2 * (l - 8) + 1]); });
}
inline F16 from_eo(F16 v) { return fmap([&v](int j) { return v.v[j % 2 == 0 ? j / 2 : 8 + j / 2]; }); }
inline void store_bf16(uint16_t* p, F16 v) {
  for (int l = 0; l < 16; ++l) p[l] = float_to_bf16(v.v[l]);
}
inline F16 round_bf16(F16 v) { return fmap([&v](int l) { return bf16_to_float(float_to_bf16(v.v[l])); }); }
inline F16 load_f16(const uint16_t* p) { return fmap([p](int l) { return half_to_float(p[l]); }); }
inline void store_f16(uint16_t* p, F16 v) {
  for (int l = 0; l < 16; ++l) p[l] = float_to_half(v.v[l]);
}
inline F16 load_i8(const int8_t* p) { return fmap([p](int l) { return float(p[l]); }); }

inline F16 add(F16 a, F16 b) { return fmap([&](int l) { return a.v[l] + b.v[l]; }); }
inline F16 sub(F16 a, F16 b) { return fmap([&](int l) { return a.v[l] - b.v[l]; }); }
inline F16 mul(F16 a, F16 b) { return fmap([&](int l) { return a.v[l] * b.v[l]; }); }
inline F16 div(F16 a, F16 b) { return fmap([&](int l) { return a.v[l] / b.v[l]; }); }
inline F16 fma(F16 a, F16 b, F16 c) { return fmap([&](int l) { return std::fma(a.v[l], b.v[l], c.v[l]); }); }
inline F16 fnma(F16 a, F16 b, F16 c) { return fmap([&](int l) { return std::fma(-a.v[l], b.v[l], c.v[l]); }); }
// x86's minps/maxps: the second operand when either is NaN (or both are zeros)
inline float min1(float a, float b) { return a < b ? a : b; }
inline float max1(float a, float b) { return a > b ? a : b; }
inline F16 min(F16 a, F16 b) { return fmap([&](int l) { return min1(a.v[l], b.v[l]); }); }
inline F16 max(F16 a, F16 b) { return fmap([&](int l) { return max1(a.v[l], b.v[l]); }); }
// to the nearest integer, ties to even (the default rounding mode)
inline F16 round_even(F16 a) { return fmap([&](int l) { return std::nearbyint(a.v[l]); }); }
// 2^n for integral n in [-126, 127]
inline F16 pow2i(F16 n) { return fmap([&](int l) { return float_of(uint32_t(int32_t(n.v[l]) + 127) << 23); }); }

// _mm512_reduce_add_ps's tree: upper 8 + lower 8, upper 4 + lower 4, then (0+2) + (1+3).
inline float reduce_add(F16 v) {
  float t3[8], t6[4];
  for (int i = 0; i < 8; ++i) t3[i] = v.v[8 + i] + v.v[i];
  for (int i = 0; i < 4; ++i) t6[i] = t3[4 + i] + t3[i];
  return (t6[0] + t6[2]) + (t6[1] + t6[3]);
}
// _mm512_reduce_max_ps's tree, with maxps' NaN and zero rules at every step.
inline float reduce_max(F16 v) {
  float t3[8], t6[4];
  for (int i = 0; i < 8; ++i) t3[i] = max1(v.v[8 + i], v.v[i]);
  for (int i = 0; i < 4; ++i) t6[i] = max1(t3[4 + i], t3[i]);
  return max1(max1(t6[0], t6[2]), max1(t6[1], t6[3]));
}

inline U16 bits(F16 v) { return umap([&](int l) { return bits_of(v.v[l]); }); }
inline F16 floats(U16 u) { return fmap([&](int l) { return float_of(u.v[l]); }); }
inline U16 uset1(uint32_t x) { return umap([x](int) { return x; }); }
inline U16 iota(uint32_t base) { return umap([base](int l) { return base + uint32_t(l); }); }
inline U16 uadd(U16 a, U16 b) { return umap([&](int l) { return a.v[l] + b.v[l]; }); }
inline U16 uxor(U16 a, U16 b) { return umap([&](int l) { return a.v[l] ^ b.v[l]; }); }
inline U16 uand(U16 a, U16 b) { return umap([&](int l) { return a.v[l] & b.v[l]; }); }
inline U16 umullo(U16 a, U16 b) { return umap([&](int l) { return a.v[l] * b.v[l]; }); }
template <int N> inline U16 usrli(U16 a) { return umap([&](int l) { return a.v[l] >> N; }); }
inline U16 umax(U16 a, U16 b) { return umap([&](int l) { return std::max(a.v[l], b.v[l]); }); }
inline U16 uge(U16 a, U16 b) { return umap([&](int l) { return a.v[l] >= b.v[l] ? ~0u : 0u; }); }
inline uint32_t ureduce_max(U16 a) { return *std::max_element(a.v, a.v + 16); }
inline F16 and_mask(F16 v, U16 m) { return floats(uand(bits(v), m)); }

// ---- 4-bit codes (element 2i in the high nibble of byte i) -------------------------------------

struct Codebook { float c[16]; };
inline Codebook codebook(const float* code) {
  Codebook t;
  std::memcpy(t.c, code, sizeof t.c);
  return t;
}
// 8 bytes -> the codebook values of their 16 codes, in element order.
inline F16 unpack_natural(const uint8_t* p, const Codebook& t) {
  return fmap([&](int l) { return t.c[l % 2 ? p[l / 2] & 0xF : p[l / 2] >> 4]; });
}
// 8 bytes -> the 8 even elements (high nibbles), then the 8 odd ones (low nibbles).
inline F16 unpack_split(const uint8_t* p, const Codebook& t) {
  return fmap([&](int l) { return t.c[l < 8 ? p[l] >> 4 : p[l - 8] & 0xF]; });
}

// A 4-bit block's 16 possible output values (W bytes each), looked up by code.
template <int W> struct Planes { uint8_t v[16][W]; };
inline Planes<4> planes4(F16 v) {
  Planes<4> t;
  std::memcpy(t.v, v.v, sizeof t.v);
  return t;
}
inline Planes<2> planes2(const uint16_t* v) {
  Planes<2> t;
  std::memcpy(t.v, v, sizeof t.v);
  return t;
}
// 16 bytes -> the values of their 32 codes, in element order.
template <int W> inline void lookup32(const uint8_t* p, const Planes<W>& t, uint8_t* out) {
  for (int i = 0; i < 16; ++i) {
    std::memcpy(out + 2 * i * W, t.v[p[i] >> 4], W);
    std::memcpy(out + (2 * i + 1) * W, t.v[p[i] & 0xF], W);
  }
}

// torch.bucketize over 15 sorted midpoints: the number of bounds b with
// !(b >= s), found in 4 steps; a NaN passes every bound. Then sorted index -> code.
struct Code4Search {
  const float* bounds;
  const uint8_t* order;
};
inline Code4Search code4_search(const float* bounds, const uint8_t* order) { return {bounds, order}; }
inline uint8_t code4_1(float s, const Code4Search& c) {
  int i = 0;
  if (!(c.bounds[i + 7] >= s)) i += 8;
  if (!(c.bounds[i + 3] >= s)) i += 4;
  if (!(c.bounds[i + 1] >= s)) i += 2;
  if (!(c.bounds[i] >= s)) i += 1;
  return c.order[i];
}
// The codes of 16 scaled values packed into 8 bytes.
inline void pack_codes4(F16 s, const Code4Search& c, uint8_t* out) {
  for (int j = 0; j < 8; ++j) out[j] = uint8_t(code4_1(s.v[2 * j], c) << 4 | code4_1(s.v[2 * j + 1], c));
}

// ---- 8-bit codes ------------------------------------------------------------------------------

// out[l] = lut[clamp(trunc(t[l]), 0, top)], a NaN (or t < 1) at index 0. t < 2^31.
inline void lut_bytes16(F16 t, const uint8_t* lut, int32_t top, uint8_t* out) {
  for (int l = 0; l < 16; ++l) out[l] = lut[t.v[l] >= 1.0f ? std::min(int32_t(t.v[l]), top) : 0];
}
// table[idx[l]] for 16 byte indices.
inline F16 gather16(const float* table, const uint8_t* idx) { return fmap([&](int l) { return table[idx[l]]; }); }

inline void prefetch(const void* p) { __builtin_prefetch(p); }

}  // namespace v16
}  // namespace
