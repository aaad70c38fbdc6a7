// Kernels for one-token decode steps, called through ctypes (qlora/quant/fast.py; same library as
// quant_cpu.cpp) and from llama_cpu.cpp: a 4-bit linear with its LoRA branch, a bf16 matrix times a
// bf16 vector (the output head), and attention of one query row over a KV cache.
//
// Decoding one token reads every weight once and does two flops with it, so the speed is how fast
// the weights stream in and get unpacked. qlora_gemm_4bit (quant_cpu.cpp) spends ~8 vector
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
// results equal x · dequantize(W, fp32)ᵀ up to fp32 summation order. LoRA's A and B are bf16
// copies (as training casts them); A·x stays fp32 into B.
//
// No OpenMP: products big enough are split between the calling thread and one helper thread of
// our own ("a second lane", below), which server handler threads can share safely.

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && !defined(QLORA_PORTABLE)
#define QLORA_GEMV_BF16 1
#include <immintrin.h>
#endif

#include "decode.h"

namespace {

// Scratch for the rearranged inputs, per thread (serve decodes on several).
thread_local std::vector<uint16_t> t_x;
thread_local std::vector<float> t_xa, t_delta, t_scales;

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

inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
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

#else  // portable: the same sums in scalar fp32

void gemv16(const uint16_t* w, int64_t n, int64_t k, const uint16_t* x, float* out) {
  for (int64_t o = 0; o < n; ++o) {
    float acc = 0.0f;
    for (int64_t j = 0; j < k; ++j) acc += bf16_to_float(w[o * k + j]) * bf16_to_float(x[j]);
    out[o] = acc;
  }
}

float gemv16_row1(const uint16_t* w, int64_t k, const uint16_t* x) {
  float acc = 0.0f;
  for (int64_t j = 0; j < k; ++j) acc += bf16_to_float(w[j]) * bf16_to_float(x[j]);
  return acc;
}

float gemv8_row(const int8_t* q, int64_t k, const float* x) {
  float acc = 0.0f;
  for (int64_t j = 0; j < k; ++j) acc += float(q[j]) * x[j];
  return acc;
}

void lora_b(const uint16_t* b16, int64_t r, int64_t n, const float* xa, float* out) {
  for (int64_t o = 0; o < n; ++o) {
    float acc = 0.0f;
    for (int64_t c = 0; c < r; ++c) acc += bf16_to_float(b16[((o / 16) * r + c) * 16 + o % 16]) * xa[c];
    out[o] = acc;
  }
}

const uint16_t* gemv4_input(const uint16_t* x, int64_t) { return x; }

void gemv4_range(const QloraDecodeLinear& L, const uint16_t* x, int64_t o0, int64_t o1, float* out) {
  const int64_t k = L.k, bs = L.bs;
  Scales scales(L, o0);
  for (int64_t o = o0; o < o1; ++o) {
    const float* s = scales.next_rows(1);
    float acc = 0.0f;
    for (int64_t j0 = 0; j0 < k; j0 += bs) {
      float d = 0.0f;
      for (int64_t j = j0; j < j0 + bs; ++j) {
        const uint8_t byte = L.packed[(o * k + j) / 2];
        d += L.code[j % 2 ? byte & 0xF : byte >> 4] * bf16_to_float(x[j]);
      }
      acc += d * s[j0 / bs];
    }
    out[o] = acc;
  }
}

#endif

}  // namespace

namespace {

// ---- a second lane ----
// Decoding one token streams ~150 MB of weights through 250 small matrix-vector products; one core
// unpacks 4-bit codes at ~10 GB/s, below what memory gives two. So each product above kSplitMin
// weights is split by rows between the calling thread and one helper thread: every output row is
// still one thread's sum in the same order, so results are bit-identical to one lane.
// The helper is a detached std::thread whose state is never destroyed, so nothing of it runs at
// exit; it spins ~0.2 ms waiting for work (a token's products come ~20 us apart), then sleeps on a
// condition variable. One caller at a time uses it (others, e.g. a server's other handler threads,
// run both halves themselves); a forked child starts its own helper.
struct Lane {
  std::atomic<uint64_t> posted{0}, done{0};
  std::atomic<bool> sleeping{false};
  std::atomic_flag busy = ATOMIC_FLAG_INIT;
  void (*fn)(void*, int) = nullptr;
  void* ctx = nullptr;
  std::mutex m;
  std::condition_variable cv;
  pid_t pid = 0;
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

std::atomic<int> g_lanes{2};  // qlora_decode_threads(): 1 keeps everything on the calling thread
std::atomic<Lane*> g_lane{nullptr};
std::mutex g_lane_init;
constexpr int64_t kSplitMin = int64_t(1) << 16;  // weights; a hand-off costs ~1 us against ~10 us of work

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

// f(0, true) here and f(1, true) on the helper when it is free and wanted, else f(0, false) then
// f(1, false) here (`together`: whether the two may wait for each other); returns when both ran.
template <class F>
void two_lanes(F&& f) {
  Lane* lane = g_lanes.load(std::memory_order_relaxed) > 1 ? lane_for_this_process() : nullptr;
  if (lane == nullptr || lane->busy.test_and_set(std::memory_order_acquire)) {
    f(0, false), f(1, false);
    return;
  }
  lane->fn = [](void* c, int i) { (*static_cast<F*>(c))(i, true); };
  lane->ctx = &f;
  const uint64_t p = lane->posted.load(std::memory_order_relaxed) + 1;
  lane->posted.store(p);  // seq_cst: ordered before the load of `sleeping` below
  if (lane->sleeping.load()) {
    std::lock_guard<std::mutex> lock(lane->m);
    lane->cv.notify_one();
  }
  f(0, true);
  while (lane->done.load(std::memory_order_acquire) != p) cpu_relax();
  lane->busy.clear(std::memory_order_release);
}

// rows(o0, o1) over [0, n): split at a multiple of 16 rows when the product has >= kSplitMin weights.
template <class F>
void split_rows(int64_t n, int64_t k, F&& rows) {
  const int64_t half = (n / 2) / 16 * 16;
  if (n * k < kSplitMin || half == 0) {
    rows(int64_t(0), n);
    return;
  }
  two_lanes([&](int lane, bool) { lane == 0 ? rows(int64_t(0), half) : rows(half, n); });
}

// W4 rows [o0, o1) of out = W4·x + bias + s·B(A·x), given xa = A·x.
void linear_rows(const QloraDecodeLinear& L, const uint16_t* xin, const float* xa, int64_t o0, int64_t o1, float* out) {
  ::gemv4_range(L, xin, o0, o1, out);
  if (L.bias)
    for (int64_t o = o0; o < o1; ++o) out[o] += L.bias[o];
  if (xa == nullptr) return;
  t_delta.resize(o1 - o0);  // the running thread's own scratch (as Scales' in gemv4_range)
  ::lora_b(L.lora_b + o0 * L.r, L.r, o1 - o0, xa, t_delta.data());  // o0 % 16 == 0: whole blocks
  for (int64_t o = o0; o < o1; ++o) out[o] += L.scaling * t_delta[o - o0];
}

}  // namespace

namespace qlora {

// out = W4·x + bias + s·B(A·x), with A·x kept in fp32 (A and B are bf16). Split over two lanes,
// A·x is too: each lane computes half of its r entries, they meet, then each does half the rows.
void decode_linear(const QloraDecodeLinear& L, const uint16_t* x, float* out) {
  const uint16_t* xin = ::gemv4_input(x, L.k);
  const int64_t half = (L.n / 2) / 16 * 16;
  float* xa = nullptr;
  if (L.lora_a) t_xa.resize(L.r), xa = t_xa.data();
  if (L.n * L.k < kSplitMin || half == 0) {
    if (xa) ::gemv16(L.lora_a, L.r, L.k, x, xa);
    linear_rows(L, xin, xa, 0, L.n, out);
    return;
  }
  const int64_t r_half = L.r / 2;
  std::atomic<int> arrived{0};
  two_lanes([&](int lane, bool together) {
    if (xa && together) {
      const int64_t c0 = lane == 0 ? 0 : r_half, c1 = lane == 0 ? r_half : L.r;
      ::gemv16(L.lora_a + c0 * L.k, c1 - c0, L.k, x, xa + c0);
      arrived.fetch_add(1);
      while (arrived.load() < 2) cpu_relax();
    } else if (xa && lane == 0) {
      ::gemv16(L.lora_a, L.r, L.k, x, xa);
    }
    lane == 0 ? linear_rows(L, xin, xa, 0, half, out) : linear_rows(L, xin, xa, half, L.n, out);
  });
}

void gemv_bf16(const uint16_t* w, int64_t n, int64_t k, const uint16_t* x, float* out) {
  split_rows(n, k, [&](int64_t o0, int64_t o1) { ::gemv16(w + o0 * k, o1 - o0, k, x, out + o0); });
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
      const float a = scale[o] * ::gemv8_row(q + o * k, k, xs);
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
    const float v = bf16_to_float(float_to_bf16(::gemv16_row1(w + o * k, k, x)));
    if (best < 0 || v > best_value) best = o, best_value = v;
  }
  return best;
}

void exp_inplace(float* x, int64_t n) {
  int64_t i = 0;
#ifdef QLORA_GEMV_BF16
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, exp16(_mm512_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

// Attention of one query row: for each of the H heads (head h reads kv head h / (H / KV), as
// repeat_kv orders them), softmax(scale · q·Kᵀ) · V over the first T cached positions, in fp32.
// The cache is bf16 (the model's keys and values are bf16: exact, and half the bytes of fp32 to
// stream per token). Keys are stored in blocks of 16 positions, each transposed ((KV, capacity / 16,
// D, 16)), so 16 scores build up in the lanes of one register, with no horizontal sums; values are
// (KV, capacity, D).
// Heads [h0, h1) of attention() below.
void attention_heads(const float* q, const uint16_t* keys, const uint16_t* values, int64_t capacity, int64_t T,
                     int64_t H, int64_t KV, int64_t D, float scale, float* out, int64_t h0, int64_t h1) {
  thread_local std::vector<float> p;  // the running thread's own scores
  const int64_t blocks = (T + 15) / 16;
  p.resize(blocks * 16);
  for (int64_t h = h0; h < h1; ++h) {
    const float* qh = q + h * D;
    const uint16_t* K = keys + (h / (H / KV)) * capacity * D;
    const uint16_t* V = values + (h / (H / KV)) * capacity * D;
    float* o = out + h * D;
    for (int64_t b = 0; b < blocks; ++b) {  // scores of positions 16b .. 16b+15
      const uint16_t* kb = K + b * D * 16;
#ifdef QLORA_GEMV_BF16
      __m512 s0 = _mm512_setzero_ps(), s1 = s0;
      int64_t j = 0;
      for (; j + 2 <= D; j += 2) {
        s0 = _mm512_fmadd_ps(_mm512_set1_ps(qh[j]), load_bf16(kb + j * 16, 0xffff), s0);
        s1 = _mm512_fmadd_ps(_mm512_set1_ps(qh[j + 1]), load_bf16(kb + j * 16 + 16, 0xffff), s1);
      }
      if (j < D) s0 = _mm512_fmadd_ps(_mm512_set1_ps(qh[j]), load_bf16(kb + j * 16, 0xffff), s0);
      _mm512_storeu_ps(p.data() + b * 16, _mm512_mul_ps(_mm512_add_ps(s0, s1), _mm512_set1_ps(scale)));
#else
      for (int64_t i = 0; i < 16; ++i) {
        float s = 0.0f;
        for (int64_t j = 0; j < D; ++j) s += qh[j] * bf16_to_float(kb[j * 16 + i]);
        p[b * 16 + i] = s * scale;
      }
#endif
    }
    const float m = *std::max_element(p.begin(), p.begin() + T);
    for (int64_t t = 0; t < T; ++t) p[t] -= m;
    exp_inplace(p.data(), T);
    float sum = 0.0f;
    for (int64_t t = 0; t < T; ++t) sum += p[t];
#ifdef QLORA_GEMV_BF16
    if (D % 16 == 0 && D <= 256) {
      __m512 acc[16];
      for (int64_t v = 0; v < D / 16; ++v) acc[v] = _mm512_setzero_ps();
      for (int64_t t = 0; t < T; ++t) {
        const __m512 pt = _mm512_set1_ps(p[t]);
        for (int64_t v = 0; v < D / 16; ++v)
          acc[v] = _mm512_fmadd_ps(pt, load_bf16(V + t * D + v * 16, 0xffff), acc[v]);
      }
      for (int64_t v = 0; v < D / 16; ++v) _mm512_storeu_ps(o + v * 16, _mm512_div_ps(acc[v], _mm512_set1_ps(sum)));
      continue;
    }
#endif
    std::fill(o, o + D, 0.0f);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < D; ++j) o[j] += p[t] * bf16_to_float(V[t * D + j]);
    for (int64_t j = 0; j < D; ++j) o[j] /= sum;
  }
}


void attention(const float* q, const uint16_t* keys, const uint16_t* values, int64_t capacity, int64_t T,
               int64_t H, int64_t KV, int64_t D, float scale, float* out) {
  if (T * H * D < kSplitMin || H < 2) {  // short contexts: one lane
    attention_heads(q, keys, values, capacity, T, H, KV, D, scale, out, 0, H);
    return;
  }
  two_lanes([&](int lane, bool) {  // each head is one lane's, so the split changes nothing
    attention_heads(q, keys, values, capacity, T, H, KV, D, scale, out, lane == 0 ? 0 : H / 2, lane == 0 ? H / 2 : H);
  });
}
}  // namespace qlora

extern "C" {

// argmax_gemv_bf16 (see above): the index of the largest bf16(W[o] · x), lowest on a tie.
int64_t qlora_argmax_gemv_bf16(const uint16_t* w, const int8_t* q, const float* scale, const float* err, int64_t n,
                               int64_t k, const uint16_t* x) {
  return qlora::argmax_gemv_bf16(w, q, scale, err, n, k, x);
}

// Lanes for the decode products: 1 (the calling thread only) or 2 (with a helper thread).
void qlora_decode_threads(int n) { g_lanes.store(n > 1 ? 2 : 1); }

// 1 when the bf16 dot-product kernels are built (AVX512-BF16), 0 for the portable scalar ones.
int qlora_gemv_simd(void) {
#ifdef QLORA_GEMV_BF16
  return 1;
#else
  return 0;
#endif
}

// `count` linears that share the input x (bf16, k): their outputs one after another in out (fp32).
// Each needs k % bs == 0 and bs % 64 == 0 (fast.py checks).
void qlora_decode_linear(const QloraDecodeLinear* layers, int64_t count, const uint16_t* x, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    qlora::decode_linear(layers[i], x, out);
    out += layers[i].n;
  }
}

// out (n, fp32) = W (n, k, bf16) · x (k, bf16), fp32 sums; with `round`, each rounded to bf16 as a
// bf16 matmul's output would be (kept as fp32: an argmax over fp32 is 4x faster in torch).
void qlora_gemv_bf16(const uint16_t* w, int64_t n, int64_t k, const uint16_t* x, float* out, int round) {
  qlora::gemv_bf16(w, n, k, x, out);
  if (round)
    for (int64_t o = 0; o < n; ++o) out[o] = bf16_to_float(float_to_bf16(out[o]));
}

// out (H, D) = attention of q (H, D) over the first T positions of keys (KV, capacity / 16, D, 16)
// and values (KV, capacity, D), both bf16.
void qlora_decode_attention(const float* q, const uint16_t* keys, const uint16_t* values, int64_t capacity, int64_t T,
                            int64_t H, int64_t KV, int64_t D, float scale, float* out) {
  qlora::attention(q, keys, values, capacity, T, H, KV, D, scale, out);
}

}  // extern "C"
