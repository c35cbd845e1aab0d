// Internal declarations shared by api.cpp and the per-ISA kernel files.
// Every helper here is static (internal linkage) for the reason given in parallel.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "glass/glass.h"

namespace glass {

// Storage types: distinct so that templates pick the right conversion.
struct bf16_t { uint16_t v; };
struct f16_t { uint16_t v; };

// Quantized weight blocks of 32 values (glass.h, ggml's Q8_0 / Q4_0 byte layout): an fp16 scale s
// and the values q, each weight being s * q. A row of d values (d % 32 == 0) is d / 32 blocks.
constexpr int kQBlock = 32;
struct q8_0_t {
  uint16_t s;        // fp16 scale
  int8_t q[32];      // values -127..127 (-128 is accepted)
};
struct q4_0_t {
  uint16_t s;        // fp16 scale
  uint8_t q[16];     // value j < 16: (q[j] & 15) - 8; value 16 + j: (q[j] >> 4) - 8
};
static_assert(sizeof(q8_0_t) == 34 && sizeof(q4_0_t) == 18, "block layout of glass.h");
template <class W>
struct is_quant { static constexpr bool value = false; };
template <>
struct is_quant<q8_0_t> { static constexpr bool value = true; };
template <>
struct is_quant<q4_0_t> { static constexpr bool value = true; };
// Elements of W that hold n weight values (blocks for quantized W), and their bytes.
template <class W>
constexpr int64_t elems_for(int64_t n) { return is_quant<W>::value ? n / kQBlock : n; }
template <class W>
constexpr int64_t bytes_for(int64_t n) { return elems_for<W>(n) * static_cast<int64_t>(sizeof(W)); }

// One token's x as the quantized dot products read it (quant_rows.inc): f in fp32, and where the
// ISA multiplies codes in integers (kQIntDot) also q / s, x in 16-bit fixed point (x_j ~ s[j / 32] * q[j]).
struct QInput {
  const float* f;
  const int16_t* q;
  const float* s;
};

// q[j] = round(x[j] / s[b]) with s[b] = max |x| over block b / 32767. A block holding inf or NaN
// gets s[b] = NaN (and q = 0), so that the dot products reading it are NaN, as in fp32.
static inline void quantize_x16(const float* x, int64_t d, int16_t* q, float* s) {
  for (int64_t b = 0; b < d / kQBlock; ++b) {
    const float* xb = x + b * kQBlock;
    int16_t* qb = q + b * kQBlock;
    float m = 0.0f;
    bool nan = false;
    for (int j = 0; j < kQBlock; ++j) {
      const float v = std::fabs(xb[j]);
      m = v > m ? v : m;
      nan |= v != v;
    }
    if (nan || !std::isfinite(m)) {
      for (int j = 0; j < kQBlock; ++j) qb[j] = 0;
      s[b] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float inv = m > 0.0f ? 32767.0f / m : 0.0f;
    for (int j = 0; j < kQBlock; ++j) {  // |x * inv| <= 32767 (+ rounding): fits after the +-0.5
      const float v = xb[j] * inv;
      qb[j] = static_cast<int16_t>(v + (v >= 0.0f ? 0.5f : -0.5f));
    }
    s[b] = m / 32767.0f;
  }
}

constexpr int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }
// Workspace floats ahead of the chunk buffers for n = B * T * d input values: x in fp32, and for
// quantized rows also x in 16-bit fixed point (n int16) with one fp32 scale per block of 32
// (x_fixed_point says where).
constexpr int64_t x_floats(int64_t n, bool quantized) {
  return round16(n) + (quantized ? round16(n / 2) + round16(n / kQBlock) : 0);
}
// The fixed-point x's values and block scales in a workspace laid out by x_floats(n, true).
static inline void x_fixed_point(float* ws, int64_t n, int16_t** q, float** s) {
  *q = reinterpret_cast<int16_t*>(ws + round16(n));
  *s = ws + round16(n) + round16(n / 2);
}

// One call of sparse_ffn / sparse_mlp after validation. The per-ISA driver owns threading.
struct FfnArgs {
  int gated;               // 1: gate/up/down; 0: in/out (+ biases)
  glass_activation act;
  const void* x;           // [B, T, d]
  int64_t B, T, d, D;
  const void* w1;          // W_gate or W_in [D, d], rows ldw elements apart
  const void* w2;          // W_up [D, d] (gated only), rows ldw apart
  const void* w3;          // W_down_t or W_out_t [D, d], rows ldw apart
  int64_t ldw;             // row stride of the weights in values (>= d; 3d for the bundled layout);
                           // quantized weights: a multiple of 32, rows ldw / 32 blocks apart
  const void* b_in;        // [D] or null (non-gated only)
  const void* b_out;       // [d] or null (non-gated only)
  const int32_t* idx;      // [k] or [B, k]
  int64_t k;
  int idx_batched;
  void* y;                 // [B, T, d]
  int nthreads;            // requested team size; workspace is sized for it
  float* acc;              // workspace, see ffn_driver.inc
  int64_t xlen;            // floats reserved for x in fp32 (multiple of 16)
  int64_t nchunks;         // chunks per index set
  int64_t buf_len;         // floats per chunk buffer (>= rows * d, multiple of 16)
  int group;               // T = 1 decoding: selected neurons in flight per thread (1..8)
  int prefetch;            // ... and how many neurons ahead their rows are prefetched (0: none)
};

// Decode tuning in force (api.cpp): glass_set_decode_tuning, else the environment, else defaults.
void decode_tuning(int* group, int* prefetch);

typedef void (*ffn_fn)(const FfnArgs&);

// One ISA's kernels, indexed by glass_dtype; the quantized ones by [glass_qtype][activation dtype].
struct FfnTable {
  ffn_fn ffn[3];
  const char* ffn_name[3];
  const char* mlp_name[3];
  ffn_fn qffn[2][3];
  const char* qffn_name[2];
};

namespace scalar { extern const FfnTable kTable; }
#if defined(GLASS_HAVE_AVX2)
namespace avx2 { extern const FfnTable kTable; }
#endif
#if defined(GLASS_HAVE_AVX512)
namespace avx512 { extern const FfnTable kTable; }
#endif
#if defined(GLASS_HAVE_NEON)
namespace neon { extern const FfnTable kTable; }
#endif
// Extension kernels, one dtype each (the rest of GLASS_ISA_AVX512_EXT's / GLASS_ISA_NEON_EXT's table is
// plain AVX-512 / NEON).
#if defined(GLASS_HAVE_AVX512_BF16)
namespace avx512_bf16 { extern const ffn_fn kFfnBf16; }
#endif
#if defined(GLASS_HAVE_NEON_FHM)
namespace neon_fhm { extern const ffn_fn kFfnF16; }
#endif
#if defined(GLASS_HAVE_NEON_BF16)
namespace neon_bf16 { extern const ffn_fn kFfnBf16; }
#endif

// CPU feature detection (cpu_features.cpp).
bool cpu_has_avx2();    // AVX2 + FMA + F16C, OS saves YMM state
bool cpu_has_avx512();  // AVX-512 F/BW/VL/DQ, OS saves ZMM/opmask state
bool cpu_has_avx512bf16();  // AVX512-BF16 (VDPBF16PS) on top of cpu_has_avx512()
bool cpu_has_neon();
bool cpu_has_neon_fhm();   // FEAT_FHM (FMLAL) and FEAT_FP16, from HWCAP
bool cpu_has_neon_bf16();  // FEAT_BF16 (BFMLALB/T), from HWCAP2

void set_error(const char* fmt, ...);  // api.cpp: thread-local message

// Kernels that have a single portable implementation.
glass_status neuron_stats_impl(glass_dtype dtype, const void* h, int64_t B, int64_t T, int64_t D,
                               const float* down_norms, const uint8_t* mask, float* out,
                               int nthreads);
glass_status select_neurons_impl(const float* local, int64_t B, int64_t D,
                                 const int32_t* global_rank, double lam, int64_t k, int32_t* out,
                                 int nthreads);

namespace {

// ---- scalar conversions (round to nearest even, NaN preserved) ----
static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
      u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // result is subnormal or zero (|f| < 2^-14)
    if (a < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to 0
    uint32_t e = a >> 23;
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14 + (113 - e) ... bits to drop to land on 2^-24 units
    uint32_t half = 1u << (shift - 1);
    uint32_t r = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round mantissa to 10 bits, nearest even
  r -= 0x38000000u;                            // rebias exponent 127 -> 15
  return static_cast<uint16_t>(sign | (r >> 13));
}

static inline float to_f32(float v) { return v; }
static inline float to_f32(bf16_t v) { return bf16_to_f32(v.v); }
static inline float to_f32(f16_t v) { return f16_to_f32(v.v); }
static inline void from_f32(float v, float* o) { *o = v; }
static inline void from_f32(float v, bf16_t* o) { o->v = f32_to_bf16(v); }
static inline void from_f32(float v, f16_t* o) { o->v = f32_to_f16(v); }

// ---- activations (C math functions: no inline C++ wrappers with external linkage) ----
static inline float act_apply(glass_activation act, float g) {
  switch (act) {
    case GLASS_ACT_SILU:
      return g / (1.0f + expf(-g));
    case GLASS_ACT_GELU_TANH: {
      const float c = 0.7978845608028654f;  // sqrt(2/pi)
      return 0.5f * g * (1.0f + tanhf(c * (g + 0.044715f * g * g * g)));
    }
    case GLASS_ACT_GELU:
      return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
    case GLASS_ACT_RELU:
    default:
      // NaN stays NaN, as torch.relu does: g > 0 is false for NaN, and 0 would hide it.
      return g > 0.0f ? g : (g != g ? g : 0.0f);
  }
}

}  // namespace
}  // namespace glass
