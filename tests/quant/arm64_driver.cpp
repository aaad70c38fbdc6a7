// Test driver for tests/quant/test_arm64.py: runs every extern "C" kernel of qlora/quant/csrc on
// inputs read from a file and writes every output to another file, so that builds of the same
// sources (aarch64 NEON under qemu, aarch64 portable, x86 portable, x86 SIMD) can be compared
// byte for byte. No torch, no Python: compiled together with qlora/quant/csrc/*.cpp, e.g.
//
//   aarch64-linux-gnu-g++ -O3 -std=c++17 -ffp-contract=off [-DQLORA_PORTABLE] -Iqlora/quant/csrc
//     tests/quant/arm64_driver.cpp qlora/quant/csrc/*.cpp -static -o drv
//   qemu-aarch64-static ./drv in.bin out.bin
//
// Each kernel is called as qlora/quant/fast/'s bindings call it (same arguments; nthreads 1:
// the OpenMP regions start at 2M elements anyway, and the library is built without -fopenmp here).
//
// Input (little-endian): "QA64IN01", u32 call count, then per call: name (u32 length + bytes; the op
// is the part before the first '/'), u32 count + that many int64 parameters, u32 count + float32
// parameters, u32 count + buffers (u8 present, u64 length, bytes; absent = a null pointer).
// Output: "QA64OUT1", u32 call count, per call: name, u32 count, then per output a label
// ("name:dtype", u32 length + bytes), u64 length and the bytes.
// Output buffers are filled with 0xCD before the call (an element a build forgets to write shows as
// a difference) and followed by 64 guard bytes: a write past the end fails the run (exit 3).

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "decode.h"  // QloraDecodeLinear, QloraLlamaLayer, QloraLlama

// The library's entry points (their definitions: qlora/quant/csrc/*.cpp; argtypes: qlora/quant/fast/).
extern "C" {
int qlora_simd(void);
int qlora_gemv_simd(void);
// newer sources only: null where absent
const char* qlora_isa(void) __attribute__((weak));
void qlora_exp(float* x, int64_t n) __attribute__((weak));
int64_t qlora_quantize_4bit(const void* x, int dtype, int64_t n, int64_t bs, const float* bounds,
                            const uint8_t* order, uint8_t* packed, float* absmax, int nthreads);
void qlora_dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                           const float* nested_absmax, const float* code8, float offset, int64_t nested_bs,
                           const float* code, int64_t n, int64_t bs, void* out, int dtype, int nthreads);
int64_t qlora_quantize_8bit(const float* x, int64_t n, int64_t bs, const uint8_t* lut, uint8_t* q, float* absmax,
                            int nthreads);
void qlora_dequantize_8bit(const uint8_t* q, const float* absmax, const float* code, int64_t n, int64_t bs,
                           float* out, int nthreads);
void qlora_gemm_4bit(const float* x, int64_t m, int64_t k, const uint8_t* packed, const float* absmax,
                     const uint8_t* qabsmax, const float* nested_absmax, const float* code8, float offset,
                     int64_t nested_bs, const float* code, int64_t n_out, int64_t bs, float* out, int nthreads);
void qlora_dropout(const void* x, void* out, int64_t n, int dtype, uint32_t threshold, float scale, uint32_t seed,
                   int nthreads);
void qlora_rms_norm_forward(const void* x, const void* w, int64_t rows, int64_t d, float eps, void* y, float* rstd,
                            int dtype, int nthreads);
void qlora_rms_norm_backward(const void* dy, const void* x, const void* w, const float* rstd, int64_t rows, int64_t d,
                             void* dx, int dtype, int nthreads);
void qlora_swiglu_forward(const void* g, const void* u, void* h, int64_t n, int dtype, int nthreads);
void qlora_swiglu_backward(const void* dh, const void* g, const void* u, void* dg, void* du, int64_t n, int dtype,
                           int nthreads);
void qlora_cross_entropy_rows(uint16_t* z, int64_t rows, int64_t v, const int64_t* targets, float* loss, int grad,
                              int nthreads);
void qlora_decode_threads(int n);
void qlora_decode_linear(const QloraDecodeLinear* layers, int64_t count, const uint16_t* x, float* out);
void qlora_gemv_bf16(const uint16_t* w, int64_t n, int64_t k, const uint16_t* x, float* out, int round);
void qlora_decode_attention(const float* q, const uint16_t* keys, const uint16_t* values, int64_t capacity,
                            int64_t T, int64_t H, int64_t KV, int64_t D, float scale, float* out);
int64_t qlora_argmax_gemv_bf16(const uint16_t* w, const int8_t* q, const float* scale, const float* err, int64_t n,
                               int64_t k, const uint16_t* x);


int qlora_llama_step(const QloraLlama* model, int64_t token, int64_t pos, float* logits);
int64_t qlora_llama_greedy(const QloraLlama* model, int64_t token, int64_t pos);
}

namespace {

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "arm64_driver: %s\n", what.c_str());
  std::exit(2);
}

constexpr size_t kGuard = 64;
constexpr uint8_t kFill = 0xCD, kGuardByte = 0xA5;

// A 64-byte aligned buffer with kGuard bytes after its end.
struct Buf {
  uint8_t* p = nullptr;
  size_t n = 0;
  Buf() = default;
  explicit Buf(size_t bytes, uint8_t fill) : n(bytes) {
    p = static_cast<uint8_t*>(std::aligned_alloc(64, (bytes + kGuard + 63) / 64 * 64));
    if (p == nullptr) fail("out of memory");
    std::memset(p, fill, bytes);
    std::memset(p + bytes, kGuardByte, kGuard);
  }
  Buf(Buf&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr; }
  Buf& operator=(Buf&& o) noexcept { std::swap(p, o.p), std::swap(n, o.n); return *this; }
  ~Buf() { std::free(p); }
  bool guard_intact() const {
    for (size_t i = 0; i < kGuard; ++i)
      if (p[n + i] != kGuardByte) return false;
    return true;
  }
};

struct Call {
  std::string name;
  std::vector<int64_t> ints;
  std::vector<float> floats;
  std::vector<Buf> bufs;
  std::vector<bool> present;
};

struct Reader {
  FILE* f;
  void read(void* p, size_t n) {
    if (n && std::fread(p, 1, n, f) != n) fail("input file truncated");
  }
  uint32_t u32() { uint32_t v; read(&v, 4); return v; }
  std::string str() {
    std::string s(u32(), '\0');
    read(s.data(), s.size());
    return s;
  }
};

// The parameters of one call, taken in order.
struct Args {
  const Call& c;
  size_t ii = 0, fi = 0, bi = 0;
  int64_t i() {
    if (ii >= c.ints.size()) fail(c.name + ": too few int parameters");
    return c.ints[ii++];
  }
  float f() {
    if (fi >= c.floats.size()) fail(c.name + ": too few float parameters");
    return c.floats[fi++];
  }
  // The next buffer (null when absent); at least `min_bytes` long when present.
  template <class T = void> const T* b(size_t min_bytes = 0) {
    if (bi >= c.bufs.size()) fail(c.name + ": too few buffers");
    const size_t at = bi++;
    if (!c.present[at]) return nullptr;
    if (c.bufs[at].n < min_bytes)
      fail(c.name + ": buffer " + std::to_string(at) + " has " + std::to_string(c.bufs[at].n) + " bytes, needs " +
           std::to_string(min_bytes));
    return reinterpret_cast<const T*>(c.bufs[at].p);
  }
  template <class T = void> const T* need(size_t min_bytes) {
    const T* p = b<T>(min_bytes);
    if (p == nullptr) fail(c.name + ": buffer " + std::to_string(bi - 1) + " must be present");
    return p;
  }
  void done() const {
    if (ii != c.ints.size() || fi != c.floats.size() || bi != c.bufs.size())
      fail(c.name + ": unused parameters (driver and test disagree on the call's layout)");
  }
};

struct Outputs {
  std::vector<std::pair<std::string, Buf>> items;
  template <class T = void> T* add(const std::string& label, size_t bytes) {
    items.emplace_back(label, Buf(bytes, kFill));
    return reinterpret_cast<T*>(items.back().second.p);
  }
  void scalar(const std::string& label, int64_t v) { *add<int64_t>(label, 8) = v; }
};

size_t dtype_size(int64_t dtype) { return dtype == 0 ? 4 : 2; }
const char* dtype_name(int64_t dtype) { return dtype == 0 ? "f32" : dtype == 1 ? "f16" : "bf16"; }

// A QloraDecodeLinear from the call's parameters: ints n, k, bs, nested_bs, r; floats offset,
// scaling; buffers packed, absmax, qabsmax, nested_absmax, code8, code, bias, lora_a, lora_b.
QloraDecodeLinear read_linear(Args& a) {
  QloraDecodeLinear L{};
  L.n = a.i(), L.k = a.i(), L.bs = a.i(), L.nested_bs = a.i(), L.r = a.i();
  L.offset = a.f(), L.scaling = a.f();
  const size_t blocks = size_t(L.n * L.k / L.bs);
  L.packed = a.need<uint8_t>(size_t(L.n * L.k / 2));
  L.absmax = a.b<float>(blocks * 4);
  L.qabsmax = a.b<uint8_t>(blocks);
  L.nested_absmax = a.b<float>();
  L.code8 = a.b<float>();
  L.code = a.need<float>(64);
  L.bias = a.b<float>(size_t(L.n) * 4);
  L.lora_a = a.b<uint16_t>(size_t(L.r * L.k) * 2);
  L.lora_b = a.b<uint16_t>(size_t((L.n + 15) / 16 * 16 * L.r) * 2);
  if ((L.absmax == nullptr) == (L.qabsmax == nullptr)) fail(a.c.name + ": a linear needs absmax or qabsmax");
  return L;
}

void run(const Call& c, Outputs& out) {
  Args a{c};
  const std::string op = c.name.substr(0, c.name.find('/'));
  if (op == "info") {
    out.scalar("info_simd:i64", qlora_simd());
    out.scalar("info_gemv_simd:i64", qlora_gemv_simd());
    const std::string isa = qlora_isa ? qlora_isa() : "?";
    std::memcpy(out.add("info_isa:str", isa.size()), isa.data(), isa.size());
  } else if (op == "libm") {  // the C library's expf/logf/sqrtf on the given arguments
    const int64_t n = a.i();
    const float* x = a.need<float>(size_t(n) * 4);
    float* e = out.add<float>("expf:f32", size_t(n) * 4);
    float* l = out.add<float>("logf:f32", size_t(n) * 4);
    float* s = out.add<float>("sqrtf:f32", size_t(n) * 4);
    for (int64_t i = 0; i < n; ++i) {
      volatile float v = x[i];  // a real call each time, no constant folding
      e[i] = std::exp(float(v)), l[i] = std::log(float(v)), s[i] = std::sqrt(float(v));
    }
  } else if (op == "exp") {  // the kernels' own exp (qlora_exp, in place)
    const int64_t n = a.i();
    const float* x = a.need<float>(size_t(n) * 4);
    float* y = out.add<float>(qlora_exp ? "out:f32" : "absent:u8", qlora_exp ? size_t(n) * 4 : 0);
    if (qlora_exp) std::memcpy(y, x, size_t(n) * 4), qlora_exp(y, n);
  } else if (op == "quantize_4bit") {
    const int64_t dtype = a.i(), n = a.i(), bs = a.i();
    const void* x = a.need(size_t(n) * dtype_size(dtype));
    const float* bounds = a.need<float>(15 * 4);
    const uint8_t* order = a.need<uint8_t>(16);
    const int64_t nblocks = (n + bs - 1) / bs;
    uint8_t* packed = out.add<uint8_t>("packed:u8", size_t(n + 1) / 2);
    float* absmax = out.add<float>("absmax:f32", size_t(nblocks) * 4);
    out.scalar("bad_block:i64", qlora_quantize_4bit(x, int(dtype), n, bs, bounds, order, packed, absmax, 1));
  } else if (op == "dequantize_4bit") {
    const int64_t dtype = a.i(), n = a.i(), bs = a.i(), nested_bs = a.i();
    const float offset = a.f();
    const int64_t nblocks = (n + bs - 1) / bs;
    const uint8_t* packed = a.need<uint8_t>(size_t(n + 1) / 2);
    const float* absmax = a.b<float>(size_t(nblocks) * 4);
    const uint8_t* qabsmax = a.b<uint8_t>(size_t(nblocks));
    const float* nested_absmax = a.b<float>(size_t((nblocks + nested_bs - 1) / nested_bs) * 4);
    const float* code8 = a.b<float>(256 * 4);
    const float* code = a.need<float>(16 * 4);
    void* y = out.add(std::string("out:") + dtype_name(dtype), size_t(n) * dtype_size(dtype));
    qlora_dequantize_4bit(packed, absmax, qabsmax, nested_absmax, code8, offset, nested_bs, code, n, bs, y, int(dtype), 1);
  } else if (op == "quantize_8bit") {
    const int64_t n = a.i(), bs = a.i();
    const float* x = a.need<float>(size_t(n) * 4);
    const uint8_t* lut = a.need<uint8_t>(65536 + 3);
    uint8_t* q = out.add<uint8_t>("q:u8", size_t(n));
    float* absmax = out.add<float>("absmax:f32", size_t((n + bs - 1) / bs) * 4);
    out.scalar("bad_block:i64", qlora_quantize_8bit(x, n, bs, lut, q, absmax, 1));
  } else if (op == "dequantize_8bit") {
    const int64_t n = a.i(), bs = a.i();
    const uint8_t* q = a.need<uint8_t>(size_t(n));
    const float* absmax = a.need<float>(size_t((n + bs - 1) / bs) * 4);
    const float* code = a.need<float>(256 * 4);
    qlora_dequantize_8bit(q, absmax, code, n, bs, out.add<float>("out:f32", size_t(n) * 4), 1);
  } else if (op == "gemm_4bit") {
    const int64_t m = a.i(), k = a.i(), n_out = a.i(), bs = a.i(), nested_bs = a.i();
    const float offset = a.f();
    const int64_t nblocks = n_out * k / bs;
    const float* x = a.need<float>(size_t(m * k) * 4);
    const uint8_t* packed = a.need<uint8_t>(size_t(n_out * k / 2));
    const float* absmax = a.b<float>(size_t(nblocks) * 4);
    const uint8_t* qabsmax = a.b<uint8_t>(size_t(nblocks));
    const float* nested_absmax = a.b<float>();
    const float* code8 = a.b<float>(256 * 4);
    const float* code = a.need<float>(16 * 4);
    float* y = out.add<float>("out:f32", size_t(m * n_out) * 4);
    qlora_gemm_4bit(x, m, k, packed, absmax, qabsmax, nested_absmax, code8, offset, nested_bs, code, n_out, bs, y, 1);
  } else if (op == "dropout") {
    const int64_t n = a.i(), dtype = a.i(), threshold = a.i(), seed = a.i(), inplace = a.i();
    const float scale = a.f();
    const void* x = a.need(size_t(n) * dtype_size(dtype));
    void* y = out.add(std::string("out:") + dtype_name(dtype), size_t(n) * dtype_size(dtype));
    if (inplace) std::memcpy(y, x, size_t(n) * dtype_size(dtype));  // "out may alias x"
    qlora_dropout(inplace ? y : x, y, n, int(dtype), uint32_t(threshold), scale, uint32_t(seed), 1);
  } else if (op == "rms_norm_forward") {  // ints: rows, d, dtype (0 fp32, 2 bf16)
    const int64_t rows = a.i(), d = a.i(), dt = a.i(), es = dt == 0 ? 4 : 2;
    const float eps = a.f();
    const uint8_t* x = a.need<uint8_t>(size_t(rows * d * es));
    const uint8_t* w = a.need<uint8_t>(size_t(d * es));
    uint8_t* y = out.add<uint8_t>(dt == 0 ? "y:f32" : "y:bf16", size_t(rows * d * es));
    qlora_rms_norm_forward(x, w, rows, d, eps, y, out.add<float>("rstd:f32", size_t(rows) * 4), int(dt), 1);
  } else if (op == "rms_norm_backward") {
    const int64_t rows = a.i(), d = a.i(), dt = a.i(), es = dt == 0 ? 4 : 2;
    const uint8_t* dy = a.need<uint8_t>(size_t(rows * d * es));
    const uint8_t* x = a.need<uint8_t>(size_t(rows * d * es));
    const uint8_t* w = a.need<uint8_t>(size_t(d * es));
    const float* rstd = a.need<float>(size_t(rows) * 4);
    uint8_t* dx = out.add<uint8_t>(dt == 0 ? "dx:f32" : "dx:bf16", size_t(rows * d * es));
    qlora_rms_norm_backward(dy, x, w, rstd, rows, d, dx, int(dt), 1);
  } else if (op == "swiglu_forward") {  // ints: n, dtype
    const int64_t n = a.i(), dt = a.i(), es = dt == 0 ? 4 : 2;
    const uint8_t* g = a.need<uint8_t>(size_t(n * es));
    const uint8_t* u = a.need<uint8_t>(size_t(n * es));
    qlora_swiglu_forward(g, u, out.add<uint8_t>(dt == 0 ? "h:f32" : "h:bf16", size_t(n * es)), n, int(dt), 1);
  } else if (op == "swiglu_backward") {
    const int64_t n = a.i(), dt = a.i(), es = dt == 0 ? 4 : 2;
    const uint8_t* dh = a.need<uint8_t>(size_t(n * es));
    const uint8_t* g = a.need<uint8_t>(size_t(n * es));
    const uint8_t* u = a.need<uint8_t>(size_t(n * es));
    uint8_t* dg = out.add<uint8_t>(dt == 0 ? "dg:f32" : "dg:bf16", size_t(n * es));
    uint8_t* du = out.add<uint8_t>(dt == 0 ? "du:f32" : "du:bf16", size_t(n * es));
    qlora_swiglu_backward(dh, g, u, dg, du, n, int(dt), 1);
  } else if (op == "cross_entropy_rows") {
    const int64_t rows = a.i(), v = a.i(), grad = a.i();
    const uint16_t* z = a.need<uint16_t>(size_t(rows * v) * 2);
    const int64_t* targets = a.need<int64_t>(size_t(rows) * 8);
    float* loss = out.add<float>("loss:f32", size_t(rows) * 4);
    uint16_t* zz = out.add<uint16_t>(grad ? "grad:bf16" : "z_after:bf16", size_t(rows * v) * 2);
    std::memcpy(zz, z, size_t(rows * v) * 2);  // overwritten in place with the gradient
    qlora_cross_entropy_rows(zz, rows, v, targets, loss, int(grad), 1);
  } else if (op == "decode_linear") {
    const int64_t count = a.i(), threads = a.i();
    std::vector<QloraDecodeLinear> layers;
    int64_t n = 0;
    for (int64_t i = 0; i < count; ++i) layers.push_back(read_linear(a)), n += layers.back().n;
    const uint16_t* x = a.need<uint16_t>(size_t(layers[0].k) * 2);
    qlora_decode_threads(int(threads));
    qlora_decode_linear(layers.data(), count, x, out.add<float>("out:f32", size_t(n) * 4));
  } else if (op == "gemv_bf16") {
    const int64_t n = a.i(), k = a.i(), round = a.i(), threads = a.i();
    const uint16_t* w = a.need<uint16_t>(size_t(n * k) * 2);
    const uint16_t* x = a.need<uint16_t>(size_t(k) * 2);
    qlora_decode_threads(int(threads));
    qlora_gemv_bf16(w, n, k, x, out.add<float>("out:f32", size_t(n) * 4), int(round));
  } else if (op == "decode_attention") {
    const int64_t capacity = a.i(), T = a.i(), H = a.i(), KV = a.i(), D = a.i(), threads = a.i();
    const float scale = a.f();
    const float* q = a.need<float>(size_t(H * D) * 4);
    const uint16_t* keys = a.need<uint16_t>(size_t(KV * capacity * D) * 2);
    const uint16_t* values = a.need<uint16_t>(size_t(KV * capacity * D) * 2);
    qlora_decode_threads(int(threads));
    qlora_decode_attention(q, keys, values, capacity, T, H, KV, D, scale, out.add<float>("out:f32", size_t(H * D) * 4));
  } else if (op == "argmax_gemv_bf16") {
    const int64_t n = a.i(), k = a.i(), threads = a.i();
    const uint16_t* w = a.need<uint16_t>(size_t(n * k) * 2);
    const int8_t* q = a.need<int8_t>(size_t(n * k));
    const float* scale = a.need<float>(size_t(n) * 4);
    const float* err = a.need<float>(size_t(n) * 4);
    const uint16_t* x = a.need<uint16_t>(size_t(k) * 2);
    qlora_decode_threads(int(threads));
    out.scalar("argmax:i64", qlora_argmax_gemv_bf16(w, q, scale, err, n, k, x));
  } else if (op == "llama") {  // steps of qlora_llama_step (greedy 0) or qlora_llama_greedy (greedy 1)
    QloraLlama m{};
    m.n_layers = a.i(), m.hidden = a.i(), m.heads = a.i(), m.kv_heads = a.i(), m.head_dim = a.i();
    m.intermediate = a.i(), m.vocab = a.i(), m.capacity = a.i();
    const int64_t head_4bit = a.i(), steps = a.i(), threads = a.i(), greedy = a.i();
    m.eps = a.f(), m.scale = a.f();
    m.embed = a.need<uint16_t>(size_t(m.vocab * m.hidden) * 2);
    m.norm = a.need<uint16_t>(size_t(m.hidden) * 2);
    m.head = a.b<uint16_t>(size_t(m.vocab * m.hidden) * 2);
    m.head_q = a.b<int8_t>(size_t(m.vocab * m.hidden));
    m.head_scale = a.b<float>(size_t(m.vocab) * 4);
    m.head_err = a.b<float>(size_t(m.vocab) * 4);
    m.cos = a.need<uint16_t>(size_t(m.capacity * m.head_dim) * 2);
    m.sin = a.need<uint16_t>(size_t(m.capacity * m.head_dim) * 2);
    const int64_t* tokens = a.need<int64_t>(size_t(steps) * 8);
    // linears: per layer q, k, v, o, gate, up, down (grouped as the struct wants), then the 4-bit head
    std::vector<QloraDecodeLinear> lin;
    lin.reserve(size_t(7 * m.n_layers + 1));
    std::vector<uint16_t*> norms;
    std::vector<QloraLlamaLayer> layers(size_t(m.n_layers));
    for (int64_t l = 0; l < m.n_layers; ++l) {
      layers[l].norm1 = a.need<uint16_t>(size_t(m.hidden) * 2);
      layers[l].norm2 = a.need<uint16_t>(size_t(m.hidden) * 2);
      for (int j = 0; j < 7; ++j) lin.push_back(read_linear(a));
    }
    if (head_4bit) lin.push_back(read_linear(a));
    const size_t cache = size_t(m.kv_heads * m.capacity * m.head_dim);  // per layer, keys and values alike
    uint16_t* keys = out.add<uint16_t>("keys:bf16", cache * 2 * size_t(m.n_layers));
    uint16_t* values = out.add<uint16_t>("values:bf16", cache * 2 * size_t(m.n_layers));
    std::memset(keys, 0, cache * 2 * size_t(m.n_layers));
    std::memset(values, 0, cache * 2 * size_t(m.n_layers));
    for (int64_t l = 0; l < m.n_layers; ++l) {
      QloraDecodeLinear* L = lin.data() + 7 * l;
      layers[l].qkv = L, layers[l].o = L + 3, layers[l].gate_up = L + 4, layers[l].down = L + 6;
      layers[l].keys = keys + cache * l, layers[l].values = values + cache * l;
    }
    m.layers = layers.data();
    m.head_4bit = head_4bit ? &lin.back() : nullptr;
    qlora_decode_threads(int(threads));
    if (greedy) {
      int64_t* next = out.add<int64_t>("next_tokens:i64", size_t(steps) * 8);
      for (int64_t s = 0; s < steps; ++s) next[s] = qlora_llama_greedy(&m, tokens[s], s);
    } else {
      float* logits = out.add<float>("logits:f32", size_t(steps * m.vocab) * 4);
      int64_t* rc = out.add<int64_t>("status:i64", size_t(steps) * 8);
      for (int64_t s = 0; s < steps; ++s) rc[s] = qlora_llama_step(&m, tokens[s], s, logits + s * m.vocab);
    }
  } else {
    fail("unknown op " + op + " (in " + c.name + ")");
  }
  a.done();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) fail("usage: arm64_driver IN OUT");
  FILE* in = std::fopen(argv[1], "rb");
  if (in == nullptr) fail(std::string("cannot open ") + argv[1]);
  Reader r{in};
  char magic[8];
  r.read(magic, 8);
  if (std::memcmp(magic, "QA64IN01", 8) != 0) fail("bad input magic");
  const uint32_t ncalls = r.u32();
  FILE* out = std::fopen(argv[2], "wb");
  if (out == nullptr) fail(std::string("cannot open ") + argv[2]);
  std::fwrite("QA64OUT1", 1, 8, out);
  std::fwrite(&ncalls, 4, 1, out);
  int status = 0;
  for (uint32_t ci = 0; ci < ncalls; ++ci) {
    Call c;
    c.name = r.str();
    c.ints.resize(r.u32());
    r.read(c.ints.data(), c.ints.size() * 8);
    c.floats.resize(r.u32());
    r.read(c.floats.data(), c.floats.size() * 4);
    const uint32_t nb = r.u32();
    for (uint32_t i = 0; i < nb; ++i) {
      uint8_t present;
      r.read(&present, 1);
      uint64_t len;
      r.read(&len, 8);
      c.bufs.emplace_back(size_t(len), uint8_t(0));
      r.read(c.bufs.back().p, size_t(len));
      c.present.push_back(present != 0);
    }
    Outputs o;
    run(c, o);
    const uint32_t len = uint32_t(c.name.size()), nout = uint32_t(o.items.size());
    std::fwrite(&len, 4, 1, out);
    std::fwrite(c.name.data(), 1, len, out);
    std::fwrite(&nout, 4, 1, out);
    for (auto& [label, buf] : o.items) {
      if (!buf.guard_intact()) {
        std::fprintf(stderr, "arm64_driver: %s wrote past the end of its output %s\n", c.name.c_str(), label.c_str());
        status = 3;
      }
      const uint32_t ll = uint32_t(label.size());
      const uint64_t n = buf.n;
      std::fwrite(&ll, 4, 1, out);
      std::fwrite(label.data(), 1, ll, out);
      std::fwrite(&n, 8, 1, out);
      std::fwrite(buf.p, 1, buf.n, out);
    }
  }
  if (std::fclose(out) != 0) fail("write failed");
  std::fclose(in);
  return status;
}
