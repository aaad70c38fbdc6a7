// One decode step of a llama-family model (LlamaForCausalLM: RMSNorm, rotary, grouped-query
// attention, SwiGLU) in one call: token in, logits out, keys and values appended to a cache.
// qlora/decoder.py describes the model (pointers into the HF modules' tensors) and keeps the
// PyTorch version of this step, which is its definition and the tests' reference.
//
// Why in C++: at batch 1 the step is ~40 small ops per layer, and through PyTorch each costs a few
// microseconds of dispatch — about a fifth of a SmolLM2-135M token. The arithmetic is the PyTorch
// step's: bf16 activations rounded at the same points, attention in fp32. Sums may run in another
// order (RMSNorm's mean of squares, exp in softmax and SiLU), so results agree to a bf16 rounding
// now and then, not bit for bit.
//
// Single-threaded, as the other decode kernels (see decode_cpu.cpp).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "decode.h"

namespace {


thread_local std::vector<uint16_t> t_h, t_x, t_act;
thread_local std::vector<float> t_out, t_q, t_att;

// LlamaRMSNorm: w · bf16(x · rsqrt(mean(x²) + eps)), the product rounded to bf16.
void rms_norm(const uint16_t* h, const uint16_t* w, int64_t n, float eps, uint16_t* out) {
  float ss = 0.0f;
  for (int64_t i = 0; i < n; ++i) ss += bf(h[i]) * bf(h[i]);
  const float r = 1.0f / std::sqrt(ss / float(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = to_bf(bf(w[i]) * bf(to_bf(bf(h[i]) * r)));
}

// apply_rotary_pos_emb on one head (bf16 in place): x·cos + rotate_half(x)·sin, each product and
// the sum rounded to bf16 as the bf16 tensor ops round them.
void rotary(uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t d) {
  uint16_t tmp[1024];
  const int64_t half = d / 2;
  for (int64_t j = 0; j < d; ++j) {
    const float rot = j < half ? -bf(x[j + half]) : bf(x[j - half]);
    tmp[j] = to_bf(bf(to_bf(bf(x[j]) * bf(cos[j]))) + bf(to_bf(rot * bf(sin[j]))));
  }
  std::copy(tmp, tmp + d, x);
}

// h += bf16(out), rounded to bf16 (a residual add in bf16).
void add_residual(uint16_t* h, const float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = to_bf(bf(h[i]) + bf(to_bf(out[i])));
}

void layer_step(const QloraLlama& m, const QloraLlamaLayer& L, uint16_t* h, int64_t pos) {
  const int64_t d = m.head_dim, nq = m.heads * d, nkv = m.kv_heads * d, I = m.intermediate;
  uint16_t* x = t_x.data();
  float* out = t_out.data();
  // attention block
  rms_norm(h, L.norm1, m.hidden, m.eps, x);
  qlora::decode_linears(L.qkv, 3, x, out);  // q, k, v: one input, outputs one after another
  uint16_t* qkv = t_act.data();  // the projections in bf16
  for (int64_t i = 0; i < nq + 2 * nkv; ++i) qkv[i] = to_bf(out[i]);
  for (int64_t hd = 0; hd < m.heads + m.kv_heads; ++hd) rotary(qkv + hd * d, m.cos + pos * d, m.sin + pos * d, d);
  for (int64_t g = 0; g < m.kv_heads; ++g)  // keys in blocks of 16 positions, transposed (decode.h)
    for (int64_t j = 0; j < d; ++j) {
      L.keys[((g * m.capacity + pos - pos % 16) * d) + j * 16 + pos % 16] = qkv[nq + g * d + j];
      L.values[(g * m.capacity + pos) * d + j] = qkv[nq + nkv + g * d + j];
    }
  float* q = t_q.data();
  for (int64_t i = 0; i < nq; ++i) q[i] = bf(qkv[i]);
  qlora::attention(q, L.keys, L.values, m.capacity, pos + 1, m.heads, m.kv_heads, d, m.scale, t_att.data());
  for (int64_t i = 0; i < nq; ++i) x[i] = to_bf(t_att[i]);  // x now holds the attention output
  qlora::decode_linear(*L.o, x, out);
  add_residual(h, out, m.hidden);
  // MLP block
  rms_norm(h, L.norm2, m.hidden, m.eps, x);
  qlora::decode_linears(L.gate_up, 2, x, out);  // gate, then up at out + I
  float* e = t_q.data();  // exp(-gate)
  for (int64_t i = 0; i < I; ++i) e[i] = -bf(to_bf(out[i]));
  qlora::exp_inplace(e, I);
  uint16_t* act = t_act.data();
  for (int64_t i = 0; i < I; ++i) {
    const float g = bf(to_bf(out[i])), u = bf(to_bf(out[I + i]));
    act[i] = to_bf(bf(to_bf(g / (1.0f + e[i]))) * u);  // bf16 silu(gate), times up, rounded
  }
  qlora::decode_linear(*L.down, act, out);
  add_residual(h, out, m.hidden);
}

// Embedding, the layers, the final norm: t_x holds the head's input. False if out of range.
bool forward(const QloraLlama& m, int64_t token, int64_t pos) {
  if (token < 0 || token >= m.vocab || pos < 0 || pos >= m.capacity || m.head_dim > 1024 || m.capacity % 16)
    return false;
  const int64_t width = std::max({m.hidden, m.heads * m.head_dim, 2 * m.intermediate,
                                  (m.heads + 2 * m.kv_heads) * m.head_dim});
  t_h.assign(m.embed + token * m.hidden, m.embed + (token + 1) * m.hidden);
  t_x.resize(width), t_act.resize(width), t_out.resize(width), t_q.resize(width), t_att.resize(width);
  for (int64_t i = 0; i < m.n_layers; ++i) layer_step(m, m.layers[i], t_h.data(), pos);
  rms_norm(t_h.data(), m.norm, m.hidden, m.eps, t_x.data());
  return true;
}

}  // namespace

extern "C" {

// logits (vocab, fp32 holding bf16 values) for `token` at position `pos` (< capacity); writes the
// keys and values of `pos` into each layer's cache. Returns 0, or -1 if a size is out of range.
int qlora_llama_step(const QloraLlama* model, int64_t token, int64_t pos, float* logits) {
  const QloraLlama& m = *model;
  if (!forward(m, token, pos)) return -1;
  if (m.head) {
    qlora::gemv_bf16(m.head, m.vocab, m.hidden, t_x.data(), logits);
  } else {
    qlora::decode_linear(*m.head_4bit, t_x.data(), logits);
  }
  for (int64_t o = 0; o < m.vocab; ++o) logits[o] = bf(to_bf(logits[o]));  // a bf16 linear's output
  return 0;
}

// The step for greedy decoding: the next token, the argmax of qlora_llama_step's logits (the lowest
// index on a tie), through the int8 screen of the head when there is one. -1 if out of range.
int64_t qlora_llama_greedy(const QloraLlama* model, int64_t token, int64_t pos) {
  const QloraLlama& m = *model;
  if (m.head && m.head_q) {
    if (!forward(m, token, pos)) return -1;
    return qlora::argmax_gemv_bf16(m.head, m.head_q, m.head_scale, m.head_err, m.vocab, m.hidden, t_x.data());
  }
  thread_local std::vector<float> logits;
  logits.resize(m.vocab);
  if (qlora_llama_step(model, token, pos, logits.data()) != 0) return -1;
  return std::max_element(logits.begin(), logits.end()) - logits.begin();
}

}  // extern "C"
