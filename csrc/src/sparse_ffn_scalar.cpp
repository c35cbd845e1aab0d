// Generic (scalar) sparse FFN: the reference every fast path is tested against, and the fallback on
// CPUs without a vector path. Plain loops in the contract's order; compiled with the baseline flags.
#include "internal.h"
#include "parallel.h"

namespace glass {
namespace scalar {
namespace {

constexpr int kTile = 4;
template <class W>
constexpr bool kDotNativeX = false;  // dot products read x in fp32
template <class W>
constexpr bool kNeuronGroups = true;

// The vector traits (simd_traits.md) with one lane, for the neuron-group decode path. The token-tile
// primitives below stay plain loops: this file is the reference the vector paths are tested against.
using vfloat = float;
constexpr int kLanes = 1;
static inline vfloat vzero() { return 0.0f; }
static inline vfloat vset1(float f) { return f; }
template <class W>
static inline vfloat vload(const W* p) { return to_f32(*p); }
template <class W>
static inline vfloat vload_tail(const W* p, int64_t) { return to_f32(*p); }  // never called: n < 1 lane
static inline void vstore(float* p, vfloat v) { *p = v; }
static inline void vstore_tail(float* p, vfloat v, int64_t) { *p = v; }
static inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return a * b + c; }
static inline vfloat vadd(vfloat a, vfloat b) { return a + b; }
static inline vfloat vmul(vfloat a, vfloat b) { return a * b; }
static inline float vhsum(vfloat v) { return v; }
static inline vfloat vload_q8(const int8_t* p) { return static_cast<float>(*p); }
static inline vfloat vload_q4(const uint8_t* q, int c) {
  return static_cast<float>((c < 16 ? (q[c] & 15) : (q[c - 16] >> 4)) - 8);
}
static inline float scale_f32(uint16_t s) { return f16_to_f32(s); }
constexpr bool kQIntDot = false;  // quantized rows: codes widened to fp32 (quant_rows.inc)
static inline void prefetch_l2(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 2);
#else
  (void)p;
#endif
}

template <class W>
static void cvt_to_f32(const W* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f32(src[i]);
}
template <class W>
static void cvt_from_f32(const float* src, W* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) from_f32(src[i], dst + i);
}
template <class W>
static void dot2_tile(const W* a, const W* b, const float* x, int64_t ldx, int nt, int64_t d,
                      float* ga, float* gb, const W*, const W*) {
  for (int t = 0; t < nt; ++t) {
    const float* xt = x + t * ldx;
    float sa = 0.0f, sb = 0.0f;
    for (int64_t c = 0; c < d; ++c) {
      sa += to_f32(a[c]) * xt[c];
      sb += to_f32(b[c]) * xt[c];
    }
    ga[t] = sa;
    gb[t] = sb;
  }
}
template <class W>
static void dot1_tile(const W* a, const float* x, int64_t ldx, int nt, int64_t d, float* ga,
                      const W*) {
  for (int t = 0; t < nt; ++t) {
    const float* xt = x + t * ldx;
    float sa = 0.0f;
    for (int64_t c = 0; c < d; ++c) sa += to_f32(a[c]) * xt[c];
    ga[t] = sa;
  }
}
template <class W>
static void axpy_tile(const W* w, const float* h, int nt, float* acc, int64_t ldacc, int64_t d,
                      const W*) {
  for (int t = 0; t < nt; ++t) {
    float* o = acc + t * ldacc;
    const float ht = h[t];
    for (int64_t c = 0; c < d; ++c) o[c] += ht * to_f32(w[c]);
  }
}

#include "neuron_groups.inc"
#include "ffn_driver.inc"

}  // namespace

extern const FfnTable kTable = GLASS_FFN_TABLE("scalar");

}  // namespace scalar
}  // namespace glass
