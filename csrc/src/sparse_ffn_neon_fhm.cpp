// fp16 sparse FFN on NEON with FEAT_FHM: FMLAL / FMLAL2 multiply fp16 weights by fp16 activations
// into fp32 accumulators (neon_widening_mla.inc says how the pieces fit). Compiled with
// -march=armv8.2-a+fp16fml for this file only; GLASS_ISA_NEON_EXT uses it for fp16 when HWCAP
// reports ASIMDHP and ASIMDFHM (Cortex-A55/A75 may lack FHM; A76+, Neoverse, Apple cores have it).
#include <arm_neon.h>

#include "internal.h"
#include "parallel.h"

namespace glass {
namespace neon_fhm {
namespace {

using W = f16_t;
using WVec = float16x8_t;

static inline WVec load8(const W* p) {
  return vreinterpretq_f16_u16(vld1q_u16(reinterpret_cast<const uint16_t*>(p)));
}
static inline float32x4_t mla_a(float32x4_t acc, WVec w, WVec x) { return vfmlalq_low_f16(acc, w, x); }
static inline float32x4_t mla_b(float32x4_t acc, WVec w, WVec x) { return vfmlalq_high_f16(acc, w, x); }
static inline float32x4_t widen4(const W* p) {
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
}

#include "neon_widening_mla.inc"
#include "ffn_driver.inc"

static void ffn_f16(const FfnArgs& a) { ffn_driver<f16_t>(a); }

}  // namespace

extern const ffn_fn kFfnF16 = ffn_f16;

}  // namespace neon_fhm
}  // namespace glass
