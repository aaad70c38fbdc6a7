// What llama_cpu.cpp uses from decode_cpu.cpp: the one-token kernels and the description of a
// 4-bit linear (+ LoRA) they take.
#pragma once

#include <cstdint>

extern "C" {
// One 4-bit linear (+ LoRA) of a decode step; fast.py's _DecodeLinear mirrors this layout.
struct QloraDecodeLinear {
  const uint8_t* packed;       // (n * k / 2) codes, element 2i in the high nibble of byte i
  const float* absmax;         // fp32 block scales, or null with Double Quantization:
  const uint8_t* qabsmax;      //   uint8 scales, decoded as in block_scale (common.h)
  const float* nested_absmax;
  const float* code8;
  const float* code;           // the 16-entry 4-bit codebook
  const float* bias;           // (n) fp32 or null
  const uint16_t* lora_a;      // (r, k) bf16, or null: no LoRA
  const uint16_t* lora_b;      // (n, r) bf16
  float offset, scaling;       // DQ offset; LoRA scale s
  int64_t nested_bs, bs, n, k, r;
};
}

namespace qlora {

// out (n, fp32) = W4·x + bias + s·B(A·x) for x (k, bf16).
void decode_linear(const QloraDecodeLinear& L, const uint16_t* x, float* out);
// out (n, fp32) = W (n, k, bf16) · x (k, bf16).
void gemv_bf16(const uint16_t* w, int64_t n, int64_t k, const uint16_t* x, float* out);
// out (H, D) = softmax(scale · q·Kᵀ)·V over T positions of keys/values (KV, stride / D, D); fp32.
void attention(const float* q, const float* keys, const float* values, int64_t stride, int64_t T, int64_t H,
               int64_t KV, int64_t D, float scale, float* out);

}  // namespace qlora
