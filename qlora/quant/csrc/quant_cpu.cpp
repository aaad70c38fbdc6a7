// Blockwise 4-bit and 8-bit quantization on CPU, called from qlora/quant/fast.py through ctypes.
//
// The definition is the PyTorch reference in qlora/quant/blockwise.py; these kernels are
// bit-identical to it because every float operation here is the same IEEE fp32 operation the
// reference performs, in the same order. So: build with -ffp-contract=off (an FMA would skip a
// rounding) and never with -ffast-math (NaN and subnormals must behave as in PyTorch).
//
// Each op has a portable scalar version and, when the compiler targets AVX-512, a SIMD version
// (16 fp32 lanes). Threads (OpenMP, the runtime torch already loaded) split the work by blocks.
// No torch headers: the library stays a few seconds to build and independent of the torch ABI.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cfloat>
#include <cstring>

#include "common.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    !defined(QLORA_PORTABLE)
#define QLORA_AVX512 1
#include <immintrin.h>
#ifdef __AVX512BF16__
#define QLORA_AVX512_BF16 1  // hardware fp32 -> bf16 conversion (vcvtne2ps2bf16)
#endif
#endif

namespace {

enum Dtype : int { kF32 = 0, kF16 = 1, kBF16 = 2 };  // same numbering as fast.py
constexpr float kTiny = 1e-38f;      // blockwise._TINY: clamp for a zero absmax
constexpr int64_t kLutSize = 65536;  // blockwise._LUT_SIZE
// Below 2M elements (a quarter millisecond alone) one thread finishes: a team costs a wake-up, and
// on a busy machine a member that is not scheduled stalls the call for a whole time slice (20 ms
// measured on 2 shared cores, against 40 us for a 576x576 weight alone).
constexpr int64_t kParallelMin = int64_t(1) << 21;


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

template <int D> inline float load1(const void* x, int64_t i) {
  if constexpr (D == kF32) return static_cast<const float*>(x)[i];
  if constexpr (D == kF16) return half_to_float(static_cast<const uint16_t*>(x)[i]);
  return float_of(uint32_t(static_cast<const uint16_t*>(x)[i]) << 16);
}

template <int D> inline void store1(void* out, int64_t i, float v) {
  if constexpr (D == kF32) static_cast<float*>(out)[i] = v;
  if constexpr (D == kF16) static_cast<uint16_t*>(out)[i] = float_to_half(v);
  if constexpr (D == kBF16) static_cast<uint16_t*>(out)[i] = float_to_bf16(v);
}

// torch.clamp(s, -1, 1): keeps a NaN.
inline float clamp1(float s) { return s > 1.0f ? 1.0f : (s < -1.0f ? -1.0f : s); }

// torch.bucketize(s, bounds, right=False) over 15 sorted midpoints = the number of bounds b with
// !(b >= s): a tie goes to the lower code and a NaN past every bound (index 15). Then the code.
inline uint8_t code4(float s, const float* bounds, const uint8_t* order) {
  int i = 0;
  if (!(bounds[i + 7] >= s)) i += 8;
  if (!(bounds[i + 3] >= s)) i += 4;
  if (!(bounds[i + 1] >= s)) i += 2;
  if (!(bounds[i] >= s)) i += 1;
  return order[i];
}

// max |x| of a block as fp32 bits: for non-negative floats the integer order is the float
// order, and Inf (0x7f800000) and NaN (above it) win, so a bad value survives into absmax.
template <int D> float absmax_scalar(const void* x, int64_t start, int64_t len) {
  uint32_t m = 0;
  for (int64_t i = start; i < start + len; ++i) m = std::max(m, bits_of(load1<D>(x, i)) & 0x7fffffffu);
  return float_of(m);
}

// The index into the 65,536-bin table, in the reference's order of fp32 operations. A NaN (a
// zero in a block whose absmax is subnormal: 0 * inf) goes to bin 0, as in bitsandbytes.
inline int32_t lut_index(float v) {
  const float t = ((v + 1.0f) * 0.5f) * float(kLutSize - 1) + 0.5f;
  if (!(t >= 1.0f)) return 0;  // also catches NaN, whose conversion to int would be undefined
  return std::min<int32_t>(int32_t(t), kLutSize - 1);  // t >= 1: truncation is floor, as Tensor.to(int32)
}

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

// 16 codes (one per 32-bit lane) -> 8 bytes, element 2j in the high nibble of byte j.
inline void store_packed(uint8_t* p, __m512i codes, int64_t nbytes) {
  const __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(codes, 4), _mm512_srli_epi64(codes, 32));
  _mm_mask_storeu_epi8(p, __mmask16((1u << std::min<int64_t>(nbytes, 8)) - 1), _mm512_cvtepi64_epi8(pairs));
}

// 8 bytes -> 16 codebook values: each 64-bit lane takes one byte as (high nibble, whole byte);
// the permute reads only the low 4 bits of each index, so the whole byte stands for its low nibble.
inline __m512 unpack16(const uint8_t* p, int64_t nbytes, __m512 codebook) {
  const __m512i w = _mm512_cvtepu8_epi64(_mm_maskz_loadu_epi8(__mmask16((1u << nbytes) - 1), p));
  return _mm512_permutexvar_ps(_mm512_or_si512(_mm512_srli_epi64(w, 4), _mm512_slli_epi64(w, 32)), codebook);
}

#endif  // QLORA_AVX512

template <int D> float block_absmax(const void* x, int64_t start, int64_t len) {
#ifdef QLORA_AVX512
  return absmax_simd<D>(x, start, len);
#else
  return absmax_scalar<D>(x, start, len);
#endif
}

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
  Code4(const float* b, const uint8_t* o) : bounds(b), order(o) {}
#endif
};

#ifdef QLORA_AVX512
// code4() for 16 lanes: the same 4-step binary search, branchless, with the bounds in registers.
// No clamp: every bound lies strictly inside (-1, 1) (fast.py checks), so a value beyond +-1
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
  for (int64_t i = 0; i < len; i += 2) {
    const float a = load1<D>(x, start + i);
    const float b = i + 1 < len ? load1<D>(x, start + i + 1) : 0.0f;  // odd count: pad with 0.0
    const float sa = ragged ? a / clamped : a * inv, sb = ragged ? b / clamped : b * inv;
    p[i / 2] = uint8_t(code4(clamp1(sa), c.bounds, c.order) << 4 | code4(clamp1(sb), c.bounds, c.order));
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
    if ((bits_of(absmax[b]) & 0x7fffffffu) >= 0x7f800000u) bad = std::min(bad, b);
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
    for (int64_t i = 0; i < len; ++i) {
      const uint8_t byte = p[i / 2];
      store1<D>(out, start + i, code[i % 2 ? byte & 0xF : byte >> 4] * scale);
    }
#endif
  }
}


// ---- 4-bit matrix times a few rows: out (M, n_out) = x (M, k) · Wᵀ, fp32 -------------------------
// For decoding (M = 1: one token, or a few sequences): the weight is read once, as 4-bit codes, for
// all M rows, where dequantize-then-matmul writes and re-reads a 16-bit copy of it. Each weight is
// code · block scale in fp32 (the dequantized value before any 16-bit rounding); the dot products
// accumulate in fp32, 16 lanes per row, in an order that differs from a BLAS matmul's.
// Needs k % bs == 0 and bs % 16 == 0 (a block never straddles two rows); fast.py checks.
template <int M>
void gemm4_rows(const float* x, int64_t k, const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                const float* nested_absmax, const float* code8, float offset, int64_t nested_bs, const float* code,
                int64_t bs, int64_t o0, int64_t o1, float* out, int64_t ldo) {
#ifdef QLORA_AVX512
  const __m512 vc = _mm512_loadu_ps(code);
  for (int64_t o = o0; o < o1; ++o) {
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    const int64_t row = o * k;
    for (int64_t j0 = 0; j0 < k; j0 += bs) {
      const __m512 vs = _mm512_set1_ps(block_scale(absmax, qabsmax, nested_absmax, code8, offset, nested_bs, (row + j0) / bs));
      for (int64_t j = j0; j < j0 + bs; j += 16) {
        const __m512 w = _mm512_mul_ps(unpack16(packed + (row + j) / 2, 8, vc), vs);
        for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * k + j), acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) out[m * ldo + o] = _mm512_reduce_add_ps(acc[m]);
  }
#else
  for (int64_t o = o0; o < o1; ++o) {
    float acc[M] = {};
    const int64_t row = o * k;
    for (int64_t j0 = 0; j0 < k; j0 += bs) {
      const float scale = block_scale(absmax, qabsmax, nested_absmax, code8, offset, nested_bs, (row + j0) / bs);
      for (int64_t j = j0; j < j0 + bs; ++j) {
        const uint8_t byte = packed[(row + j) / 2];
        const float w = code[(row + j) % 2 ? byte & 0xF : byte >> 4] * scale;
        for (int m = 0; m < M; ++m) acc[m] += w * x[m * k + j];
      }
    }
    for (int m = 0; m < M; ++m) out[m * ldo + o] = acc[m];
  }
#endif
}

}  // namespace

extern "C" {

// 1 when this build uses the AVX-512 kernels, 0 for the portable scalar ones.
int qlora_simd(void) {
#ifdef QLORA_AVX512
  return 1;
#else
  return 0;
#endif
}

// Ask for 2 MiB pages over the 2 MiB-aligned interior of a fresh output buffer: otherwise the
// first write takes a page fault per 4 KiB, which on a VM can cost more than the kernel itself.
void qlora_advise_hugepages(void* p, int64_t nbytes) {
#ifdef MADV_HUGEPAGE
  const uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t a = (uintptr_t(p) + huge - 1) & ~(huge - 1), e = (uintptr_t(p) + uintptr_t(nbytes)) & ~(huge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p, (void)nbytes;
#endif
}

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

// 8-bit blockwise (bitsandbytes' CPU semantics, see blockwise.quantize_8bit_ref). x: n fp32;
// lut: the 65,536-entry table plus 3 bytes of padding (a 32-bit gather reads 4 bytes).
// Returns the first block with a NaN/Inf absmax, or ceil(n/bs).
int64_t qlora_quantize_8bit(const float* x, int64_t n, int64_t bs, const uint8_t* lut, uint8_t* q, float* absmax,
                            int nthreads) {
  const int64_t nblocks = (n + bs - 1) / bs;
  int64_t bad = nblocks;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= kParallelMin && nthreads > 1) reduction(min : bad)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * bs, len = std::min(bs, n - start);
    const float am = block_absmax<kF32>(x, start, len);
    absmax[b] = am;
    if ((bits_of(am) & 0x7fffffffu) >= 0x7f800000u) bad = std::min(bad, b);
    if (am == 0.0f) {  // an all-zero block codes to 0 (not to the code of 0.0)
      std::memset(q + start, 0, size_t(len));
      continue;
    }
    const float inv = am > 0.0f ? 1.0f / am : 0.0f;
#ifdef QLORA_AVX512
    const __m512 vinv = _mm512_set1_ps(inv), one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 m = lanes(len - i);
      __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + start + i), vinv);
      v = _mm512_max_ps(_mm512_set1_ps(-1.0f), _mm512_min_ps(one, v));
      v = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(v, one), half), _mm512_set1_ps(65535.0f)), half);
      // cvtt turns NaN into INT_MIN, which the max sends to bin 0 (see lut_index)
      const __m512i idx = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvttps_epi32(v), _mm512_setzero_si512()),
                                           _mm512_set1_epi32(kLutSize - 1));
      const __m512i g = _mm512_i32gather_epi32(idx, lut, 1);  // low byte of each lane is lut[idx]
      _mm_mask_storeu_epi8(q + start + i, m, _mm512_cvtepi32_epi8(g));
    }
#else
    for (int64_t i = start; i < start + len; ++i) q[i] = lut[lut_index(clamp1(x[i] * inv))];
#endif
  }
  return bad;
}

// out[i] = code[q[i]] * absmax[i / bs] in fp32 (code: 256 entries).
void qlora_dequantize_8bit(const uint8_t* q, const float* absmax, const float* code, int64_t n, int64_t bs, float* out,
                           int nthreads) {
  const int64_t nblocks = (n + bs - 1) / bs;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= kParallelMin && nthreads > 1)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * bs, len = std::min(bs, n - start);
    const float scale = absmax[b];
#ifdef QLORA_AVX512
    const __m512 vs = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 m = lanes(len - i);
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, q + start + i));
      _mm512_mask_storeu_ps(out + start + i, m, _mm512_mul_ps(_mm512_i32gather_ps(idx, code, 4), vs));
    }
#else
    for (int64_t i = start; i < start + len; ++i) out[i] = code[q[i]] * scale;
#endif
  }
}

// out (m, n_out) fp32 = x (m, k) fp32 · W(n_out, k)ᵀ with W 4-bit (scales as in qlora_dequantize_4bit).
void qlora_gemm_4bit(const float* x, int64_t m, int64_t k, const uint8_t* packed, const float* absmax,
                     const uint8_t* qabsmax, const float* nested_absmax, const float* code8, float offset,
                     int64_t nested_bs, const float* code, int64_t n_out, int64_t bs, float* out, int nthreads) {
  // One thread, no OpenMP region: decode calls this per layer per token, often from a server's
  // handler thread, and with an (even inactive) OpenMP region there `qlora serve` sometimes ended
  // in std::terminate at exit (~1 in 7 SIGTERMs mid-stream). One pass over the weight serves up
  // to 8 rows of x.
  const int64_t chunk = 16;
  const int64_t nchunks = (n_out + chunk - 1) / chunk;
  (void)nthreads;  // single-threaded: see below
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t o0 = c * chunk, o1 = std::min(n_out, o0 + chunk);
    for (int64_t r = 0; r < m;) {
      const float* xr = x + r * k;
      float* outr = out + r * n_out;
      const int64_t left = m - r;
      if (left >= 8) {
        gemm4_rows<8>(xr, k, packed, absmax, qabsmax, nested_absmax, code8, offset, nested_bs, code, bs, o0, o1, outr, n_out);
        r += 8;
      } else if (left >= 4) {
        gemm4_rows<4>(xr, k, packed, absmax, qabsmax, nested_absmax, code8, offset, nested_bs, code, bs, o0, o1, outr, n_out);
        r += 4;
      } else if (left >= 2) {
        gemm4_rows<2>(xr, k, packed, absmax, qabsmax, nested_absmax, code8, offset, nested_bs, code, bs, o0, o1, outr, n_out);
        r += 2;
      } else {
        gemm4_rows<1>(xr, k, packed, absmax, qabsmax, nested_absmax, code8, offset, nested_bs, code, bs, o0, o1, outr, n_out);
        r += 1;
      }
    }
  }
}

}  // extern "C"
