// RMSNorm and SwiGLU for training, forward and backward, bf16, called through ctypes from
// qlora/nn/fused.py (one library with the other csrc/*.cpp; see qlora/quant/fast/library.py); and the per-row
// softmax cross-entropy of the chunked loss (qlora/nn/loss.py).
//
// transformers' LlamaRMSNorm runs six elementwise ops in fp32 and autograd keeps an fp32 copy of
// its input; on SmolLM2-135M (batch 4 x 256) forward + backward of one norm took 3.4 ms, 61 norms a
// step: 7% of the step, and 135 MB of the 718 MB saved for backward. Here each direction is one
// pass over a row that stays in L1, and backward needs only the bf16 input and one fp32 rstd per
// row. SwiGLU (silu(gate) * up) likewise keeps gate and up only, not silu(gate) as well (90 MB).
//
// Roundings are transformers' (the bf16 tensor ops round each op's result to bf16):
//   norm:    r = 1 / sqrt(sum(x^2) / D + eps),  y = bf16(w * bf16(x * r))
//   swiglu:  s = bf16(g / (1 + exp(-g))),       h = bf16(s * u)
// Backward is the same chain rule autograd applies to those ops, with bf16 where autograd's
// gradients are bf16 (dy * w, dh * u, dh * s) and fp32 inside. Sums run in an order of their own
// and exp is ours (~1 ulp), so a result can sit one bf16 rounding away from torch's.
//
// Each op has an AVX-512 version and one over simd16.h (AVX2, NEON, or scalar in the portable
// build), in one order: sums of 16 elements at a time in 16 lanes, _mm512_reduce_add_ps's tree,
// then the last d % 16 elements one by one; exp is common.h's polynomial everywhere (AVX-512 takes
// the last n % 16 from std::exp). So the AVX2, NEON and portable builds give the same bits.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "simd16.h"

namespace {

// Threads from this many elements up (torch's own elementwise grain is 32k; these run between torch ops
// that use all threads anyway, unlike quant.h's layer-sized calls)
constexpr int64_t kParallelMin = int64_t(1) << 16;
constexpr int64_t kChunk = int64_t(1) << 14;  // SwiGLU elements per work item (a multiple of 16)


#ifdef QLORA_AVX512
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

void norm_forward_row(const uint16_t* x, const uint16_t* w, int64_t d, float eps, uint16_t* y, float* rstd) {
  float ss = 0.0f;
  int64_t i = 0;
#ifdef QLORA_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= d; i += 16) {
    const __m512 v = load_bf16_16(x + i);
    acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
  }
  ss = hsum(acc);
#else
  v16::F16 acc = v16::zero();
  for (; i + 16 <= d; i += 16) {
    const v16::F16 v = v16::load_bf16(x + i);
    acc = v16::add(acc, v16::mul(v, v));
  }
  ss = v16::reduce_add(acc);
#endif
  for (; i < d; ++i) ss += bf(x[i]) * bf(x[i]);
  const float r = 1.0f / std::sqrt(ss / float(d) + eps);
  i = 0;
#ifdef QLORA_AVX512
  const __m512 vr = _mm512_set1_ps(r);
  for (; i + 16 <= d; i += 16) {
    const __m512 n = round_bf16_16(_mm512_mul_ps(load_bf16_16(x + i), vr));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), to_bf16_16(_mm512_mul_ps(load_bf16_16(w + i), n)));
  }
#else
  const v16::F16 vr = v16::set1(r);
  for (; i + 16 <= d; i += 16) {
    const v16::F16 n = v16::round_bf16(v16::mul(v16::load_bf16(x + i), vr));
    v16::store_bf16(y + i, v16::mul(v16::load_bf16(w + i), n));
  }
#endif
  for (; i < d; ++i) y[i] = to_bf(bf(w[i]) * bf(to_bf(bf(x[i]) * r)));
  *rstd = r;
}

// dx = r * (g - n * mean(g * n)),  g = bf16(dy * w),  n = x * r  (fp32)
void norm_backward_row(const uint16_t* dy, const uint16_t* x, const uint16_t* w, float r, int64_t d, uint16_t* dx) {
  float dot = 0.0f;
  int64_t i = 0;
#ifdef QLORA_AVX512
  const __m512 vr = _mm512_set1_ps(r);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= d; i += 16) {
    const __m512 g = round_bf16_16(_mm512_mul_ps(load_bf16_16(dy + i), load_bf16_16(w + i)));
    acc = _mm512_add_ps(acc, _mm512_mul_ps(g, _mm512_mul_ps(load_bf16_16(x + i), vr)));
  }
  dot = hsum(acc);
#else
  const v16::F16 vr = v16::set1(r);
  v16::F16 acc = v16::zero();
  for (; i + 16 <= d; i += 16) {
    const v16::F16 g = v16::round_bf16(v16::mul(v16::load_bf16(dy + i), v16::load_bf16(w + i)));
    acc = v16::add(acc, v16::mul(g, v16::mul(v16::load_bf16(x + i), vr)));
  }
  dot = v16::reduce_add(acc);
#endif
  for (; i < d; ++i) dot += bf(to_bf(bf(dy[i]) * bf(w[i]))) * (bf(x[i]) * r);
  const float c = dot / float(d);
  i = 0;
#ifdef QLORA_AVX512
  const __m512 vc = _mm512_set1_ps(c);
  for (; i + 16 <= d; i += 16) {
    const __m512 g = round_bf16_16(_mm512_mul_ps(load_bf16_16(dy + i), load_bf16_16(w + i)));
    const __m512 n = _mm512_mul_ps(load_bf16_16(x + i), vr);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dx + i),
                        to_bf16_16(_mm512_mul_ps(vr, _mm512_sub_ps(g, _mm512_mul_ps(n, vc)))));
  }
#else
  const v16::F16 vc = v16::set1(c);
  for (; i + 16 <= d; i += 16) {
    const v16::F16 g = v16::round_bf16(v16::mul(v16::load_bf16(dy + i), v16::load_bf16(w + i)));
    const v16::F16 n = v16::mul(v16::load_bf16(x + i), vr);
    v16::store_bf16(dx + i, v16::mul(vr, v16::sub(g, v16::mul(n, vc))));
  }
#endif
  for (; i < d; ++i) {
    const float g = bf(to_bf(bf(dy[i]) * bf(w[i])));
    dx[i] = to_bf(r * (g - (bf(x[i]) * r) * c));
  }
}

// h = bf16(bf16(silu(g)) * u) on [lo, hi)
void swiglu_forward_range(const uint16_t* g, const uint16_t* u, uint16_t* h, int64_t lo, int64_t hi) {
  int64_t i = lo;
#ifdef QLORA_AVX512
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= hi; i += 16) {
    const __m512 x = load_bf16_16(g + i);
    const __m512 den = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)));
    const __m512 s = round_bf16_16(_mm512_div_ps(x, den));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + i), to_bf16_16(_mm512_mul_ps(s, load_bf16_16(u + i))));
  }
  for (; i < hi; ++i) {
    const float x = bf(g[i]);
    h[i] = to_bf(bf(to_bf(x / (1.0f + std::exp(-x)))) * bf(u[i]));
  }
#else
  const v16::F16 one = v16::set1(1.0f);
  for (; i < hi; i += 16) {  // the last n % 16 zero-padded
    const int64_t n = hi - i;
    const v16::F16 x = v16::load_bf16_upto(g + i, n);
    const v16::F16 den = v16::add(one, v16::exp(v16::sub(v16::zero(), x)));
    const v16::F16 s = v16::round_bf16(v16::div(x, den));
    v16::store_bf16_upto(h + i, v16::mul(s, v16::load_bf16_upto(u + i, n)), n);
  }
#endif
}

// du = bf16(dh * s), ds = bf16(dh * u), dg = bf16(ds * sig * (1 + g * (1 - sig))), sig = 1 / (1 + exp(-g))
void swiglu_backward_range(const uint16_t* dh, const uint16_t* g, const uint16_t* u, uint16_t* dg, uint16_t* du,
                           int64_t lo, int64_t hi) {
  int64_t i = lo;
#ifdef QLORA_AVX512
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= hi; i += 16) {
    const __m512 x = load_bf16_16(g + i), d = load_bf16_16(dh + i);
    const __m512 den = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)));
    const __m512 sig = _mm512_div_ps(one, den);
    const __m512 s = round_bf16_16(_mm512_mul_ps(x, sig));  // x / den up to one fp32 rounding
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(du + i), to_bf16_16(_mm512_mul_ps(d, s)));
    const __m512 ds = round_bf16_16(_mm512_mul_ps(d, load_bf16_16(u + i)));
    const __m512 t = _mm512_add_ps(one, _mm512_mul_ps(x, _mm512_sub_ps(one, sig)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dg + i), to_bf16_16(_mm512_mul_ps(_mm512_mul_ps(ds, sig), t)));
  }
  for (; i < hi; ++i) {
    const float x = bf(g[i]), d = bf(dh[i]), den = 1.0f + std::exp(-x);
    const float s = bf(to_bf(x / den)), sig = 1.0f / den;
    du[i] = to_bf(d * s);
    const float ds = bf(to_bf(d * bf(u[i])));
    dg[i] = to_bf(ds * sig * (1.0f + x * (1.0f - sig)));
  }
#else
  const v16::F16 one = v16::set1(1.0f);
  for (; i < hi; i += 16) {  // the last n % 16 zero-padded
    const int64_t n = hi - i;
    const v16::F16 x = v16::load_bf16_upto(g + i, n), d = v16::load_bf16_upto(dh + i, n);
    const v16::F16 den = v16::add(one, v16::exp(v16::sub(v16::zero(), x)));
    const v16::F16 sig = v16::div(one, den);
    const v16::F16 s = v16::round_bf16(v16::mul(x, sig));  // x / den up to one fp32 rounding
    v16::store_bf16_upto(du + i, v16::mul(d, s), n);
    const v16::F16 ds = v16::round_bf16(v16::mul(d, v16::load_bf16_upto(u + i, n)));
    const v16::F16 t = v16::add(one, v16::mul(x, v16::sub(one, sig)));
    v16::store_bf16_upto(dg + i, v16::mul(v16::mul(ds, sig), t), n);
  }
#endif
}

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
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * v >= kParallelMin && nthreads > 1)
  for (int64_t r = 0; r < rows; ++r) loss[r] = cross_entropy_row(z + r * v, v, targets[r], grad != 0);
}


// x, y: (rows, d) bf16 contiguous; w: (d) bf16; rstd: (rows) fp32 out.
void qlora_rms_norm_forward(const uint16_t* x, const uint16_t* w, int64_t rows, int64_t d, float eps, uint16_t* y,
                            float* rstd, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * d >= kParallelMin && nthreads > 1)
  for (int64_t r = 0; r < rows; ++r) norm_forward_row(x + r * d, w, d, eps, y + r * d, rstd + r);
}

// dx (rows, d) bf16 from dy (rows, d) bf16, the forward's x and rstd; w frozen (no dw).
void qlora_rms_norm_backward(const uint16_t* dy, const uint16_t* x, const uint16_t* w, const float* rstd, int64_t rows,
                             int64_t d, uint16_t* dx, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * d >= kParallelMin && nthreads > 1)
  for (int64_t r = 0; r < rows; ++r) norm_backward_row(dy + r * d, x + r * d, w, rstd[r], d, dx + r * d);
}

// h = silu(g) * u over n bf16 elements.
void qlora_swiglu_forward(const uint16_t* g, const uint16_t* u, uint16_t* h, int64_t n, int nthreads) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= kParallelMin && nthreads > 1)
  for (int64_t c = 0; c < nchunks; ++c)
    swiglu_forward_range(g, u, h, c * kChunk, c * kChunk + kChunk < n ? c * kChunk + kChunk : n);
}

void qlora_swiglu_backward(const uint16_t* dh, const uint16_t* g, const uint16_t* u, uint16_t* dg, uint16_t* du,
                           int64_t n, int nthreads) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= kParallelMin && nthreads > 1)
  for (int64_t c = 0; c < nchunks; ++c)
    swiglu_backward_range(dh, g, u, dg, du, c * kChunk, c * kChunk + kChunk < n ? c * kChunk + kChunk : n);
}

}  // extern "C"
