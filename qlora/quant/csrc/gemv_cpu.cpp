// The decode products (gemv.h) with fp32 FMAs over simd16.h, where there is no bf16 dot product:
// AVX2 + FMA, NEON, or scalar in the portable build (gemv_bf16_cpu.cpp has the AVX512-BF16 ones).
//
// The weights are the reference's fp32 values: 4-bit codes unpack to fp32 codebook entries, bf16
// and int8 widen exactly, and x is widened to fp32 once per call. The order of the sums is the
// definition of these results, byte-identical in the three builds:
//   gemv4 (4-bit W · x): per row and block, d = sum of code · x over the block in 16 lanes, fused;
//     8 bytes (16 weights) go to the lanes as unpacked: the 8 even elements, then the 8 odd ones
//     (x is rearranged once per call to match); then acc = d · block scale + acc, fused; the row is
//     reduce_add(acc) (simd16.h: _mm512_reduce_add_ps's tree).
//   gemv16 (bf16 W · x: LoRA's A, the output head): four accumulators over 64-element steps, then
//     16 at a time (the last zero-padded) into the first, fused; (a0 + a1) + (a2 + a3), reduced.
//   gemv8 (the int8 head screen): the same four over 64-element steps only, reduced, then each
//     remaining element's product added in turn: the AVX512-BF16 build's own order.
//   lora_b: per 16 outputs, four accumulators over the ranks (rank c into c % 4, those past the
//     last multiple of 4 into the first), fused; (a0 + a1) + (a2 + a3): the AVX512-BF16 order.
// gemv16 and lora_b load their bf16 operand in simd16.h's even/odd lanes (cheaper on AVX2) and put
// the lanes back in order before reducing or storing: the sums above, lane for lane.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "gemv.h"
#include "simd16.h"

#ifndef QLORA_GEMV_BF16

namespace qlora::gemv {

namespace {

thread_local std::vector<float> t_x4, t_x16;  // gemv4's and gemv16's fp32 x, per thread

// Rows at once in gemv4: they share the loads of x. 4 where 32 vector registers hold the partial
// sums (NEON), 2 with AVX2's 16.
#if defined(__aarch64__)
constexpr int kRows = 4;
#else
constexpr int kRows = 2;
#endif

// Rows o..o+R of W4 · x; the rows two groups ahead are prefetched (as gemv_bf16_cpu.cpp's).
template <int R>
inline void gemv4_rows(const QloraDecodeLinear& L, const float* xs, const v16::Codebook& cb, int64_t o,
                       Scales& scales, float* out) {
  const size_t row_bytes = size_t(L.k) / 2, block_bytes = size_t(L.bs) / 2, kb = size_t(L.k / L.bs);
  const size_t ahead = 2 * R * row_bytes;
  const uint8_t* codes = L.packed + size_t(o) * row_bytes;
  const float* s = scales.next_rows(R);  // (R, kb)
  v16::F16 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = v16::zero();
  for (size_t b = 0; b < kb; ++b) {
    v16::F16 d[R];
    for (int r = 0; r < R; ++r) d[r] = v16::zero();
    for (size_t at = b * block_bytes; at < (b + 1) * block_bytes; at += 32) {  // 64 weights a step
      for (int r = 0; r < R; ++r) v16::prefetch(codes + r * row_bytes + at + ahead);
      for (size_t q = at; q < at + 32; q += 8) {
        const v16::F16 xv = v16::load(xs + 2 * q);
        for (int r = 0; r < R; ++r) d[r] = v16::fma(v16::unpack_split(codes + r * row_bytes + q, cb), xv, d[r]);
      }
    }
    for (int r = 0; r < R; ++r) acc[r] = v16::fma(d[r], v16::set1(s[r * kb + b]), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = v16::reduce_add(acc[r]);
}

// x (bf16, k) as fp32 in `buf` (this thread's scratch), zero-padded to a multiple of 16, each 16
// as its 8 even elements, then its 8 odd ones: the order gemv4 unpacks codes in, and simd16.h's
// load_bf16_eo lanes, in which gemv16 and lora_b load their bf16 operand.
const float* widen_eo(const uint16_t* x, int64_t k, std::vector<float>& buf) {
  buf.assign(size_t((k + 15) / 16 * 16), 0.0f);
  float* out = buf.data();
  for (int64_t j = 0; j < k; j += 16)
    for (int64_t i = 0; i < 16 && j + i < k; ++i) out[j + (i % 2 == 0 ? i / 2 : 8 + i / 2)] = bf16_to_float(x[j + i]);
  return out;
}

// The first n < 16 bf16 of p, zero-padded, in even/odd lanes.
inline v16::F16 load_bf16_eo_part(const uint16_t* p, int64_t n) {
  alignas(32) uint16_t buf[16] = {};
  std::copy(p, p + n, buf);
  return v16::load_bf16_eo(buf);
}

// The whole 64-element steps of a row · x: four accumulators, a[i] takes elements 16i..16i+15 of
// each step (the AVX-512 kernels' order); `load(j)` gives the row's 16 values from j as fp32.
// Returns where the steps stopped.
template <class Load>
inline int64_t dot_steps(Load load, const float* x, int64_t k, v16::F16 a[4]) {
  int64_t j = 0;
  for (; j + 64 <= k; j += 64)
    for (int i = 0; i < 4; ++i) a[i] = v16::fma(load(j + 16 * i), v16::load(x + j + 16 * i), a[i]);
  return j;
}

inline v16::F16 add4(const v16::F16 a[4]) { return v16::add(v16::add(a[0], a[1]), v16::add(a[2], a[3])); }

// w (bf16) · x for x from widen_eo: every lane sums the elements the natural order's lane does, in
// the same order, and from_eo restores that lane order before the reduction.
float dot16(const uint16_t* w, int64_t k, const float* xeo) {
  v16::F16 a[4] = {v16::zero(), v16::zero(), v16::zero(), v16::zero()};
  int64_t j = dot_steps([&](int64_t at) { return v16::load_bf16_eo(w + at); }, xeo, k, a);
  for (; j < k; j += 16) {
    const v16::F16 wj = k - j >= 16 ? v16::load_bf16_eo(w + j) : load_bf16_eo_part(w + j, k - j);
    a[0] = v16::fma(wj, v16::load(xeo + j), a[0]);
  }
  return v16::reduce_add(v16::from_eo(add4(a)));
}

}  // namespace

const float* gemv4_input(const uint16_t* x, int64_t k) { return widen_eo(x, k, t_x4); }

void gemv4_range(const QloraDecodeLinear& L, const float* x, int64_t o0, int64_t o1, float* out) {
  const v16::Codebook cb = v16::codebook(L.code);
  Scales scales(L, o0);
  int64_t o = o0;
  for (; o + kRows <= o1; o += kRows) gemv4_rows<kRows>(L, x, cb, o, scales, out + o);
  for (; o < o1; ++o) gemv4_rows<1>(L, x, cb, o, scales, out + o);
}

void gemv16(const uint16_t* w, int64_t n, int64_t k, const uint16_t* x, float* out) {
  const float* xf = widen_eo(x, k, t_x16);
  for (int64_t o = 0; o < n; ++o) out[o] = dot16(w + o * k, k, xf);
}

float gemv16_row1(const uint16_t* w, int64_t k, const uint16_t* x) { return dot16(w, k, widen_eo(x, k, t_x16)); }

float gemv8_row(const int8_t* q, int64_t k, const float* x) {
  v16::F16 a[4] = {v16::zero(), v16::zero(), v16::zero(), v16::zero()};
  int64_t j = dot_steps([&](int64_t at) { return v16::load_i8(q + at); }, x, k, a);
  float s = v16::reduce_add(add4(a));
  for (; j < k; ++j) s += float(q[j]) * x[j];
  return s;
}

void lora_b(const uint16_t* b16, int64_t r, int64_t n, const float* xa, float* out) {
  for (int64_t o = 0; o < n; o += 16) {
    const uint16_t* b = b16 + o * r;  // this block: (r, 16)
    v16::F16 a0 = v16::zero(), a1 = a0, a2 = a0, a3 = a0;
    int64_t c = 0;
    for (; c + 4 <= r; c += 4) {  // outputs in even/odd lanes, back in order at the store
      a0 = v16::fma(v16::load_bf16_eo(b + c * 16), v16::set1(xa[c]), a0);
      a1 = v16::fma(v16::load_bf16_eo(b + c * 16 + 16), v16::set1(xa[c + 1]), a1);
      a2 = v16::fma(v16::load_bf16_eo(b + c * 16 + 32), v16::set1(xa[c + 2]), a2);
      a3 = v16::fma(v16::load_bf16_eo(b + c * 16 + 48), v16::set1(xa[c + 3]), a3);
    }
    for (; c < r; ++c) a0 = v16::fma(v16::load_bf16_eo(b + c * 16), v16::set1(xa[c]), a0);
    v16::store_upto(out + o, v16::from_eo(v16::add(v16::add(a0, a1), v16::add(a2, a3))), n - o);
  }
}

}  // namespace qlora::gemv

#endif  // !QLORA_GEMV_BF16
