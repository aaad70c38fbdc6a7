// The matrix-vector products of a decode step (one input vector), which decode_cpu.cpp and
// attention_cpu.cpp build on, in two versions: AVX512-BF16 dot products (gemv_bf16_cpu.cpp) and
// fp32 FMAs over simd16.h (gemv_cpu.cpp: AVX2, NEON, or scalar in the portable build). Each output
// row is one thread's sum, so splitting rows between threads (lanes.h) changes no bit.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "decode.h"

namespace qlora::gemv {

#ifdef QLORA_GEMV_BF16
using XIn = uint16_t;  // gemv4's x: bf16 for vdpbf16ps
#else
using XIn = float;     // fp32 for fp32 FMAs
#endif

// x (k, bf16) in the order gemv4_range reads it, in this thread's scratch.
const XIn* gemv4_input(const uint16_t* x, int64_t k);
// out[o] = W4[o] · x for o in [o0, o1), x from gemv4_input.
void gemv4_range(const QloraDecodeLinear& L, const XIn* x, int64_t o0, int64_t o1, float* out);
// out (n, fp32) = W (n, k, bf16) · x (k, bf16).
void gemv16(const uint16_t* w, int64_t n, int64_t k, const uint16_t* x, float* out);
float gemv16_row1(const uint16_t* w, int64_t k, const uint16_t* x);
// q · x for an int8 row q and fp32 x.
float gemv8_row(const int8_t* q, int64_t k, const float* x);
// out (n) = B · xa for LoRA's B (n, r) in blocks of 16 rows, each transposed (decode.h).
void lora_b(const uint16_t* b16, int64_t r, int64_t n, const float* xa, float* out);

inline thread_local std::vector<float> t_scales;  // Scales' buffer, per thread (serve decodes on several)

// The block scales of a 4-bit weight in storage order, as block_scale (common.h) computes them,
// without its two integer divisions per block (a 64-bit division costs about as much as the
// block's 64 multiply-adds): the nested index advances with a counter.
struct Scales {
  const QloraDecodeLinear& L;
  int64_t b = 0, nested = 0, in_nested = 0;
  std::vector<float>& buf;
  Scales(const QloraDecodeLinear& layer, int64_t row) : L(layer), buf(t_scales) {  // from row `row` on
    b = row * (L.k / L.bs);
    if (L.qabsmax != nullptr) nested = b / L.nested_bs, in_nested = b % L.nested_bs;
  }
  float* next_rows(int64_t rows) {  // the scales of the next `rows` rows: (rows, k / bs)
    const int64_t count = rows * (L.k / L.bs);
    buf.resize(std::max<size_t>(buf.size(), count));
    for (int64_t i = 0; i < count; ++i, ++b) {
      if (L.qabsmax == nullptr) {
        buf[i] = L.absmax[b];
        continue;
      }
      const float s = L.code8[L.qabsmax[b]] * L.nested_absmax[nested];
      buf[i] = s + L.offset;
      if (++in_nested == L.nested_bs) in_nested = 0, ++nested;
    }
    return buf.data();
  }
};

#ifdef QLORA_GEMV_BF16
inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
#endif

}  // namespace qlora::gemv
