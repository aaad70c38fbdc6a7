// What llama_cpu.cpp uses from decode_cpu.cpp: the one-token kernels, the description of a 4-bit
// linear (+ LoRA) they take, and the model description the llama step takes.
#pragma once

#include <cstdint>

extern "C" {
// One 4-bit linear (+ LoRA) of a decode step; qlora/quant/fast/llama_structs.py's _DecodeLinear mirrors this layout.
struct QloraDecodeLinear {
  const uint8_t* packed;       // (n * k / 2) codes, element 2i in the high nibble of byte i
  const float* absmax;         // fp32 block scales, or null with Double Quantization:
  const uint8_t* qabsmax;      //   uint8 scales, decoded as in block_scale (common.h)
  const float* nested_absmax;
  const float* code8;
  const float* code;           // the 16-entry 4-bit codebook
  const float* bias;           // (n) fp32 or null
  const uint16_t* lora_a;      // (r, k) bf16, or null: no LoRA
  const uint16_t* lora_b;      // B in blocks of 16 rows, transposed: (ceil(n / 16), r, 16) bf16
  float offset, scaling;       // DQ offset; LoRA scale s
  int64_t nested_bs, bs, n, k, r;
};
}

extern "C" {
// A llama-family model for llama_cpu.cpp's step; qlora/quant/fast/llama_structs.py mirrors these two layouts.
struct QloraLlamaLayer {
  const uint16_t* norm1;                 // input_layernorm weight (hidden) bf16
  const uint16_t* norm2;                 // post_attention_layernorm weight
  const QloraDecodeLinear* qkv;          // q, k, v projections (3)
  const QloraDecodeLinear* o;            // o_proj (1)
  const QloraDecodeLinear* gate_up;      // gate, up (2)
  const QloraDecodeLinear* down;         // down_proj (1)
  uint16_t* keys;                        // (kv_heads, capacity / 16, head_dim, 16) bf16 (decode.h)
  uint16_t* values;                      // (kv_heads, capacity, head_dim) bf16
};

struct QloraLlama {
  const QloraLlamaLayer* layers;
  const uint16_t* embed;                 // (vocab, hidden) bf16
  const uint16_t* norm;                  // final norm weight
  const uint16_t* head;                  // (vocab, hidden) bf16, or null: head_4bit
  const QloraDecodeLinear* head_4bit;
  const int8_t* head_q;                  // int8 screen of a bf16 head for greedy steps (argmax_gemv_bf16),
  const float* head_scale;               //   per-row scales and error norms; null: no screen
  const float* head_err;
  const uint16_t* cos;                   // (capacity, head_dim) bf16, as the rotary module gives them
  const uint16_t* sin;
  int64_t n_layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, capacity;  // capacity % 16 == 0
  float eps, scale;                      // RMSNorm epsilon; attention scale (head_dim^-0.5)
};
}

namespace qlora {

// out (n, fp32) = W4·x + bias + s·B(A·x) for x (k, bf16).
void decode_linear(const QloraDecodeLinear& L, const uint16_t* x, float* out);
// decode_linear of `count` linears with the same x (and k), outputs one after another, in one hand-off.
void decode_linears(const QloraDecodeLinear* Ls, int64_t count, const uint16_t* x, float* out);
// out (n, fp32) = W (n, k, bf16) · x (k, bf16).
void gemv_bf16(const uint16_t* w, int64_t n, int64_t k, const uint16_t* x, float* out);
// argmax over o of bf16(W[o] · x) (lowest index on a tie) through an int8 screen of W (decode_cpu.cpp).
int64_t argmax_gemv_bf16(const uint16_t* w, const int8_t* q, const float* scale, const float* err, int64_t n,
                         int64_t k, const uint16_t* x);
// out (H, D) = softmax(scale · q·Kᵀ)·V over T positions, fp32; keys (KV, capacity / 16, D, 16):
// blocks of 16 positions, transposed; values (KV, capacity, D); both bf16.
void attention(const float* q, const uint16_t* keys, const uint16_t* values, int64_t capacity, int64_t T,
               int64_t H, int64_t KV, int64_t D, float scale, float* out);
// x[i] = exp(x[i]), 16 lanes at a time (~1 ulp).
void exp_inplace(float* x, int64_t n);

}  // namespace qlora
