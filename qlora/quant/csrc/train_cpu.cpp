// The per-row softmax cross-entropy of the chunked loss (qlora/nn/loss.py), bf16, called through
// ctypes (one library with the other csrc/*.cpp; see qlora/quant/fast/library.py).
//
// One order of operations in every build, as in fused_cpu.cpp: sums of 16 elements at a time in 16
// lanes, _mm512_reduce_add_ps's tree, then the last v % 16 one by one; exp is common.h's polynomial.
// So the AVX2, NEON and portable builds give the same bits.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "simd16.h"

namespace {

thread_local std::vector<float> t_row;

// max over a row of bf16 logits: 16 lanes (maxps' NaN rule), reduced, then the last v % 16 in turn.
float row_max(const uint16_t* z, int64_t v) {
  float m = -INFINITY;
  int64_t j = 0;
#ifdef QLORA_AVX512
  __m512 vm = _mm512_set1_ps(-INFINITY);
  for (; j + 16 <= v; j += 16) vm = _mm512_max_ps(vm, load_bf16_16(z + j));
  m = _mm512_reduce_max_ps(vm);
#else
  v16::F16 vm = v16::set1(-INFINITY);
  for (; j + 16 <= v; j += 16) vm = v16::max(vm, v16::load_bf16(z + j));
  m = v16::reduce_max(vm);
#endif
  for (; j < v; ++j) m = std::max(m, bf(z[j]));
  return m;
}

// e = exp(z - m) over a row; returns its sum (16 lanes, reduced, then the last v % 16 in turn).
float row_exp_sum(const uint16_t* z, int64_t v, float m, float* e) {
  float sum = 0.0f;
  int64_t j = 0;
#ifdef QLORA_AVX512
  const __m512 vmax = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (; j + 16 <= v; j += 16) {
    const __m512 x = exp16(_mm512_sub_ps(load_bf16_16(z + j), vmax));
    _mm512_storeu_ps(e + j, x);
    acc = _mm512_add_ps(acc, x);
  }
  sum = _mm512_reduce_add_ps(acc);
  for (; j < v; ++j) sum += (e[j] = std::exp(bf(z[j]) - m));
#else
  const v16::F16 vmax = v16::set1(m);
  v16::F16 acc = v16::zero();
  for (; j + 16 <= v; j += 16) {
    const v16::F16 x = v16::exp(v16::sub(v16::load_bf16(z + j), vmax));
    v16::store(e + j, x);
    acc = v16::add(acc, x);
  }
  sum = v16::reduce_add(acc);
  if (j < v) v16::store_upto(e + j, v16::exp(v16::sub(v16::load_bf16_upto(z + j, v - j), vmax)), v - j);
  for (; j < v; ++j) sum += e[j];  // the last v % 16 one by one
#endif
  return sum;
}

// z = bf16(e * inv) over a row.
void row_scale_to_bf16(const float* e, int64_t v, float inv, uint16_t* z) {
  int64_t j = 0;
#ifdef QLORA_AVX512
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; j + 16 <= v; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(z + j), to_bf16_16(_mm512_mul_ps(_mm512_loadu_ps(e + j), vinv)));
#else
  const v16::F16 vinv = v16::set1(inv);
  for (; j + 16 <= v; j += 16) v16::store_bf16(z + j, v16::mul(v16::load(e + j), vinv));
#endif
  for (; j < v; ++j) z[j] = to_bf(e[j] * inv);
}

// Cross-entropy of one row of bf16 logits z (v entries) at target y: returns logsumexp(z) - z[y];
// with grad, overwrites z with bf16(softmax(z) - onehot(y)). fp32 inside, as F.cross_entropy on
// fp32 logits; e = exp(z - max) is kept in a per-thread fp32 row (in L2 for a 49k vocabulary).
float cross_entropy_row(uint16_t* z, int64_t v, int64_t y, bool grad) {
  if (int64_t(t_row.size()) < v) t_row.resize(v);
  float* e = t_row.data();
  const float m = row_max(z, v);
  const float sum = row_exp_sum(z, v, m, e);
  const float loss = m + std::log(sum) - bf(z[y]);
  if (!grad) return loss;
  e[y] -= sum;
  row_scale_to_bf16(e, v, 1.0f / sum, z);
  return loss;
}

}  // namespace

extern "C" {

// Per-row cross-entropy of bf16 logits z (rows, v) at targets (rows, int64) into loss (rows, fp32);
// grad != 0: z becomes dL/dz = softmax - onehot, in bf16 (qlora/nn/loss.py).
void qlora_cross_entropy_rows(uint16_t* z, int64_t rows, int64_t v, const int64_t* targets, float* loss, int grad,
                              int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * v >= kElementwiseParallelMin && nthreads > 1)
  for (int64_t r = 0; r < rows; ++r) loss[r] = cross_entropy_row(z + r * v, v, targets[r], grad != 0);
}


}  // extern "C"
