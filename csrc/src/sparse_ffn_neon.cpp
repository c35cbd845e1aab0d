// AArch64 Advanced SIMD (NEON) sparse FFN: the vector traits (simd_traits.md) with 4-lane fp32
// vectors; the kernels are the shared simd_kernels.inc / neuron_groups.inc / ffn_driver.inc
// (64-byte steps, 4-token tiles, neuron groups). fp16 weights widen with vcvt_f32_f16 and bf16 with a 16-bit shift,
// both in the AArch64 baseline. Compiled only when the target is aarch64 (CMakeLists.txt), where
// Advanced SIMD is mandatory. GLASS_ISA_NEON_EXT swaps in the FEAT_FHM (fp16) and FEAT_BF16 (bf16)
// kernels of sparse_ffn_neon_{fhm,bf16}.cpp where the CPU has them.
#include <arm_neon.h>

#include "internal.h"
#include "parallel.h"

namespace glass {
namespace neon {
namespace {

constexpr int kTile = 4;
template <class W>
constexpr bool kDotNativeX = false;  // dot products read x in fp32
template <class W>
constexpr bool kNeuronGroups = true;

// ---- the vector traits (simd_traits.md): 4 fp32 lanes ----
using vfloat = float32x4_t;
constexpr int kLanes = 4;
constexpr int64_t kStepBytes = 64;  // one cache line of a row per step

static inline vfloat vzero() { return vdupq_n_f32(0.0f); }
static inline vfloat vset1(float f) { return vdupq_n_f32(f); }
static inline vfloat vload(const float* p) { return vld1q_f32(p); }
static inline vfloat vload(const bf16_t* p) {
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
}
static inline vfloat vload(const f16_t* p) {
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
}
template <class W>
static inline vfloat vload_tail(const W* p, int64_t n) {
  float t[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) t[i] = to_f32(p[i]);
  return vld1q_f32(t);
}
static inline void vstore(float* p, vfloat v) { vst1q_f32(p, v); }
static inline void vstore_tail(float* p, vfloat v, int64_t n) {
  float t[4];
  vst1q_f32(t, v);
  for (int64_t i = 0; i < n; ++i) p[i] = t[i];
}
static inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return vfmaq_f32(c, a, b); }
static inline vfloat vadd(vfloat a, vfloat b) { return vaddq_f32(a, b); }
static inline vfloat vmul(vfloat a, vfloat b) { return vmulq_f32(a, b); }
static inline float vhsum(vfloat v) { return vaddvq_f32(v); }
static inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
// quantized weights (quant_rows.inc): 4 values per vector; only the 4 bytes needed are read.
static inline uint8x8_t load4_u8(const void* p) {
  uint32_t u;
  std::memcpy(&u, p, 4);
  return vreinterpret_u8_u32(vdup_n_u32(u));
}
static inline vfloat vload_q8(const int8_t* p) {
  return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_u8(load4_u8(p))))));
}
static inline vfloat vload_q4(const uint8_t* q, int c) {  // values 4c..4c+3: c < 4 low nibbles, else high
  uint8x8_t b = load4_u8(q + 4 * (c & 3));
  b = c < 4 ? vand_u8(b, vdup_n_u8(15)) : vshr_n_u8(b, 4);
  const int32x4_t v = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(vmovl_u8(b))));
  return vcvtq_f32_s32(vsubq_s32(v, vdupq_n_s32(8)));
}
static inline float scale_f32(uint16_t s) {
  return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(s))), 0);
}
constexpr bool kQIntDot = false;  // quantized rows: codes widened to fp32 (quant_rows.inc)
static inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

template <class W>
static void cvt_to_f32(const W* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vload(src + i));
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
}
template <class W>
static void cvt_from_f32(const float* src, W* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) from_f32(src[i], dst + i);  // same rounding as the scalar path
}

#include "simd_kernels.inc"
#include "neuron_groups.inc"
#include "ffn_driver.inc"

}  // namespace

extern const FfnTable kTable = GLASS_FFN_TABLE("neon");

}  // namespace neon
}  // namespace glass
