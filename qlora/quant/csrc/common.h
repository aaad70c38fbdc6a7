// Helpers shared by quant_cpu.cpp and decode_cpu.cpp (one definition of the bf16 rounding and of
// a Double-Quantized block scale).
#pragma once

#include <cstdint>
#include <cstring>

namespace {

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// fp32 -> bf16, round to nearest even, as c10::BFloat16 (a NaN becomes the canonical 0x7fc0).
inline uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7fc0;
  const uint32_t u = bits_of(f);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t h) { return float_of(uint32_t(h) << 16); }

// The scale of 4-bit block b: absmax[b], or with Double Quantization (qabsmax not null)
// code8[qabsmax[b]] * nested_absmax[b / nested_bs] + offset.
inline float block_scale(const float* absmax, const uint8_t* qabsmax, const float* nested_absmax,
                         const float* code8, float offset, int64_t nested_bs, int64_t b) {
  if (qabsmax == nullptr) return absmax[b];
  const float s = code8[qabsmax[b]] * nested_absmax[b / nested_bs];  // Double Quantization, then
  return s + offset;                                                  // + offset as a second rounding
}

}  // namespace
