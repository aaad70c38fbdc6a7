// Blockwise 4-bit quantization and dequantization on CPU, called from qlora/quant/fast/quantize.py through
// ctypes (one library with the other csrc/*.cpp files).
//
// The definition is the PyTorch reference in qlora/quant/blockwise.py; these kernels are
// bit-identical to it because every float operation here is the same IEEE fp32 operation the
// reference performs, in the same order. So: build with -ffp-contract=off (an FMA would skip a
// rounding) and never with -ffast-math (NaN and subnormals must behave as in PyTorch).
//
// Each op has an AVX-512 version (16 fp32 lanes) and one over simd16.h's 16-lane type (AVX2,
// NEON, or scalar in the portable build); both are per-element, so every build gives the
// reference's bits. Threads (OpenMP, the runtime torch already loaded) split the work by blocks.
// No torch headers: the library stays a few seconds to build and independent of the torch ABI.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "quant.h"
#include "simd16.h"

namespace {

constexpr float kTiny = 1e-38f;  // blockwise._TINY: clamp for a zero absmax

#ifdef QLORA_AVX512
// 16 codes (one per 32-bit lane) -> 8 bytes, element 2j in the high nibble of byte j.
inline void store_packed(uint8_t* p, __m512i codes, int64_t nbytes) {
  const __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(codes, 4), _mm512_srli_epi64(codes, 32));
  _mm_mask_storeu_epi8(p, __mmask16((1u << std::min<int64_t>(nbytes, 8)) - 1), _mm512_cvtepi64_epi8(pairs));
}

#endif  // QLORA_AVX512

// A 4-bit codebook prepared for quantization: 15 sorted midpoints and sorted-index -> code.
struct Code4 {
  const float* bounds;
  const uint8_t* order;
#ifdef QLORA_AVX512
  __m512 b0, b1, b3;  // bounds[i], bounds[i + 1], bounds[i + 3] in lane i (+inf past the end)
  __m512 b7;          // bounds[7] in every lane
  __m512i vorder;
  bool sorted;  // order is the identity (NF4)
  Code4(const float* b, const uint8_t* o) : bounds(b), order(o), sorted(true) {
    alignas(64) float fb[3][16];
    alignas(64) int32_t io[16];
    const int shift[3] = {0, 1, 3};
    for (int k = 0; k < 16; ++k) {
      for (int j = 0; j < 3; ++j) fb[j][k] = k + shift[j] < 15 ? b[k + shift[j]] : INFINITY;
      io[k] = o[k];
      sorted = sorted && o[k] == k;
    }
    b0 = _mm512_load_ps(fb[0]), b1 = _mm512_load_ps(fb[1]), b3 = _mm512_load_ps(fb[2]);
    b7 = _mm512_set1_ps(b[7]);
    vorder = _mm512_load_si512(io);
  }
#else
  v16::Code4Search search;
  Code4(const float* b, const uint8_t* o) : bounds(b), order(o), search(v16::code4_search(b, o)) {}
#endif
};

#ifdef QLORA_AVX512
// code4() for 16 lanes: the same 4-step binary search, branchless, with the bounds in registers.
// No clamp: every bound lies strictly inside (-1, 1) (quantize.py checks), so a value beyond +-1
// lands where +-1 does, and NaN still passes every bound (_CMP_NGE_UQ is true for NaN).
inline __m512i code16(__m512 s, const Code4& c) {
  __m512i i = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(c.b7, s, _CMP_NGE_UQ), _mm512_set1_epi32(8));
  __mmask16 m = _mm512_cmp_ps_mask(_mm512_permutexvar_ps(i, c.b3), s, _CMP_NGE_UQ);
  i = _mm512_mask_add_epi32(i, m, i, _mm512_set1_epi32(4));
  m = _mm512_cmp_ps_mask(_mm512_permutexvar_ps(i, c.b1), s, _CMP_NGE_UQ);
  i = _mm512_mask_add_epi32(i, m, i, _mm512_set1_epi32(2));
  m = _mm512_cmp_ps_mask(_mm512_permutexvar_ps(i, c.b0), s, _CMP_NGE_UQ);
  i = _mm512_mask_add_epi32(i, m, i, _mm512_set1_epi32(1));
  return c.sorted ? i : _mm512_permutexvar_epi32(i, c.vorder);
}
#endif

// One 4-bit block: full blocks multiply by the fp32 reciprocal of absmax, the ragged last block
// divides by its clamped absmax and stores that clamped value (bitsandbytes does both).
template <int D> void quantize4_block(const void* x, int64_t start, int64_t len, bool ragged, const Code4& c,
                                      uint8_t* packed, float* absmax_out) {
  const float am = block_absmax<D>(x, start, len);
  const float clamped = am < kTiny ? kTiny : am;  // torch.clamp(min=): a NaN stays
  *absmax_out = ragged ? clamped : am;
  const float inv = 1.0f / clamped;
  uint8_t* p = packed + start / 2;
#ifdef QLORA_AVX512
  const __m512 vinv = _mm512_set1_ps(inv), vam = _mm512_set1_ps(clamped);
  for (int64_t i = 0; i < len; i += 16) {
    const __m512 v = load16<D>(x, start + i, lanes(len - i));  // absent lanes: 0 / am = 0
    const __m512 s = ragged ? _mm512_div_ps(v, vam) : _mm512_mul_ps(v, vinv);
    store_packed(p + i / 2, code16(s, c), (len - i + 1) / 2);
  }
#else
  for (int64_t i = 0; i < len; i += 16) {
    const v16::F16 v = v16::load_upto<D>(x, start + i, len - i);  // absent lanes: 0 / am = 0
    const v16::F16 s = ragged ? v16::div(v, v16::set1(clamped)) : v16::mul(v, v16::set1(inv));
    if (len - i >= 16) {
      v16::pack_codes4(s, c.search, p + i / 2);
      continue;
    }
    uint8_t bytes[8];  // odd count: the last low nibble is the code of 0.0, as the reference pads
    v16::pack_codes4(s, c.search, bytes);
    std::memcpy(p + i / 2, bytes, size_t(len - i + 1) / 2);
  }
#endif
}

template <int D> int64_t quantize4(const void* x, int64_t n, int64_t bs, const float* bounds, const uint8_t* order,
                                   uint8_t* packed, float* absmax, int nthreads) {
  const int64_t nblocks = (n + bs - 1) / bs;
  int64_t bad = nblocks;  // first block whose absmax is NaN/Inf (the caller raises), else nblocks
  const Code4 c(bounds, order);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= kParallelMin && nthreads > 1) reduction(min : bad)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * bs, len = std::min(bs, n - start);
    quantize4_block<D>(x, start, len, len < bs, c, packed, absmax + b);
    if (nonfinite(absmax[b])) bad = std::min(bad, b);
  }
  return bad;
}

#ifdef QLORA_AVX512_BF16
// 32 values of a block at once through the hardware bf16 conversion. It flushes subnormals, so it
// is used only where no product can be subnormal (nor NaN): there it rounds exactly as
// float_to_bf16 (to nearest even). 16 bytes give the even elements (high nibbles) and the odd
// ones (low nibbles) in two vectors; one 16-bit permute interleaves them. Returns the count written.
inline int64_t dequantize4_bf16_fast(const uint8_t* p, int64_t len, float scale, float min_code, __m512 vc,
                                     uint16_t* out) {
  const float a = std::abs(scale);
  if (!(a * min_code >= 2 * FLT_MIN && a <= FLT_MAX)) return 0;
  alignas(64) static const int16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(order);
  const __m512 vs = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i / 2)));
    const __m512 even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), vc), vs);
    const __m512 odd = _mm512_mul_ps(_mm512_permutexvar_ps(bytes, vc), vs);  // the permute reads the low nibble
    const __m512bh r = _mm512_cvtne2ps_pbh(odd, even);                       // lanes 0..15 from `even`
    _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(interleave, (__m512i)r));
  }
  return i;
}
#endif

// The smallest nonzero |code| (FLT_MAX when there is none).
inline float min_nonzero_code(const float* code) {
  float m = FLT_MAX;
  for (int k = 0; k < 16; ++k)
    if (code[k] != 0.0f) m = std::min(m, std::abs(code[k]));
  return m;
}

// One block over simd16.h: its 16 possible values code[c] * scale (the product each element
// computes, then stored as D rounds it) looked up by code, 32 codes at a time.
template <int D> void dequantize4_block(const uint8_t* p, int64_t len, float scale, const float* code, uint8_t* out) {
  constexpr int W = v16::kElemBytes<D>;
  const v16::F16 values = v16::mul(v16::load(code), v16::set1(scale));
  uint16_t half[16];
  if constexpr (W == 2) v16::store_as<D>(half, 0, values);
  const v16::Planes<W> t = [&] {
    if constexpr (W == 4) return v16::planes4(values);
    else return v16::planes2(half);
  }();
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) v16::lookup32(p + i / 2, t, out + i * W);
  if (i < len) {  // the last codes of a ragged block, without reading or writing past them
    uint8_t codes[16] = {}, values_out[32 * W];
    std::memcpy(codes, p + i / 2, size_t(len - i + 1) / 2);
    v16::lookup32(codes, t, values_out);
    std::memcpy(out + i * W, values_out, size_t(len - i) * W);
  }
}

template <int D> void dequantize4(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                                  const float* nested_absmax, const float* code8, float offset, int64_t nested_bs,
                                  const float* code, int64_t n, int64_t bs, void* out, int nthreads) {
  const int64_t nblocks = (n + bs - 1) / bs;
  [[maybe_unused]] const float min_code = min_nonzero_code(code);  // for the bf16 fast path
#ifdef QLORA_AVX512
  const __m512 vc = _mm512_loadu_ps(code);
#endif
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= kParallelMin && nthreads > 1)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * bs, len = std::min(bs, n - start);
    const float scale = block_scale(absmax, qabsmax, nested_absmax, code8, offset, nested_bs, b);
    const uint8_t* p = packed + start / 2;
#ifdef QLORA_AVX512
    const __m512 vs = _mm512_set1_ps(scale);
    int64_t i = 0;
#ifdef QLORA_AVX512_BF16
    if constexpr (D == kBF16) i = dequantize4_bf16_fast(p, len, scale, min_code, vc, static_cast<uint16_t*>(out) + start);
#endif
    for (; i < len; i += 16) {
      const __m512 v = _mm512_mul_ps(unpack16(p + i / 2, std::min<int64_t>((len - i + 1) / 2, 8), vc), vs);
      store16<D>(out, start + i, v, lanes(len - i));
    }
#else
    dequantize4_block<D>(p, len, scale, code, static_cast<uint8_t*>(out) + start * v16::kElemBytes<D>);
#endif
  }
}

}  // namespace

extern "C" {

// x: n elements of `dtype`; packed: (n+1)/2 bytes; absmax: ceil(n/bs) floats.
// Returns the first block with a NaN/Inf absmax, or ceil(n/bs) when all are finite.
int64_t qlora_quantize_4bit(const void* x, int dtype, int64_t n, int64_t bs, const float* bounds,
                            const uint8_t* order, uint8_t* packed, float* absmax, int nthreads) {
  if (dtype == kF16) return quantize4<kF16>(x, n, bs, bounds, order, packed, absmax, nthreads);
  if (dtype == kBF16) return quantize4<kBF16>(x, n, bs, bounds, order, packed, absmax, nthreads);
  return quantize4<kF32>(x, n, bs, bounds, order, packed, absmax, nthreads);
}

// out[i] = code[q_i] * scale[i / bs] in fp32, stored as `dtype`. The scales are `absmax` (fp32),
// or, when qabsmax is not null, code8[qabsmax[b]] * nested_absmax[b / nested_bs] + offset.
void qlora_dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                           const float* nested_absmax, const float* code8, float offset, int64_t nested_bs,
                           const float* code, int64_t n, int64_t bs, void* out, int dtype, int nthreads) {
  if (dtype == kF16)
    dequantize4<kF16>(packed, absmax, qabsmax, nested_absmax, code8, offset, nested_bs, code, n, bs, out, nthreads);
  else if (dtype == kBF16)
    dequantize4<kBF16>(packed, absmax, qabsmax, nested_absmax, code8, offset, nested_bs, code, n, bs, out, nthreads);
  else
    dequantize4<kF32>(packed, absmax, qabsmax, nested_absmax, code8, offset, nested_bs, code, n, bs, out, nthreads);
}

}  // extern "C"
