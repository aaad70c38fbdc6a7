// Seeded dropout on CPU, called from qlora/nn/dropout.py through ctypes (built into the same
// library as quant_cpu.cpp; see qlora/quant/fast.py).
//
//   out[i] = keep(i) ? x[i] * scale : 0,   keep(i) = mix(i, seed) >= threshold
//
// The mask is a pure function of (element index, 32-bit seed): backward re-applies it to the
// gradient instead of storing it, and the PyTorch reference (dropout.keep_mask) computes the same
// bits on any device. mix() is MurmurHash3's 32-bit finaliser over a Weyl-sequence counter.
// torch's bernoulli_ spent 18% of a SmolLM2 training step drawing these masks; this is one pass.

#include <cstdint>
#include <cstring>

namespace {

inline uint32_t mix(uint32_t i, uint32_t seed) {
  uint32_t h = (i * 0x9E3779B9u) ^ seed;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// fp32 -> bf16 round-to-nearest-even, NaN -> 0x7FC0: c10::BFloat16's rounding, so x * scale in
// bf16 here equals torch's.
inline uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return uint16_t((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

inline float from_bf16(uint16_t v) {
  uint32_t b = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

constexpr int64_t kParallelMin = int64_t(1) << 21;  // as in quant_cpu.cpp: small calls stay on one thread

}  // namespace

extern "C" {

// x, out: n contiguous elements, dtype 0 = fp32, 2 = bf16 (fast.py's numbering). out may alias x.
void qlora_dropout(const void* x, void* out, int64_t n, int dtype, uint32_t threshold, float scale, uint32_t seed,
                   int nthreads) {
  if (dtype == 2) {
    const uint16_t* in = static_cast<const uint16_t*>(x);
    uint16_t* o = static_cast<uint16_t*>(out);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i)
      o[i] = mix(uint32_t(i), seed) >= threshold ? to_bf16(from_bf16(in[i]) * scale) : uint16_t(0);
  } else {
    const float* in = static_cast<const float*>(x);
    float* o = static_cast<float*>(out);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) o[i] = mix(uint32_t(i), seed) >= threshold ? in[i] * scale : 0.0f;
  }
}

}  // extern "C"
