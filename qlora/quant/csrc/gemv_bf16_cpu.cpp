// The decode products with AVX512-BF16 (see gemv.h; gemv_cpu.cpp has the others).
//
// Decoding one token reads every weight once and does two flops with it, so the speed is how fast
// the weights stream in and get unpacked. qlora_gemm_4bit (gemm4_cpu.cpp) spends ~8 vector
// instructions per 16 weights turning codes into fp32 weights; gemv4 spends ~10 per 64, with
// AVX512-BF16:
//   - a 16-bit permute maps 32 codes to the codebook as bf16. A codebook value is not a bf16
//     number, so it is kept as hi + lo (two bf16 tables; hi + lo is the fp32 value to 2^-17
//     relative) and both halves are multiplied: the weights are the reference's fp32 values, not
//     bf16-rounded ones (hi alone would be 17% faster);
//   - vdpbf16ps multiplies 32 bf16 pairs exactly and adds them into 16 fp32 lanes;
//   - the block scale multiplies each block's sum once instead of each weight.
// x is bf16 (the compute dtype's activations are), rearranged once per call into the order the
// unpacked codes come in. Sums are fp32 in an order of their own (as qlora_gemm_4bit's are):
// results equal x · dequantize(W, fp32)ᵀ up to fp32 summation order.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "gemv.h"

#ifdef QLORA_GEMV_BF16

namespace qlora::gemv {

thread_local std::vector<uint16_t> t_x;  // the rearranged input, per thread

inline __mmask32 lanes32(int64_t k) { return k >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << k) - 1); }

inline __m512 dot(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }

// W[o] · x for a bf16 W (n, k) and x (k, bf16). One row at a time, four accumulators along it: the
// weights are read in storage order, one sequential stream. (Four rows at once, sharing the loads
// of x, ran at a third of the speed here: interleaved short streams defeat the hardware
// prefetcher; 12.7 vs 35.8 GB/s on the 57 MB output head.)
inline float gemv16_row(const uint16_t* w, int64_t k, const uint16_t* x) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 128 <= k; j += 128) {
    a0 = dot(a0, _mm512_loadu_si512(w + j), _mm512_loadu_si512(x + j));
    a1 = dot(a1, _mm512_loadu_si512(w + j + 32), _mm512_loadu_si512(x + j + 32));
    a2 = dot(a2, _mm512_loadu_si512(w + j + 64), _mm512_loadu_si512(x + j + 64));
    a3 = dot(a3, _mm512_loadu_si512(w + j + 96), _mm512_loadu_si512(x + j + 96));
  }
  for (; j < k; j += 32) {
    const __mmask32 m = lanes32(k - j);
    a0 = dot(a0, _mm512_maskz_loadu_epi16(m, w + j), _mm512_maskz_loadu_epi16(m, x + j));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}


// out (n) = B · xa for LoRA's B (n, r) stored in blocks of 16 rows, each block transposed:
// (ceil(n / 16), r, 16) bf16, zero rows past n. Per block, 16 outputs in the lanes of one fp32
// accumulator (four, over alternate ranks), one sequential stream. Row by row (B (n, r) · xa)
// spent more on the n horizontal sums of 64 products than on the products, and a plain (r, n)
// transpose read r interleaved streams.
void lora_b(const uint16_t* b16, int64_t r, int64_t n, const float* xa, float* out) {
  for (int64_t o = 0; o < n; o += 16) {
    const uint16_t* b = b16 + o * r;  // this block: (r, 16)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t c = 0;
    for (; c + 4 <= r; c += 4) {
      a0 = _mm512_fmadd_ps(load_bf16(b + c * 16, 0xffff), _mm512_set1_ps(xa[c]), a0);
      a1 = _mm512_fmadd_ps(load_bf16(b + c * 16 + 16, 0xffff), _mm512_set1_ps(xa[c + 1]), a1);
      a2 = _mm512_fmadd_ps(load_bf16(b + c * 16 + 32, 0xffff), _mm512_set1_ps(xa[c + 2]), a2);
      a3 = _mm512_fmadd_ps(load_bf16(b + c * 16 + 48, 0xffff), _mm512_set1_ps(xa[c + 3]), a3);
    }
    for (; c < r; ++c) a0 = _mm512_fmadd_ps(load_bf16(b + c * 16, 0xffff), _mm512_set1_ps(xa[c]), a0);
    const __mmask16 m = o + 16 <= n ? __mmask16(0xffff) : __mmask16((1u << (n - o)) - 1);
    _mm512_mask_storeu_ps(out + o, m, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

// The codebook as 32 16-bit lanes (entry i = code[i % 16]), hi or lo half: a permute then reads
// the low 5 bits of each index, so a whole byte stands for its low nibble.
inline __m512i code_table(const float* code, bool lo) {
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) {
    const uint16_t h = float_to_bf16(code[i % 16]);
    t[i] = lo ? float_to_bf16(code[i % 16] - bf16_to_float(h)) : h;
  }
  return _mm512_load_si512(t);
}

// x (bf16) -> per 64-element step: the 32 even elements, then the 32 odd ones. Unpacking 32 bytes
// gives the high nibbles (even elements) in one vector and the low nibbles (odd) in another.
inline void even_odd(const uint16_t* x, int64_t k, uint16_t* out) {
  for (int64_t j = 0; j < k; j += 64)
    for (int i = 0; i < 32; ++i) out[j + i] = x[j + 2 * i], out[j + 32 + i] = x[j + 2 * i + 1];
}

// Rows o..o+R of W4 · x. R rows at once share the loads of x and its even/odd split (unlike
// gemv16_row this is bound by the unpacking, not by memory); the rows two groups ahead are
// prefetched (5.8 vs 7.2 ms for SmolLM2's 210 projections, where the hardware prefetcher alone
// falls behind). Per block, the sum of code · x, then the block scale once. Inlined by force: as a
// call, passing the two tables through the stack cost 10%.
template <int R>
__attribute__((always_inline)) inline void gemv4_rows(const QloraDecodeLinear& L, const uint16_t* xeo, __m512i thi,
                                                      __m512i tlo, int64_t o, Scales& scales, float* out) {
  const size_t row_bytes = size_t(L.k) / 2, block_bytes = size_t(L.bs) / 2, kb = size_t(L.k / L.bs);
  const size_t ahead = 2 * R * row_bytes;
  const uint8_t* codes = L.packed + size_t(o) * row_bytes;
  const float* s = scales.next_rows(R);  // (R, kb)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (size_t b = 0; b < kb; ++b) {
    __m512 d[R];
    for (int r = 0; r < R; ++r) d[r] = _mm512_setzero_ps();
    for (size_t at = b * block_bytes; at < (b + 1) * block_bytes; at += 32) {  // 64 weights a step
      const __m512i xe = _mm512_loadu_si512(xeo + 2 * at), xo = _mm512_loadu_si512(xeo + 2 * at + 32);
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = codes + r * row_bytes + at;
        _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T0);
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        const __m512i h = _mm512_srli_epi16(w, 4);
        d[r] = dot(d[r], _mm512_permutexvar_epi16(h, thi), xe);
        d[r] = dot(d[r], _mm512_permutexvar_epi16(w, thi), xo);
        d[r] = dot(d[r], _mm512_permutexvar_epi16(h, tlo), xe);
        d[r] = dot(d[r], _mm512_permutexvar_epi16(w, tlo), xo);
      }
    }
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(d[r], _mm512_set1_ps(s[r * kb + b]), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

void gemv16(const uint16_t* w, int64_t n, int64_t k, const uint16_t* x, float* out) {
  for (int64_t o = 0; o < n; ++o) out[o] = gemv16_row(w + o * k, k, x);
}

float gemv16_row1(const uint16_t* w, int64_t k, const uint16_t* x) { return gemv16_row(w, k, x); }

// q · x for an int8 row q and fp32 x, four accumulators (as gemv16_row), 16 lanes each.
float gemv8_row(const int8_t* q, int64_t k, const float* x) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  const auto load = [&](int64_t i) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i))));
  };
  for (; j + 64 <= k; j += 64) {
    a0 = _mm512_fmadd_ps(load(j), _mm512_loadu_ps(x + j), a0);
    a1 = _mm512_fmadd_ps(load(j + 16), _mm512_loadu_ps(x + j + 16), a1);
    a2 = _mm512_fmadd_ps(load(j + 32), _mm512_loadu_ps(x + j + 32), a2);
    a3 = _mm512_fmadd_ps(load(j + 48), _mm512_loadu_ps(x + j + 48), a3);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; j < k; ++j) s += float(q[j]) * x[j];
  return s;
}

// x in the order gemv4_range reads it (this thread's scratch).
const uint16_t* gemv4_input(const uint16_t* x, int64_t k) {
  t_x.resize(k);
  even_odd(x, k, t_x.data());
  return t_x.data();
}

// out[o] = W4[o] · x for o in [o0, o1), xeo from gemv4_input.
void gemv4_range(const QloraDecodeLinear& L, const uint16_t* xeo, int64_t o0, int64_t o1, float* out) {
  const __m512i thi = code_table(L.code, false), tlo = code_table(L.code, true);
  Scales scales(L, o0);
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) gemv4_rows<4>(L, xeo, thi, tlo, o, scales, out + o);
  for (; o < o1; ++o) gemv4_rows<1>(L, xeo, thi, tlo, o, scales, out + o);
}

}  // namespace qlora::gemv

#endif  // QLORA_GEMV_BF16
