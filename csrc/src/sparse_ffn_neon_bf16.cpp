// bf16 sparse FFN on NEON with FEAT_BF16: BFMLALB / BFMLALT multiply the even / odd bf16 lanes of
// the weights and activations into fp32 accumulators with IEEE fused multiply-adds (unlike BFDOT,
// whose rounding is implementation-defined). neon_widening_mla.inc says how the pieces fit.
// Compiled with -march=armv8.2-a+bf16 for this file only; GLASS_ISA_NEON_EXT uses it for bf16 when
// HWCAP2 reports BF16 (Neoverse V1/V2/N2, Cortex-A510/A710 and later, Apple M2 and later).
#include <arm_neon.h>

#include "internal.h"
#include "parallel.h"

namespace glass {
namespace neon_bf16 {
namespace {

using W = bf16_t;
using WVec = bfloat16x8_t;

static inline WVec load8(const W* p) {
  return vreinterpretq_bf16_u16(vld1q_u16(reinterpret_cast<const uint16_t*>(p)));
}
static inline float32x4_t mla_a(float32x4_t acc, WVec w, WVec x) { return vbfmlalbq_f32(acc, w, x); }
static inline float32x4_t mla_b(float32x4_t acc, WVec w, WVec x) { return vbfmlaltq_f32(acc, w, x); }
static inline float32x4_t widen4(const W* p) {
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
}

#include "neon_widening_mla.inc"
#include "ffn_driver.inc"

static void ffn_bf16(const FfnArgs& a) { ffn_driver<bf16_t>(a); }

}  // namespace

extern const ffn_fn kFfnBf16 = ffn_bf16;

}  // namespace neon_bf16
}  // namespace glass
