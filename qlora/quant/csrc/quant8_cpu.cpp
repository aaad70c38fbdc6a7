// Blockwise 8-bit quantization and dequantization on CPU (the optimizer states; bitsandbytes' CPU
// semantics, see blockwise.quantize_8bit_ref), called from qlora/quant/fast/quantize.py through ctypes; and
// what the library says about itself (which instruction set it uses).
//
// Bit-identical to the reference for the reasons quant4_cpu.cpp gives: an AVX-512 version and one
// over simd16.h (AVX2, NEON, scalar), both per-element.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "quant.h"
#include "simd16.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace {

constexpr int64_t kLutSize = 65536;  // blockwise._LUT_SIZE

// One block of qlora_quantize_8bit over simd16.h: the reference's index into the 65,536-bin table,
// ((clamp(x / absmax, -1, 1) + 1) * 0.5) * 65535 + 0.5, truncated; a NaN (a zero in a block whose
// absmax is subnormal: 0 * inf) goes to bin 0, as in bitsandbytes.
inline void quantize8_block(const float* x, int64_t len, float inv, const uint8_t* lut, uint8_t* q) {
  const v16::F16 vinv = v16::set1(inv), one = v16::set1(1.0f), half = v16::set1(0.5f);
  for (int64_t i = 0; i < len; i += 16) {
    v16::F16 v = v16::mul(v16::load_upto(x + i, len - i), vinv);
    v = v16::max(v16::set1(-1.0f), v16::min(one, v));  // torch.clamp keeps a NaN: minps/maxps' second operand
    v = v16::add(v16::mul(v16::mul(v16::add(v, one), half), v16::set1(float(kLutSize - 1))), half);
    if (len - i >= 16) {
      v16::lut_bytes16(v, lut, kLutSize - 1, q + i);
      continue;
    }
    uint8_t bytes[16];
    v16::lut_bytes16(v, lut, kLutSize - 1, bytes);
    std::memcpy(q + i, bytes, size_t(len - i));
  }
}

inline void dequantize8_block(const uint8_t* q, int64_t len, float scale, const float* code, float* out) {
  const v16::F16 vs = v16::set1(scale);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) v16::store(out + i, v16::mul(v16::gather16(code, q + i), vs));
  if (i < len) {
    uint8_t idx[16] = {};
    std::memcpy(idx, q + i, size_t(len - i));
    v16::store_upto(out + i, v16::mul(v16::gather16(code, idx), vs), len - i);
  }
}

}  // namespace

extern "C" {

// 1 when this build uses the AVX-512 quantization kernels (else simd16.h's: see qlora_isa).
int qlora_simd(void) {
#ifdef QLORA_AVX512
  return 1;
#else
  return 0;
#endif
}

// The instruction set of this build's kernels: "avx512-bf16" (AVX-512 with decode's bf16 dot
// products), "avx512", or simd16.h's "avx2" (AVX2 + FMA + F16C), "neon" or "scalar".
const char* qlora_isa(void) {
#if defined(QLORA_GEMV_BF16)
  return "avx512-bf16";
#elif defined(QLORA_AVX512)
  return "avx512";
#else
  return v16::kIsa;
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
    if (nonfinite(am)) bad = std::min(bad, b);
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
      // cvtt turns NaN into INT_MIN, which the max sends to bin 0 (see quantize8_block)
      const __m512i idx = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvttps_epi32(v), _mm512_setzero_si512()),
                                           _mm512_set1_epi32(kLutSize - 1));
      const __m512i g = _mm512_i32gather_epi32(idx, lut, 1);  // low byte of each lane is lut[idx]
      _mm_mask_storeu_epi8(q + start + i, m, _mm512_cvtepi32_epi8(g));
    }
#else
    quantize8_block(x + start, len, inv, lut, q + start);
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
    dequantize8_block(q + start, len, scale, code, out + start);
#endif
  }
}

}  // extern "C"
