// The 16-lane operations of simd16.h on AArch64 NEON: four 4-lane registers per vector, each lane
// the same IEEE operation as simd16_scalar.h's (the definition), x86's min/max NaN rules included.
// Built with -ffp-contract=off, which matters here: GCC's vmulq_f32 and vaddq_f32 are plain vector
// expressions it would otherwise fuse into an FMA. Included by simd16.h only.
#pragma once

#include <arm_neon.h>

#include <cstdint>
#include <cstring>

namespace {
namespace v16 {

constexpr const char* kIsa = "neon";
constexpr bool kVector = true;

struct F16 { float32x4_t v[4]; };  // lanes 0-3, 4-7, 8-11, 12-15
struct U16 { uint32x4_t v[4]; };

template <class Fn> inline F16 fmap(Fn f) { return {{f(0), f(1), f(2), f(3)}}; }
template <class Fn> inline U16 umap(Fn f) { return {{f(0), f(1), f(2), f(3)}}; }

inline F16 zero() { return fmap([](int) { return vdupq_n_f32(0.0f); }); }
inline F16 set1(float x) { return fmap([x](int) { return vdupq_n_f32(x); }); }
inline F16 load(const float* p) { return fmap([p](int q) { return vld1q_f32(p + 4 * q); }); }
inline void store(float* p, F16 v) {
  for (int q = 0; q < 4; ++q) vst1q_f32(p + 4 * q, v.v[q]);
}

inline F16 load_bf16(const uint16_t* p) {
  const uint16x8_t lo = vld1q_u16(p), hi = vld1q_u16(p + 8);
  return {{vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(lo), 16)), vreinterpretq_f32_u32(vshll_high_n_u16(lo, 16)),
           vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(hi), 16)), vreinterpretq_f32_u32(vshll_high_n_u16(hi, 16))}};
}
// simd16_scalar.h's even/odd lanes: vld2 splits the elements, zips join them again
inline F16 load_bf16_eo(const uint16_t* p) {
  const uint16x8x2_t eo = vld2q_u16(p);
  return {{vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(eo.val[0]), 16)),
           vreinterpretq_f32_u32(vshll_high_n_u16(eo.val[0], 16)),
           vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(eo.val[1]), 16)),
           vreinterpretq_f32_u32(vshll_high_n_u16(eo.val[1], 16))}};
}
inline F16 from_eo(F16 v) {
  return {{vzip1q_f32(v.v[0], v.v[2]), vzip2q_f32(v.v[0], v.v[2]), vzip1q_f32(v.v[1], v.v[3]),
           vzip2q_f32(v.v[1], v.v[3])}};
}
// float_to_bf16 in 32-bit lanes, in integers (round to nearest even; NaN -> 0x7fc0)
inline uint16x4_t bf16_bits4(float32x4_t v) {
  const uint32x4_t u = vreinterpretq_u32_f32(v);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
  const uint32x4_t r = vshrq_n_u32(vaddq_u32(u, vaddq_u32(lsb, vdupq_n_u32(0x7fff))), 16);
  return vmovn_u32(vbslq_u32(vceqq_f32(v, v), r, vdupq_n_u32(0x7fc0)));
}
inline void store_bf16(uint16_t* p, F16 v) {
  vst1q_u16(p, vcombine_u16(bf16_bits4(v.v[0]), bf16_bits4(v.v[1])));
  vst1q_u16(p + 8, vcombine_u16(bf16_bits4(v.v[2]), bf16_bits4(v.v[3])));
}
inline F16 round_bf16(F16 v) {
  return fmap([&](int q) { return vreinterpretq_f32_u32(vshll_n_u16(bf16_bits4(v.v[q]), 16)); });
}

inline F16 load_f16(const uint16_t* p) {
  return fmap([p](int q) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4 * q))); });
}
// fcvtn rounds as float_to_half; a NaN keeps payload bits there, so NaN lanes become
// float_to_half's (sign | 0x7e00).
inline void store_f16(uint16_t* p, F16 v) {
  for (int q = 0; q < 4; ++q) {
    const uint16x4_t h = vreinterpret_u16_f16(vcvt_f16_f32(v.v[q]));
    const uint16x4_t sign = vand_u16(vshrn_n_u32(vreinterpretq_u32_f32(v.v[q]), 16), vdup_n_u16(0x8000));
    const uint16x4_t nan = vorr_u16(sign, vdup_n_u16(0x7e00));
    vst1_u16(p + 4 * q, vbsl_u16(vmovn_u32(vceqq_f32(v.v[q], v.v[q])), h, nan));
  }
}
inline F16 load_i8(const int8_t* p) {
  const int8x16_t b = vld1q_s8(p);
  const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_high_s8(b);
  return {{vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), vcvtq_f32_s32(vmovl_high_s16(lo)),
           vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), vcvtq_f32_s32(vmovl_high_s16(hi))}};
}

inline F16 add(F16 x, F16 y) { return fmap([&](int q) { return vaddq_f32(x.v[q], y.v[q]); }); }
inline F16 sub(F16 x, F16 y) { return fmap([&](int q) { return vsubq_f32(x.v[q], y.v[q]); }); }
inline F16 mul(F16 x, F16 y) { return fmap([&](int q) { return vmulq_f32(x.v[q], y.v[q]); }); }
inline F16 div(F16 x, F16 y) { return fmap([&](int q) { return vdivq_f32(x.v[q], y.v[q]); }); }
inline F16 fma(F16 x, F16 y, F16 z) { return fmap([&](int q) { return vfmaq_f32(z.v[q], x.v[q], y.v[q]); }); }
inline F16 fnma(F16 x, F16 y, F16 z) { return fmap([&](int q) { return vfmsq_f32(z.v[q], x.v[q], y.v[q]); }); }
// x86's minps/maxps (NEON's fmin/fmax would return the NaN, and order -0 < +0)
inline float32x4_t min4(float32x4_t x, float32x4_t y) { return vbslq_f32(vcltq_f32(x, y), x, y); }
inline float32x4_t max4(float32x4_t x, float32x4_t y) { return vbslq_f32(vcgtq_f32(x, y), x, y); }
inline F16 min(F16 x, F16 y) { return fmap([&](int q) { return min4(x.v[q], y.v[q]); }); }
inline F16 max(F16 x, F16 y) { return fmap([&](int q) { return max4(x.v[q], y.v[q]); }); }
inline F16 round_even(F16 x) { return fmap([&](int q) { return vrndnq_f32(x.v[q]); }); }
inline F16 pow2i(F16 n) {
  return fmap([&](int q) {
    return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n.v[q]), vdupq_n_s32(127)), 23));
  });
}

// _mm512_reduce_add_ps's tree (see simd16_scalar.h)
inline float reduce_add(F16 v) {
  const float32x4_t t6 = vaddq_f32(vaddq_f32(v.v[3], v.v[1]), vaddq_f32(v.v[2], v.v[0]));
  const float32x2_t t8 = vadd_f32(vget_low_f32(t6), vget_high_f32(t6));
  return vget_lane_f32(t8, 0) + vget_lane_f32(t8, 1);
}
inline float reduce_max(F16 v) {
  const float32x4_t t6 = max4(max4(v.v[3], v.v[1]), max4(v.v[2], v.v[0]));
  const float32x2_t lo = vget_low_f32(t6), hi = vget_high_f32(t6);
  const float32x2_t t8 = vbsl_f32(vcgt_f32(lo, hi), lo, hi);
  const float a = vget_lane_f32(t8, 0), b = vget_lane_f32(t8, 1);
  return a > b ? a : b;
}

inline U16 bits(F16 v) { return umap([&](int q) { return vreinterpretq_u32_f32(v.v[q]); }); }
inline F16 floats(U16 u) { return fmap([&](int q) { return vreinterpretq_f32_u32(u.v[q]); }); }
inline U16 uset1(uint32_t x) { return umap([x](int) { return vdupq_n_u32(x); }); }
inline U16 iota(uint32_t base) {
  static const uint32_t kStep[4] = {0, 1, 2, 3};
  return umap([base](int q) { return vaddq_u32(vdupq_n_u32(base + 4u * q), vld1q_u32(kStep)); });
}
inline U16 uadd(U16 x, U16 y) { return umap([&](int q) { return vaddq_u32(x.v[q], y.v[q]); }); }
inline U16 uxor(U16 x, U16 y) { return umap([&](int q) { return veorq_u32(x.v[q], y.v[q]); }); }
inline U16 uand(U16 x, U16 y) { return umap([&](int q) { return vandq_u32(x.v[q], y.v[q]); }); }
inline U16 umullo(U16 x, U16 y) { return umap([&](int q) { return vmulq_u32(x.v[q], y.v[q]); }); }
template <int N> inline U16 usrli(U16 x) { return umap([&](int q) { return vshrq_n_u32(x.v[q], N); }); }
inline U16 umax(U16 x, U16 y) { return umap([&](int q) { return vmaxq_u32(x.v[q], y.v[q]); }); }
inline U16 uge(U16 x, U16 y) { return umap([&](int q) { return vcgeq_u32(x.v[q], y.v[q]); }); }
inline uint32_t ureduce_max(U16 x) { return vmaxvq_u32(vmaxq_u32(vmaxq_u32(x.v[0], x.v[1]), vmaxq_u32(x.v[2], x.v[3]))); }
inline F16 and_mask(F16 v, U16 m) {
  return fmap([&](int q) { return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v.v[q]), m.v[q])); });
}

// ---- 4-bit codes ------------------------------------------------------------------------------

// The codebook as four byte planes (plane j: byte j of each entry) for tbl lookups.
struct Codebook { uint8x16_t plane[4]; };
inline Codebook codebook(const float* code) {
  uint8_t b[4][16];
  for (int i = 0; i < 16; ++i) {
    uint32_t u;
    std::memcpy(&u, code + i, 4);
    for (int j = 0; j < 4; ++j) b[j][i] = uint8_t(u >> (8 * j));
  }
  return {{vld1q_u8(b[0]), vld1q_u8(b[1]), vld1q_u8(b[2]), vld1q_u8(b[3])}};
}
// code[idx[l]] for 16 byte indices: one tbl per byte plane, then the bytes zipped back into floats.
inline F16 lookup16(const Codebook& t, uint8x16_t idx) {
  const uint8x16_t b0 = vqtbl1q_u8(t.plane[0], idx), b1 = vqtbl1q_u8(t.plane[1], idx);
  const uint8x16_t b2 = vqtbl1q_u8(t.plane[2], idx), b3 = vqtbl1q_u8(t.plane[3], idx);
  const uint16x8_t lo01 = vreinterpretq_u16_u8(vzip1q_u8(b0, b1)), hi01 = vreinterpretq_u16_u8(vzip2q_u8(b0, b1));
  const uint16x8_t lo23 = vreinterpretq_u16_u8(vzip1q_u8(b2, b3)), hi23 = vreinterpretq_u16_u8(vzip2q_u8(b2, b3));
  return {{vreinterpretq_f32_u16(vzip1q_u16(lo01, lo23)), vreinterpretq_f32_u16(vzip2q_u16(lo01, lo23)),
           vreinterpretq_f32_u16(vzip1q_u16(hi01, hi23)), vreinterpretq_f32_u16(vzip2q_u16(hi01, hi23))}};
}
inline F16 unpack_natural(const uint8_t* p, const Codebook& t) {
  const uint8x8_t b = vld1_u8(p), hi = vshr_n_u8(b, 4), lo = vand_u8(b, vdup_n_u8(0x0F));
  return lookup16(t, vcombine_u8(vzip1_u8(hi, lo), vzip2_u8(hi, lo)));
}
inline F16 unpack_split(const uint8_t* p, const Codebook& t) {
  const uint8x8_t b = vld1_u8(p);
  return lookup16(t, vcombine_u8(vshr_n_u8(b, 4), vand_u8(b, vdup_n_u8(0x0F))));
}

// A 4-bit block's 16 possible output values (W bytes each) as W byte planes for tbl lookups.
template <int W> struct Planes { uint8x16_t p[W]; };
inline Planes<4> planes4(F16 v) {
  float f[16];
  store(f, v);
  const uint8x16x4_t t = vld4q_u8(reinterpret_cast<const uint8_t*>(f));  // de-interleaves the bytes
  return {{t.val[0], t.val[1], t.val[2], t.val[3]}};
}
inline Planes<2> planes2(const uint16_t* v) {
  const uint8x16x2_t t = vld2q_u8(reinterpret_cast<const uint8_t*>(v));
  return {{t.val[0], t.val[1]}};
}
// 16 bytes -> the values of their 32 codes, in element order: tbl per plane, interleaving stores.
template <int W> inline void lookup32(const uint8_t* p, const Planes<W>& t, uint8_t* out) {
  const uint8x16_t b = vld1q_u8(p), hi = vshrq_n_u8(b, 4), lo = vandq_u8(b, vdupq_n_u8(0x0F));
  const uint8x16_t idx[2] = {vzip1q_u8(hi, lo), vzip2q_u8(hi, lo)};
  for (int h = 0; h < 2; ++h) {
    if constexpr (W == 2) {
      vst2q_u8(out + 32 * h, (uint8x16x2_t{{vqtbl1q_u8(t.p[0], idx[h]), vqtbl1q_u8(t.p[1], idx[h])}}));
    } else {
      vst4q_u8(out + 64 * h, (uint8x16x4_t{{vqtbl1q_u8(t.p[0], idx[h]), vqtbl1q_u8(t.p[1], idx[h]),
                                            vqtbl1q_u8(t.p[2], idx[h]), vqtbl1q_u8(t.p[3], idx[h])}}));
    }
  }
}

// The sorted index as a count, the same number as simd16_scalar.h's binary search over sorted
// bounds: how many of the 15 fail bound >= s (all of them for NaN). Then a tbl maps it to the code.
struct Code4Search {
  float32x4_t b[15];
  uint8x16_t order;
};
inline Code4Search code4_search(const float* bounds, const uint8_t* order) {
  Code4Search c;
  for (int k = 0; k < 15; ++k) c.b[k] = vdupq_n_f32(bounds[k]);
  c.order = vld1q_u8(order);
  return c;
}
inline uint16x4_t count4(float32x4_t s, const Code4Search& c) {
  uint32x4_t n = vdupq_n_u32(15);
  for (int k = 0; k < 15; ++k) n = vaddq_u32(n, vcgeq_f32(c.b[k], s));  // a true compare is -1
  return vmovn_u32(n);
}
inline void pack_codes4(F16 s, const Code4Search& c, uint8_t* out) {
  const uint16x8_t lo = vcombine_u16(count4(s.v[0], c), count4(s.v[1], c));
  const uint16x8_t hi = vcombine_u16(count4(s.v[2], c), count4(s.v[3], c));
  const uint8x16_t codes = vqtbl1q_u8(c.order, vcombine_u8(vmovn_u16(lo), vmovn_u16(hi)));
  const uint8x16_t even = vuzp1q_u8(codes, codes), odd = vuzp2q_u8(codes, codes);
  vst1_u8(out, vorr_u8(vshl_n_u8(vget_low_u8(even), 4), vget_low_u8(odd)));
}

// ---- 8-bit codes ------------------------------------------------------------------------------

// fcvtzs truncates and sends NaN to 0; no gather on NEON, so 16 loads.
inline void lut_bytes16(F16 t, const uint8_t* lut, int32_t top, uint8_t* out) {
  int32_t idx[16];
  for (int q = 0; q < 4; ++q)
    vst1q_s32(idx + 4 * q, vminq_s32(vmaxq_s32(vcvtq_s32_f32(t.v[q]), vdupq_n_s32(0)), vdupq_n_s32(top)));
  for (int l = 0; l < 16; ++l) out[l] = lut[idx[l]];
}
inline F16 gather16(const float* table, const uint8_t* idx) {
  float f[16];
  for (int l = 0; l < 16; ++l) f[l] = table[idx[l]];
  return load(f);
}

inline void prefetch(const void* p) { __builtin_prefetch(p); }

}  // namespace v16
}  // namespace
