// A 4-bit matrix times a few rows on CPU (qlora_gemm_4bit), called from qlora/quant/fast/quantize.py through
// ctypes: decoding through Linear4bit without dequantizing the weight first.
//
// An AVX-512 version and one over simd16.h (AVX2, NEON, scalar) with the same order of fp32
// operations, so the AVX2, NEON and portable builds give the same bits (and AVX-512 does too).

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "quant.h"
#include "simd16.h"

namespace {

// ---- 4-bit matrix times a few rows: out (M, n_out) = x (M, k) · Wᵀ, fp32 -------------------------
// For decoding (M = 1: one token, or a few sequences): the weight is read once, as 4-bit codes, for
// all M rows, where dequantize-then-matmul writes and re-reads a 16-bit copy of it. Each weight is
// code · block scale in fp32 (the dequantized value before any 16-bit rounding); the dot products
// accumulate in fp32, 16 lanes per row, in an order that differs from a BLAS matmul's.
// Needs k % bs == 0 and bs % 16 == 0 (a block never straddles two rows); quantize.py checks.
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
#else  // the same order over simd16.h: element j of a block in lane j % 16, fused
  const v16::Codebook cb = v16::codebook(code);
  for (int64_t o = o0; o < o1; ++o) {
    v16::F16 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = v16::zero();
    const int64_t row = o * k;
    for (int64_t j0 = 0; j0 < k; j0 += bs) {
      const float scale = block_scale(absmax, qabsmax, nested_absmax, code8, offset, nested_bs, (row + j0) / bs);
      const v16::F16 vs = v16::set1(scale);
      for (int64_t j = j0; j < j0 + bs; j += 16) {
        const v16::F16 w = v16::mul(v16::unpack_natural(packed + (row + j) / 2, cb), vs);
        for (int m = 0; m < M; ++m) acc[m] = v16::fma(w, v16::load(x + m * k + j), acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) out[m * ldo + o] = v16::reduce_add(acc[m]);
  }
#endif
}

}  // namespace

extern "C" {

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
