// The 16-lane operations of simd16.h on AVX2 + FMA + F16C: two 8-lane registers per vector, each
// lane the same IEEE operation as simd16_scalar.h's (the definition). Included by simd16.h only.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {
namespace v16 {

constexpr const char* kIsa = "avx2";
constexpr bool kVector = true;

struct F16 { __m256 a, b; };   // lanes 0-7, 8-15
struct U16 { __m256i a, b; };

inline __m256 ps(__m256i v) { return _mm256_castsi256_ps(v); }
inline __m256i si(__m256 v) { return _mm256_castps_si256(v); }
inline __m128i load8b(const void* p) { return _mm_loadl_epi64(static_cast<const __m128i*>(p)); }
inline __m128i load16b(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

inline F16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F16 set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline F16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, F16 v) { _mm256_storeu_ps(p, v.a), _mm256_storeu_ps(p + 8, v.b); }

inline __m256 bf16x8(const uint16_t* p) { return ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load16b(p)), 16)); }
inline F16 load_bf16(const uint16_t* p) { return {bf16x8(p), bf16x8(p + 8)}; }
// simd16_scalar.h's even/odd lanes: each 32-bit lane holds an even element (low half: shift it up)
// and an odd one (high half: mask), so 16 bf16 widen in 3 uops and no shuffle (load_bf16: 6, 4 on
// the shuffle port)
inline F16 load_bf16_eo(const uint16_t* p) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {ps(_mm256_slli_epi32(w, 16)), ps(_mm256_and_si256(w, _mm256_set1_epi32(int(0xffff0000u))))};
}
inline F16 from_eo(F16 v) {
  const __m256 lo = _mm256_unpacklo_ps(v.a, v.b), hi = _mm256_unpackhi_ps(v.a, v.b);  // 0-3 | 8-11, 4-7 | 12-15
  return {_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31)};
}

// float_to_bf16 in 32-bit lanes, in integers (round to nearest even; NaN -> 0x7fc0)
inline __m256i bf16_bits8(__m256 v) {
  const __m256i u = si(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  return si(_mm256_blendv_ps(ps(r), ps(_mm256_set1_epi32(0x7fc0)), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
inline void store_bf16(uint16_t* p, F16 v) {
  const __m256i w = _mm256_packus_epi32(bf16_bits8(v.a), bf16_bits8(v.b));  // a0-3 b0-3 | a4-7 b4-7
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(w, 0xD8));
}
inline F16 round_bf16(F16 v) {
  return {ps(_mm256_slli_epi32(bf16_bits8(v.a), 16)), ps(_mm256_slli_epi32(bf16_bits8(v.b), 16))};
}

inline F16 load_f16(const uint16_t* p) { return {_mm256_cvtph_ps(load16b(p)), _mm256_cvtph_ps(load16b(p + 8))}; }
// vcvtps2ph rounds as float_to_half; a NaN keeps payload bits there, so NaN lanes are redone.
inline void store_f16_8(uint16_t* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) == 0) return;
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  for (int l = 0; l < 8; ++l)
    if (f[l] != f[l]) p[l] = float_to_half(f[l]);
}
inline void store_f16(uint16_t* p, F16 v) { store_f16_8(p, v.a), store_f16_8(p + 8, v.b); }

inline __m256 i8x8(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load8b(p))); }
inline F16 load_i8(const int8_t* p) { return {i8x8(p), i8x8(p + 8)}; }

inline F16 add(F16 x, F16 y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
inline F16 sub(F16 x, F16 y) { return {_mm256_sub_ps(x.a, y.a), _mm256_sub_ps(x.b, y.b)}; }
inline F16 mul(F16 x, F16 y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
inline F16 div(F16 x, F16 y) { return {_mm256_div_ps(x.a, y.a), _mm256_div_ps(x.b, y.b)}; }
inline F16 fma(F16 x, F16 y, F16 z) { return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }
inline F16 fnma(F16 x, F16 y, F16 z) { return {_mm256_fnmadd_ps(x.a, y.a, z.a), _mm256_fnmadd_ps(x.b, y.b, z.b)}; }
inline F16 min(F16 x, F16 y) { return {_mm256_min_ps(x.a, y.a), _mm256_min_ps(x.b, y.b)}; }
inline F16 max(F16 x, F16 y) { return {_mm256_max_ps(x.a, y.a), _mm256_max_ps(x.b, y.b)}; }
inline F16 round_even(F16 x) {
  constexpr int kMode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(x.a, kMode), _mm256_round_ps(x.b, kMode)};
}
inline __m256 pow2i8(__m256 n) {
  return ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline F16 pow2i(F16 n) { return {pow2i8(n.a), pow2i8(n.b)}; }

// _mm512_reduce_add_ps's tree (see simd16_scalar.h)
inline float reduce_add(F16 v) {
  const __m256 t3 = _mm256_add_ps(v.b, v.a);
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_add_ss(t8, _mm_shuffle_ps(t8, t8, 1)));
}
inline float reduce_max(F16 v) {
  const __m256 t3 = _mm256_max_ps(v.b, v.a);
  const __m128 t6 = _mm_max_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_max_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_max_ss(t8, _mm_shuffle_ps(t8, t8, 1)));
}

inline U16 bits(F16 v) { return {si(v.a), si(v.b)}; }
inline F16 floats(U16 u) { return {ps(u.a), ps(u.b)}; }
inline U16 uset1(uint32_t x) { return {_mm256_set1_epi32(int(x)), _mm256_set1_epi32(int(x))}; }
inline U16 iota(uint32_t base) {
  const __m256i b = _mm256_set1_epi32(int(base)), step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return {_mm256_add_epi32(b, step), _mm256_add_epi32(b, _mm256_add_epi32(step, _mm256_set1_epi32(8)))};
}
inline U16 uadd(U16 x, U16 y) { return {_mm256_add_epi32(x.a, y.a), _mm256_add_epi32(x.b, y.b)}; }
inline U16 uxor(U16 x, U16 y) { return {_mm256_xor_si256(x.a, y.a), _mm256_xor_si256(x.b, y.b)}; }
inline U16 uand(U16 x, U16 y) { return {_mm256_and_si256(x.a, y.a), _mm256_and_si256(x.b, y.b)}; }
inline U16 umullo(U16 x, U16 y) { return {_mm256_mullo_epi32(x.a, y.a), _mm256_mullo_epi32(x.b, y.b)}; }
template <int N> inline U16 usrli(U16 x) { return {_mm256_srli_epi32(x.a, N), _mm256_srli_epi32(x.b, N)}; }
inline U16 umax(U16 x, U16 y) { return {_mm256_max_epu32(x.a, y.a), _mm256_max_epu32(x.b, y.b)}; }
inline U16 uge(U16 x, U16 y) {  // no unsigned compare in AVX2: x >= y iff max(x, y) == x
  return {_mm256_cmpeq_epi32(_mm256_max_epu32(x.a, y.a), x.a), _mm256_cmpeq_epi32(_mm256_max_epu32(x.b, y.b), x.b)};
}
inline uint32_t ureduce_max(U16 x) {
  alignas(32) uint32_t u[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(u), _mm256_max_epu32(x.a, x.b));
  uint32_t m = u[0];
  for (int l = 1; l < 8; ++l) m = u[l] > m ? u[l] : m;
  return m;
}
inline F16 and_mask(F16 v, U16 m) { return {_mm256_and_ps(v.a, ps(m.a)), _mm256_and_ps(v.b, ps(m.b))}; }

// ---- 4-bit codes ------------------------------------------------------------------------------

#if defined(__znver1__)
// Zen 1 splits 256-bit operations in two and takes 3 uops for vpermps: there the codebook is four
// byte planes (plane j: byte j of each entry), looked up with pshufb on 128-bit halves and zipped
// back into floats (gemv4 measured 0.20 vs 0.35 ns per weight). Where vpermps is one uop and
// shuffles share one port (Intel), the two permutes below are fewer uops. The values are the same.
struct Codebook { __m128i p[4]; };
inline Codebook codebook(const float* code) {
  const __m128i ctrl = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m128i q[4];  // entries 4i..4i+3, bytes grouped by plane: 4 x (4 bytes of plane j)
  for (int i = 0; i < 4; ++i) q[i] = _mm_shuffle_epi8(load16b(code + 4 * i), ctrl);
  const __m128i lo = _mm_unpacklo_epi32(q[0], q[1]), hi = _mm_unpackhi_epi32(q[0], q[1]);
  const __m128i lo2 = _mm_unpacklo_epi32(q[2], q[3]), hi2 = _mm_unpackhi_epi32(q[2], q[3]);
  return {{_mm_unpacklo_epi64(lo, lo2), _mm_unpackhi_epi64(lo, lo2), _mm_unpacklo_epi64(hi, hi2),
           _mm_unpackhi_epi64(hi, hi2)}};
}
// code[idx[l]] for 16 byte indices
inline F16 lookup16(const Codebook& t, __m128i idx) {
  const __m128i p0 = _mm_shuffle_epi8(t.p[0], idx), p1 = _mm_shuffle_epi8(t.p[1], idx);
  const __m128i p2 = _mm_shuffle_epi8(t.p[2], idx), p3 = _mm_shuffle_epi8(t.p[3], idx);
  const __m128i a = _mm_unpacklo_epi8(p0, p1), b = _mm_unpackhi_epi8(p0, p1);
  const __m128i c = _mm_unpacklo_epi8(p2, p3), d = _mm_unpackhi_epi8(p2, p3);
  return {ps(_mm256_set_m128i(_mm_unpackhi_epi16(a, c), _mm_unpacklo_epi16(a, c))),
          ps(_mm256_set_m128i(_mm_unpackhi_epi16(b, d), _mm_unpacklo_epi16(b, d)))};
}
inline F16 unpack_natural(const uint8_t* p, const Codebook& t) {
  const __m128i b = load8b(p), m = _mm_set1_epi8(0x0F);
  return lookup16(t, _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m)));
}
inline F16 unpack_split(const uint8_t* p, const Codebook& t) {
  const __m128i b = load8b(p), m = _mm_set1_epi8(0x0F);
  return lookup16(t, _mm_unpacklo_epi64(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m)));
}
#else
struct Codebook { __m256 lo, hi; };  // entries 0-7, 8-15
inline Codebook codebook(const float* code) { return {_mm256_loadu_ps(code), _mm256_loadu_ps(code + 8)}; }

// code[idx] for 8 lanes: the permutes read the index's low 3 bits; bit 3, moved to the sign bit of
// `sel`, picks the half.
inline __m256 lookup8(const Codebook& t, __m256i idx, __m256i sel) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx), _mm256_permutevar8x32_ps(t.hi, idx), ps(sel));
}
inline F16 unpack_natural(const uint8_t* p, const Codebook& t) {
  const __m128i b = load8b(p), m = _mm_set1_epi8(0x0F);
  const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
  const __m256i i0 = _mm256_cvtepu8_epi32(codes), i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8));
  return {lookup8(t, i0, _mm256_slli_epi32(i0, 28)), lookup8(t, i1, _mm256_slli_epi32(i1, 28))};
}
// Whole bytes in 32-bit lanes: the high nibble is index bits 4-6 (shifted down) and sign-bit 7
// (shifted up by 24), the low nibble bits 0-2 as they are and bit 3 (shifted up by 28).
inline F16 unpack_split(const uint8_t* p, const Codebook& t) {
  const __m256i w = _mm256_cvtepu8_epi32(load8b(p));
  return {lookup8(t, _mm256_srli_epi32(w, 4), _mm256_slli_epi32(w, 24)), lookup8(t, w, _mm256_slli_epi32(w, 28))};
}
#endif

// A 4-bit block's 16 possible output values (W bytes each) as W byte planes (plane j: byte j of
// each value, in both 128-bit lanes), looked up by code with one pshufb per plane: fewer and
// cheaper shuffles than two vpermps and a blend per 8 values.
template <int W> struct Planes { __m256i p[W]; };
inline Planes<4> planes4(F16 v) {
  const __m256i ctrl = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // qword j: byte j of 8 values
  const __m256i x = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(si(v.a), ctrl), order);
  const __m256i y = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(si(v.b), ctrl), order);
  const __m256i u = _mm256_unpacklo_epi64(x, y), w = _mm256_unpackhi_epi64(x, y);  // planes 0 | 2, 1 | 3
  return {{_mm256_permute2x128_si256(u, u, 0x00), _mm256_permute2x128_si256(w, w, 0x00),
           _mm256_permute2x128_si256(u, u, 0x11), _mm256_permute2x128_si256(w, w, 0x11)}};
}
inline Planes<2> planes2(const uint16_t* v) {
  const __m256i ctrl = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i x = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)), ctrl);
  return {{_mm256_permute4x64_epi64(x, _MM_SHUFFLE(2, 0, 2, 0)), _mm256_permute4x64_epi64(x, _MM_SHUFFLE(3, 1, 3, 1))}};
}
// 16 bytes -> the values of their 32 codes, in element order (unpacks work within 128-bit lanes:
// lane 0 holds codes 0-15, lane 1 codes 16-31, until the last permutes).
template <int W> inline void lookup32(const uint8_t* p, const Planes<W>& t, uint8_t* out) {
  const __m128i b = load16b(p), m = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m), lo = _mm_and_si128(b, m);
  const __m256i idx = _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
  __m256i* o = reinterpret_cast<__m256i*>(out);
  const __m256i p0 = _mm256_shuffle_epi8(t.p[0], idx), p1 = _mm256_shuffle_epi8(t.p[1], idx);
  const __m256i a = _mm256_unpacklo_epi8(p0, p1), b2 = _mm256_unpackhi_epi8(p0, p1);  // 0-7 | 16-23, 8-15 | 24-31
  if constexpr (W == 2) {
    _mm256_storeu_si256(o, _mm256_permute2x128_si256(a, b2, 0x20));
    _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(a, b2, 0x31));
  } else {
    const __m256i p2 = _mm256_shuffle_epi8(t.p[2], idx), p3 = _mm256_shuffle_epi8(t.p[3], idx);
    const __m256i c = _mm256_unpacklo_epi8(p2, p3), d = _mm256_unpackhi_epi8(p2, p3);
    const __m256i e0 = _mm256_unpacklo_epi16(a, c), e1 = _mm256_unpackhi_epi16(a, c);    // 0-3 | 16-19, 4-7 | 20-23
    const __m256i e2 = _mm256_unpacklo_epi16(b2, d), e3 = _mm256_unpackhi_epi16(b2, d);  // 8-11 | 24-27, 12-15 | 28-31
    _mm256_storeu_si256(o, _mm256_permute2x128_si256(e0, e1, 0x20));
    _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(e2, e3, 0x20));
    _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(e0, e1, 0x31));
    _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(e2, e3, 0x31));
  }
}

// simd16_scalar.h's search, branchless: step 1 compares with bounds[7], step 2 with bounds[3] or
// [11], steps 3 and 4 look the bound up by index (i / 4 into b1 b5 b9 b13, i / 2 into b0 b2 .. b14).
struct Code4Search {
  __m256 b7, b3, b11, t1, t0;
  __m256i order_lo, order_hi;
  bool sorted;  // order is the identity (NF4)
};
inline Code4Search code4_search(const float* b, const uint8_t* o) {
  Code4Search c;
  c.b7 = _mm256_set1_ps(b[7]), c.b3 = _mm256_set1_ps(b[3]), c.b11 = _mm256_set1_ps(b[11]);
  c.t1 = _mm256_setr_ps(b[1], b[5], b[9], b[13], b[1], b[5], b[9], b[13]);
  c.t0 = _mm256_setr_ps(b[0], b[2], b[4], b[6], b[8], b[10], b[12], b[14]);
  c.order_lo = _mm256_setr_epi32(o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]);
  c.order_hi = _mm256_setr_epi32(o[8], o[9], o[10], o[11], o[12], o[13], o[14], o[15]);
  c.sorted = true;
  for (int k = 0; k < 16; ++k) c.sorted = c.sorted && o[k] == k;
  return c;
}
// _CMP_NGE_UQ: !(bound >= s), true for NaN
inline __m256i step(__m256i i, __m256 bound, __m256 s, int add) {
  return _mm256_add_epi32(i, _mm256_and_si256(si(_mm256_cmp_ps(bound, s, _CMP_NGE_UQ)), _mm256_set1_epi32(add)));
}
inline __m256i codes8(__m256 s, const Code4Search& c) {
  const __m256 m1 = _mm256_cmp_ps(c.b7, s, _CMP_NGE_UQ);
  __m256i i = _mm256_and_si256(si(m1), _mm256_set1_epi32(8));
  i = step(i, _mm256_blendv_ps(c.b3, c.b11, m1), s, 4);
  i = step(i, _mm256_permutevar8x32_ps(c.t1, _mm256_srli_epi32(i, 2)), s, 2);
  i = step(i, _mm256_permutevar8x32_ps(c.t0, _mm256_srli_epi32(i, 1)), s, 1);
  if (c.sorted) return i;
  return si(_mm256_blendv_ps(ps(_mm256_permutevar8x32_epi32(c.order_lo, i)),
                             ps(_mm256_permutevar8x32_epi32(c.order_hi, i)), ps(_mm256_slli_epi32(i, 28))));
}
// 16 codes -> 8 bytes: 16-bit lanes, then one multiply-add per pair (16 · even + odd).
inline void pack_codes4(F16 s, const Code4Search& c, uint8_t* out) {
  const __m256i w = _mm256_packus_epi32(codes8(s.a, c), codes8(s.b, c));  // 0-3 8-11 | 4-7 12-15
  const __m256i d = _mm256_madd_epi16(w, _mm256_set1_epi32(0x00010010));   // bytes 0 1 4 5 | 2 3 6 7
  const __m256i lo = _mm256_shuffle_epi8(d, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                             -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1,
                                                             -1, -1, -1, -1));
  const __m128i r = _mm_unpacklo_epi16(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), r);
}

// ---- 8-bit codes ------------------------------------------------------------------------------

// cvtt turns NaN into INT_MIN, which the max sends to index 0; then 16 byte loads (vpgatherdd
// took longer on Zen 1, the machine measured).
inline void lut_bytes16(F16 t, const uint8_t* lut, int32_t top, uint8_t* out) {
  const __m256i zero = _mm256_setzero_si256(), hi = _mm256_set1_epi32(top);
  alignas(32) int32_t idx[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(idx), _mm256_min_epi32(_mm256_max_epi32(_mm256_cvttps_epi32(t.a), zero), hi));
  _mm256_store_si256(reinterpret_cast<__m256i*>(idx + 8), _mm256_min_epi32(_mm256_max_epi32(_mm256_cvttps_epi32(t.b), zero), hi));
  for (int l = 0; l < 16; ++l) out[l] = lut[idx[l]];
}
// table[idx[l]]: 16 plain loads (vgatherdps took 1.8x as long on Zen 1, the machine measured)
inline F16 gather16(const float* table, const uint8_t* i) {
  return {_mm256_setr_ps(table[i[0]], table[i[1]], table[i[2]], table[i[3]], table[i[4]], table[i[5]], table[i[6]],
                         table[i[7]]),
          _mm256_setr_ps(table[i[8]], table[i[9]], table[i[10]], table[i[11]], table[i[12]], table[i[13]],
                         table[i[14]], table[i[15]])};
}

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

}  // namespace v16
}  // namespace
