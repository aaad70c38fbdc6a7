// RMSNorm and SwiGLU for training, forward and backward, in bf16 and in fp32, called through ctypes
// from qlora/nn/fused.py (one library with the other csrc/*.cpp; see qlora/quant/fast/library.py).
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
// In fp32 (the compute dtype of CPUs without native bf16) the same formulas run with no bf16
// rounding between ops, as torch's fp32 ops do; there transformers' modules took ~1 s of a ~10 s
// SmolLM2 step (AVX2).
//
// Each op has an AVX-512 version (bf16) and one over simd16.h (AVX2, NEON, or scalar in the portable
// build), in one order: sums of 16 elements at a time in 16 lanes, _mm512_reduce_add_ps's tree,
// then the last d % 16 elements one by one; exp is common.h's polynomial everywhere (AVX-512 takes
// the last n % 16 from std::exp). So the AVX2, NEON and portable builds give the same bits.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.h"
#include "simd16.h"

namespace {

constexpr int64_t kChunk = int64_t(1) << 14;  // SwiGLU elements per work item (a multiple of 16)

// ---- the simd16 path, for bf16 (D = 2) and fp32 (D = 0) -----------------------------------------
// In fp32 nothing is rounded between ops (torch's fp32 ops), so rnd<0> is the identity.

template <int D> inline float ld(const void* p, int64_t i) {
  if constexpr (D == 0) return static_cast<const float*>(p)[i];
  else return bf(static_cast<const uint16_t*>(p)[i]);
}
template <int D> inline void st(void* p, int64_t i, float v) {
  if constexpr (D == 0) static_cast<float*>(p)[i] = v;
  else static_cast<uint16_t*>(p)[i] = to_bf(v);
}
template <int D> inline float rnd(float v) { return D == 0 ? v : bf(to_bf(v)); }
template <int D> inline v16::F16 rnd(v16::F16 v) {
  if constexpr (D == 0) return v;
  else return v16::round_bf16(v);
}

template <int D>
void norm_forward_row_v16(const void* x, const void* w, int64_t d, float eps, void* y, float* rstd) {
  v16::F16 acc = v16::zero();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const v16::F16 v = v16::load_as<D>(x, i);
    acc = v16::add(acc, v16::mul(v, v));
  }
  float ss = v16::reduce_add(acc);
  for (; i < d; ++i) ss += ld<D>(x, i) * ld<D>(x, i);
  const float r = 1.0f / std::sqrt(ss / float(d) + eps);
  const v16::F16 vr = v16::set1(r);
  for (i = 0; i + 16 <= d; i += 16) {
    const v16::F16 n = rnd<D>(v16::mul(v16::load_as<D>(x, i), vr));
    v16::store_as<D>(y, i, v16::mul(v16::load_as<D>(w, i), n));
  }
  for (; i < d; ++i) st<D>(y, i, ld<D>(w, i) * rnd<D>(ld<D>(x, i) * r));
  *rstd = r;
}

// dx = r * (g - n * mean(g * n)),  g = rnd(dy * w),  n = x * r  (fp32)
template <int D>
void norm_backward_row_v16(const void* dy, const void* x, const void* w, float r, int64_t d, void* dx) {
  const v16::F16 vr = v16::set1(r);
  v16::F16 acc = v16::zero();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const v16::F16 g = rnd<D>(v16::mul(v16::load_as<D>(dy, i), v16::load_as<D>(w, i)));
    acc = v16::add(acc, v16::mul(g, v16::mul(v16::load_as<D>(x, i), vr)));
  }
  float dot = v16::reduce_add(acc);
  for (; i < d; ++i) dot += rnd<D>(ld<D>(dy, i) * ld<D>(w, i)) * (ld<D>(x, i) * r);
  const float c = dot / float(d);
  const v16::F16 vc = v16::set1(c);
  for (i = 0; i + 16 <= d; i += 16) {
    const v16::F16 g = rnd<D>(v16::mul(v16::load_as<D>(dy, i), v16::load_as<D>(w, i)));
    const v16::F16 n = v16::mul(v16::load_as<D>(x, i), vr);
    v16::store_as<D>(dx, i, v16::mul(vr, v16::sub(g, v16::mul(n, vc))));
  }
  for (; i < d; ++i) st<D>(dx, i, r * (rnd<D>(ld<D>(dy, i) * ld<D>(w, i)) - (ld<D>(x, i) * r) * c));
}

// h = rnd(rnd(silu(g)) * u) on [lo, hi), the last (hi - lo) % 16 zero-padded
template <int D> void swiglu_forward_range_v16(const void* g, const void* u, void* h, int64_t lo, int64_t hi) {
  const v16::F16 one = v16::set1(1.0f);
  for (int64_t i = lo; i < hi; i += 16) {
    const int64_t n = hi - i;
    const v16::F16 x = v16::load_upto<D>(g, i, n);
    const v16::F16 den = v16::add(one, v16::exp(v16::sub(v16::zero(), x)));
    const v16::F16 s = rnd<D>(v16::div(x, den));
    v16::store_upto<D>(h, i, v16::mul(s, v16::load_upto<D>(u, i, n)), n);
  }
}

// du = rnd(dh * s), ds = rnd(dh * u), dg = rnd(ds * sig * (1 + g * (1 - sig))), sig = 1 / (1 + exp(-g)).
// Every input element is read before its outputs are written: dg and du may be g and u (in place).
template <int D>
void swiglu_backward_range_v16(const void* dh, const void* g, const void* u, void* dg, void* du, int64_t lo,
                               int64_t hi) {
  const v16::F16 one = v16::set1(1.0f);
  for (int64_t i = lo; i < hi; i += 16) {
    const int64_t n = hi - i;
    const v16::F16 x = v16::load_upto<D>(g, i, n), d = v16::load_upto<D>(dh, i, n), up = v16::load_upto<D>(u, i, n);
    const v16::F16 den = v16::add(one, v16::exp(v16::sub(v16::zero(), x)));
    const v16::F16 sig = v16::div(one, den);
    const v16::F16 s = rnd<D>(v16::mul(x, sig));  // x / den up to one fp32 rounding
    v16::store_upto<D>(du, i, v16::mul(d, s), n);
    const v16::F16 ds = rnd<D>(v16::mul(d, up));
    const v16::F16 t = v16::add(one, v16::mul(x, v16::sub(one, sig)));
    v16::store_upto<D>(dg, i, v16::mul(v16::mul(ds, sig), t), n);
  }
}

#ifdef QLORA_AVX512
// ---- the AVX-512 path (bf16 only; fp32 takes the simd16 one) -------------------------------------

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

void norm_forward_row_512(const uint16_t* x, const uint16_t* w, int64_t d, float eps, uint16_t* y, float* rstd) {
  int64_t i = 0;
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= d; i += 16) {
    const __m512 v = load_bf16_16(x + i);
    acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
  }
  float ss = hsum(acc);
  for (; i < d; ++i) ss += bf(x[i]) * bf(x[i]);
  const float r = 1.0f / std::sqrt(ss / float(d) + eps);
  const __m512 vr = _mm512_set1_ps(r);
  for (i = 0; i + 16 <= d; i += 16) {
    const __m512 n = round_bf16_16(_mm512_mul_ps(load_bf16_16(x + i), vr));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), to_bf16_16(_mm512_mul_ps(load_bf16_16(w + i), n)));
  }
  for (; i < d; ++i) y[i] = to_bf(bf(w[i]) * bf(to_bf(bf(x[i]) * r)));
  *rstd = r;
}

void norm_backward_row_512(const uint16_t* dy, const uint16_t* x, const uint16_t* w, float r, int64_t d,
                           uint16_t* dx) {
  int64_t i = 0;
  const __m512 vr = _mm512_set1_ps(r);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= d; i += 16) {
    const __m512 g = round_bf16_16(_mm512_mul_ps(load_bf16_16(dy + i), load_bf16_16(w + i)));
    acc = _mm512_add_ps(acc, _mm512_mul_ps(g, _mm512_mul_ps(load_bf16_16(x + i), vr)));
  }
  float dot = hsum(acc);
  for (; i < d; ++i) dot += bf(to_bf(bf(dy[i]) * bf(w[i]))) * (bf(x[i]) * r);
  const float c = dot / float(d);
  const __m512 vc = _mm512_set1_ps(c);
  for (i = 0; i + 16 <= d; i += 16) {
    const __m512 g = round_bf16_16(_mm512_mul_ps(load_bf16_16(dy + i), load_bf16_16(w + i)));
    const __m512 n = _mm512_mul_ps(load_bf16_16(x + i), vr);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dx + i),
                        to_bf16_16(_mm512_mul_ps(vr, _mm512_sub_ps(g, _mm512_mul_ps(n, vc)))));
  }
  for (; i < d; ++i) dx[i] = to_bf(r * (bf(to_bf(bf(dy[i]) * bf(w[i]))) - (bf(x[i]) * r) * c));
}

void swiglu_forward_range_512(const uint16_t* g, const uint16_t* u, uint16_t* h, int64_t lo, int64_t hi) {
  int64_t i = lo;
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
}

void swiglu_backward_range_512(const uint16_t* dh, const uint16_t* g, const uint16_t* u, uint16_t* dg, uint16_t* du,
                               int64_t lo, int64_t hi) {
  int64_t i = lo;
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= hi; i += 16) {
    const __m512 x = load_bf16_16(g + i), d = load_bf16_16(dh + i), up = load_bf16_16(u + i);
    const __m512 den = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)));
    const __m512 sig = _mm512_div_ps(one, den);
    const __m512 s = round_bf16_16(_mm512_mul_ps(x, sig));  // x / den up to one fp32 rounding
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(du + i), to_bf16_16(_mm512_mul_ps(d, s)));
    const __m512 ds = round_bf16_16(_mm512_mul_ps(d, up));
    const __m512 t = _mm512_add_ps(one, _mm512_mul_ps(x, _mm512_sub_ps(one, sig)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dg + i), to_bf16_16(_mm512_mul_ps(_mm512_mul_ps(ds, sig), t)));
  }
  for (; i < hi; ++i) {
    const float x = bf(g[i]), d = bf(dh[i]), up = bf(u[i]), den = 1.0f + std::exp(-x);
    const float s = bf(to_bf(x / den)), sig = 1.0f / den;
    du[i] = to_bf(d * s);
    const float ds = bf(to_bf(d * up));
    dg[i] = to_bf(ds * sig * (1.0f + x * (1.0f - sig)));
  }
}
#endif

// ---- one row / one range, by element type ----------------------------------------------------------

// element i of a D-typed array
template <int D, class T> inline T* at(T* p, int64_t i) {
  return reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(p) + uintptr_t(i) * v16::kElemBytes<D>);
}

template <int D> void norm_forward_row(const void* x, const void* w, int64_t d, float eps, void* y, float* rstd) {
#ifdef QLORA_AVX512
  if constexpr (D == 2) {
    norm_forward_row_512(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(w), d, eps,
                         static_cast<uint16_t*>(y), rstd);
    return;
  }
#endif
  norm_forward_row_v16<D>(x, w, d, eps, y, rstd);
}

template <int D> void norm_backward_row(const void* dy, const void* x, const void* w, float r, int64_t d, void* dx) {
#ifdef QLORA_AVX512
  if constexpr (D == 2) {
    norm_backward_row_512(static_cast<const uint16_t*>(dy), static_cast<const uint16_t*>(x),
                          static_cast<const uint16_t*>(w), r, d, static_cast<uint16_t*>(dx));
    return;
  }
#endif
  norm_backward_row_v16<D>(dy, x, w, r, d, dx);
}

template <int D> void swiglu_forward_range(const void* g, const void* u, void* h, int64_t lo, int64_t hi) {
#ifdef QLORA_AVX512
  if constexpr (D == 2) {
    swiglu_forward_range_512(static_cast<const uint16_t*>(g), static_cast<const uint16_t*>(u),
                             static_cast<uint16_t*>(h), lo, hi);
    return;
  }
#endif
  swiglu_forward_range_v16<D>(g, u, h, lo, hi);
}

template <int D>
void swiglu_backward_range(const void* dh, const void* g, const void* u, void* dg, void* du, int64_t lo, int64_t hi) {
#ifdef QLORA_AVX512
  if constexpr (D == 2) {
    swiglu_backward_range_512(static_cast<const uint16_t*>(dh), static_cast<const uint16_t*>(g),
                              static_cast<const uint16_t*>(u), static_cast<uint16_t*>(dg),
                              static_cast<uint16_t*>(du), lo, hi);
    return;
  }
#endif
  swiglu_backward_range_v16<D>(dh, g, u, dg, du, lo, hi);
}

template <int D> void norm_forward(const void* x, const void* w, int64_t rows, int64_t d, float eps, void* y,
                                   float* rstd, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * d >= kElementwiseParallelMin && nthreads > 1)
  for (int64_t r = 0; r < rows; ++r) norm_forward_row<D>(at<D>(x, r * d), w, d, eps, at<D>(y, r * d), rstd + r);
}

template <int D> void norm_backward(const void* dy, const void* x, const void* w, const float* rstd, int64_t rows,
                                    int64_t d, void* dx, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * d >= kElementwiseParallelMin && nthreads > 1)
  for (int64_t r = 0; r < rows; ++r)
    norm_backward_row<D>(at<D>(dy, r * d), at<D>(x, r * d), w, rstd[r], d, at<D>(dx, r * d));
}

template <int D> void swiglu_forward(const void* g, const void* u, void* h, int64_t n, int nthreads) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= kElementwiseParallelMin && nthreads > 1)
  for (int64_t c = 0; c < nchunks; ++c) swiglu_forward_range<D>(g, u, h, c * kChunk, std::min(n, c * kChunk + kChunk));
}

template <int D> void swiglu_backward(const void* dh, const void* g, const void* u, void* dg, void* du, int64_t n,
                                      int nthreads) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= kElementwiseParallelMin && nthreads > 1)
  for (int64_t c = 0; c < nchunks; ++c)
    swiglu_backward_range<D>(dh, g, u, dg, du, c * kChunk, std::min(n, c * kChunk + kChunk));
}

}  // namespace

extern "C" {

// The four below take `dtype` as quant.h numbers it: 0 fp32, 2 bf16 (every tensor of a call the same).
// x, y: (rows, d) contiguous; w: (d); rstd: (rows) fp32 out.
void qlora_rms_norm_forward(const void* x, const void* w, int64_t rows, int64_t d, float eps, void* y, float* rstd,
                            int dtype, int nthreads) {
  if (dtype == 0) norm_forward<0>(x, w, rows, d, eps, y, rstd, nthreads);
  else norm_forward<2>(x, w, rows, d, eps, y, rstd, nthreads);
}

// dx (rows, d) from dy (rows, d), the forward's x and rstd; w frozen (no dw).
void qlora_rms_norm_backward(const void* dy, const void* x, const void* w, const float* rstd, int64_t rows, int64_t d,
                             void* dx, int dtype, int nthreads) {
  if (dtype == 0) norm_backward<0>(dy, x, w, rstd, rows, d, dx, nthreads);
  else norm_backward<2>(dy, x, w, rstd, rows, d, dx, nthreads);
}

// h = silu(g) * u over n elements.
void qlora_swiglu_forward(const void* g, const void* u, void* h, int64_t n, int dtype, int nthreads) {
  if (dtype == 0) swiglu_forward<0>(g, u, h, n, nthreads);
  else swiglu_forward<2>(g, u, h, n, nthreads);
}

void qlora_swiglu_backward(const void* dh, const void* g, const void* u, void* dg, void* du, int64_t n, int dtype,
                           int nthreads) {
  if (dtype == 0) swiglu_backward<0>(dh, g, u, dg, du, n, nthreads);
  else swiglu_backward<2>(dh, g, u, dg, du, n, nthreads);
}

}  // extern "C"
