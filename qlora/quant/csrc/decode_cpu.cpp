// Kernels for one-token decode steps, called through ctypes (qlora/quant/fast/llama.py; one library with
// the other csrc/*.cpp files) and from llama_cpu.cpp: a 4-bit linear with its LoRA branch, a bf16
// matrix times a bf16 vector (the output head), and the argmax of that product through an int8
// screen; attention is in attention_cpu.cpp. The products are gemv.h's: AVX512-BF16 dot products,
// or fp32 FMAs over simd16.h (AVX2, NEON, or scalar in the portable build; the three give the same
// bits). LoRA's A and B are bf16 copies (as training casts them); A·x stays fp32 into B.
//
// No OpenMP: products big enough are split between the calling thread and one helper thread of
// our own (lanes.h, defined here), which server handler threads can share safely.

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "common.h"
#include "decode.h"
#include "gemv.h"
#include "lanes.h"
#include "simd16.h"

namespace qlora::lanes {

std::atomic<int> g_lanes{2};

namespace {
std::atomic<Lane*> g_lane{nullptr};
std::mutex g_lane_init;

void helper_loop(Lane* lane) {
  uint64_t seen = 0;
  for (;;) {
    uint64_t p;
    for (int spin = 0; (p = lane->posted.load(std::memory_order_acquire)) == seen; ++spin) {
      if (spin < 20000) {
        cpu_relax();
        continue;
      }
      std::unique_lock<std::mutex> lock(lane->m);
      lane->sleeping.store(true);
      lane->cv.wait(lock, [&] { return lane->posted.load() != seen; });
      lane->sleeping.store(false);
      spin = 0;
    }
    seen = p;
    lane->fn(lane->ctx, 1);
    lane->done.store(p, std::memory_order_release);
  }
}

}  // namespace

Lane* lane_for_this_process() {
  Lane* lane = g_lane.load(std::memory_order_acquire);
  const pid_t pid = getpid();
  if (lane != nullptr && lane->pid == pid) return lane;
  std::lock_guard<std::mutex> guard(g_lane_init);
  lane = g_lane.load();
  if (lane == nullptr || lane->pid != pid) {  // first use, or a forked child (the helper did not fork)
    lane = new Lane();  // never freed: the detached helper may use it until the process ends
    lane->pid = pid;
    try {
      std::thread(helper_loop, lane).detach();
    } catch (...) {
      return nullptr;
    }
    g_lane.store(lane, std::memory_order_release);
  }
  return lane;
}

}  // namespace qlora::lanes

namespace {

namespace gemv = qlora::gemv;
using qlora::lanes::kSplitMin;
using qlora::lanes::split_rows;
using qlora::lanes::two_lanes;
using qlora::lanes::wait_until;

thread_local std::vector<float> t_xa, t_delta;  // per thread (serve decodes on several)

// W4 rows [o0, o1) of out = W4·x + bias + s·B(A·x), given xa = A·x.
void linear_rows(const QloraDecodeLinear& L, const gemv::XIn* xin, const float* xa, int64_t o0, int64_t o1,
                 float* out) {
  gemv::gemv4_range(L, xin, o0, o1, out);
  if (L.bias)
    for (int64_t o = o0; o < o1; ++o) out[o] += L.bias[o];
  if (xa == nullptr) return;
  t_delta.resize(o1 - o0);  // the running thread's own scratch (as Scales' in gemv4_range)
  gemv::lora_b(L.lora_b + o0 * L.r, L.r, o1 - o0, xa, t_delta.data());  // o0 % 16 == 0: whole blocks
  for (int64_t o = o0; o < o1; ++o) out[o] += L.scaling * t_delta[o - o0];
}

}  // namespace

namespace qlora {

// `count` linears reading the same x (k, bf16): out = W4·x + bias + s·B(A·x) of each, one after
// another, with A·x kept in fp32 (A and B are bf16). Over two lanes, in one hand-off for all of them
// (q, k and v; gate and up): each lane computes half of every A·x's r entries, they meet once, then
// each does half the rows of every linear. Every output is one lane's sum as on one lane.
void decode_linears(const QloraDecodeLinear* Ls, int64_t count, const uint16_t* x, float* out) {
  constexpr int64_t kMost = 8;  // linears per hand-off
  if (count > kMost) {
    for (int64_t i = 0; i < count; out += Ls[i].n, ++i) decode_linears(Ls + i, 1, x, out);
    return;
  }
  const gemv::XIn* xin = gemv::gemv4_input(x, Ls[0].k);
  int64_t rank = 0, weights = 0;
  for (int64_t i = 0; i < count; ++i) rank += Ls[i].lora_a ? Ls[i].r : 0, weights += Ls[i].n * Ls[i].k;
  t_xa.resize(size_t(rank));
  float* xas[kMost];  // each linear's A·x in t_xa, or null (no LoRA)
  float* outs[kMost];
  for (int64_t i = 0, at = 0, o = 0; i < count; o += Ls[i].n, ++i) {
    xas[i] = Ls[i].lora_a ? t_xa.data() + at : nullptr, outs[i] = out + o;
    at += Ls[i].lora_a ? Ls[i].r : 0;
  }
  if (weights < kSplitMin) {
    for (int64_t i = 0; i < count; ++i) {
      if (xas[i]) gemv::gemv16(Ls[i].lora_a, Ls[i].r, Ls[i].k, x, xas[i]);
      linear_rows(Ls[i], xin, xas[i], 0, Ls[i].n, outs[i]);
    }
    return;
  }
  std::atomic<int> arrived{0};
  two_lanes([&](int lane, bool together) {
    for (int64_t i = 0; i < count; ++i) {  // A·x: half the ranks each, or all on lane 0
      const QloraDecodeLinear& L = Ls[i];
      if (!xas[i] || (!together && lane == 1)) continue;
      const int64_t c0 = !together || lane == 0 ? 0 : L.r / 2, c1 = together && lane == 0 ? L.r / 2 : L.r;
      gemv::gemv16(L.lora_a + c0 * L.k, c1 - c0, L.k, x, xas[i] + c0);
    }
    if (together && rank > 0) {
      arrived.fetch_add(1);
      wait_until([&] { return arrived.load() == 2; });
    }
    for (int64_t i = 0; i < count; ++i) {  // rows split at a multiple of 16 (lora_b's blocks)
      const QloraDecodeLinear& L = Ls[i];
      const int64_t half = (L.n / 2) / 16 * 16;
      lane == 0 ? linear_rows(L, xin, xas[i], 0, half, outs[i]) : linear_rows(L, xin, xas[i], half, L.n, outs[i]);
    }
  });
}

void decode_linear(const QloraDecodeLinear& L, const uint16_t* x, float* out) { decode_linears(&L, 1, x, out); }

void gemv_bf16(const uint16_t* w, int64_t n, int64_t k, const uint16_t* x, float* out) {
  split_rows(n, k, [&](int64_t o0, int64_t o1) { gemv::gemv16(w + o0 * k, o1 - o0, k, x, out + o0); });
}

// The index of the largest bf16(W[o] · x) (the lowest on a tie), as an argmax over gemv_bf16's
// output rounded to bf16 would give, reading W only where it can matter: an int8 copy
// (q, per-row scale s) gives a[o] = s[o] · (q[o] · x) with |W[o]·x - a[o]| <= err[o] · ||x||_2 + slack
// (err[o] = ||W[o] - s[o] q[o]||_2, Cauchy-Schwarz; slack covers fp32 summation), then the exact
// bf16 row for every o whose bound reaches the best lower bound less two bf16 steps. For greedy
// decoding: half the bytes of the output head.
int64_t argmax_gemv_bf16(const uint16_t* w, const int8_t* q, const float* scale, const float* err, int64_t n,
                         int64_t k, const uint16_t* x) {
  thread_local std::vector<float> x32, upper;
  x32.resize(k), upper.resize(n);
  float norm1 = 0.0f, norm2 = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    x32[j] = bf16_to_float(x[j]);
    norm1 += std::abs(x32[j]), norm2 += x32[j] * x32[j];
  }
  norm2 = std::sqrt(norm2) * 1.0001f;
  // |W[o,j]| <= 127.5 s[o]; both fp32 sums (screen and exact row) err by <= 2k 2^-24 of sum |w x|
  const float slack = 127.5f * norm1 * float(2 * k) * 0x1.0p-24f * 2.0f;
  float lower[2] = {-INFINITY, -INFINITY};  // per lane; max is exact, so the split changes nothing
  const float* xs = x32.data();  // this thread's buffers, by pointer: in the lambda on the helper
  float* up = upper.data();      // thread, a thread_local name would mean the helper's own
  split_rows(n, k, [&](int64_t o0, int64_t o1) {
    float best = -INFINITY;
    for (int64_t o = o0; o < o1; ++o) {
      const float a = scale[o] * gemv::gemv8_row(q + o * k, k, xs);
      const float b = err[o] * norm2 + scale[o] * slack;
      up[o] = a + b;
      best = std::max(best, a - b);
    }
    lower[o0 == 0 ? 0 : 1] = best;
  });
  const float best_lower = std::max(lower[0], lower[1]);
  const float threshold = best_lower - (std::abs(best_lower) * 0x1.0p-6f + 0x1.0p-20f);
  int64_t best = -1;
  float best_value = -INFINITY;
  for (int64_t o = 0; o < n; ++o) {
    if (!(upper[o] >= threshold)) continue;
    const float v = bf16_to_float(float_to_bf16(gemv::gemv16_row1(w + o * k, k, x)));
    if (best < 0 || v > best_value) best = o, best_value = v;
  }
  return best;
}

}  // namespace qlora

extern "C" {

// argmax_gemv_bf16 (see above): the index of the largest bf16(W[o] · x), lowest on a tie.
int64_t qlora_argmax_gemv_bf16(const uint16_t* w, const int8_t* q, const float* scale, const float* err, int64_t n,
                               int64_t k, const uint16_t* x) {
  return qlora::argmax_gemv_bf16(w, q, scale, err, n, k, x);
}

// Lanes for the decode products: 1 (the calling thread only) or 2 (with a helper thread).
void qlora_decode_threads(int n) { qlora::lanes::g_lanes.store(n > 1 ? 2 : 1); }

// 1 when the decode products are vectorized (AVX512-BF16 dot products, or simd16.h's AVX2 or NEON
// FMAs), 0 for the portable scalar ones.
int qlora_gemv_simd(void) {
#ifdef QLORA_GEMV_BF16
  return 1;
#else
  return v16::kVector ? 1 : 0;
#endif
}

// `count` linears that share the input x (bf16, k): their outputs one after another in out (fp32).
// Each needs k % bs == 0 and bs % 64 == 0 (llama_structs.py checks).
void qlora_decode_linear(const QloraDecodeLinear* layers, int64_t count, const uint16_t* x, float* out) {
  qlora::decode_linears(layers, count, x, out);
}

// out (n, fp32) = W (n, k, bf16) · x (k, bf16), fp32 sums; with `round`, each rounded to bf16 as a
// bf16 matmul's output would be (kept as fp32: an argmax over fp32 is 4x faster in torch).
void qlora_gemv_bf16(const uint16_t* w, int64_t n, int64_t k, const uint16_t* x, float* out, int round) {
  qlora::gemv_bf16(w, n, k, x, out);
  if (round)
    for (int64_t o = 0; o < n; ++o) out[o] = bf16_to_float(float_to_bf16(out[o]));
}

}  // extern "C"
