// AVX-512 (F/BW/VL/DQ + FMA) sparse FFN: the vector traits (simd_traits.md) with 16-lane vectors,
// masked tails instead of zero-padded copies, and 8-token tiles (32 vector registers hold the
// 16 gate/up accumulators); the kernels themselves are the shared simd_kernels.inc /
// neuron_groups.inc / ffn_driver.inc. Compiled with the AVX-512 flags for this file only; chosen at run time
// when CPUID + XGETBV report AVX-512 F/BW/VL/DQ and OS support for the ZMM state.
//
// The development machine has no AVX-512: natively this file is only compiled there. The C++
// tests run it against the scalar path and the fp64 oracle wherever the CPU has AVX-512, and a
// second test build (GLASS_AVX512_EMULATED, when the SIMDe headers are installed) compiles this
// same file against SIMDe's portable AVX-512 intrinsics so that its logic (tails, masks, tiles,
// conversions) is tested on any x86 machine.
#if defined(GLASS_AVX512_EMULATED)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include "avx512_simde_compat.h"  // the few intrinsics SIMDe 0.7 lacks, written from Intel's spec
#else
#include <immintrin.h>
#endif

#include "internal.h"
#include "parallel.h"

namespace glass {
namespace avx512 {
namespace {

constexpr int kTile = 8;
template <class W>
constexpr bool kDotNativeX = false;  // dot products read x in fp32
template <class W>
constexpr bool kNeuronGroups = true;

// ---- the vector traits (simd_traits.md): 16 fp32 lanes ----
using vfloat = __m512;
constexpr int kLanes = 16;
// Two 64-byte cache lines per step, so fp32 rows also get two vectors per step to alternate
// accumulators on.
constexpr int64_t kStepBytes = 128;

static inline vfloat vzero() { return _mm512_setzero_ps(); }
static inline vfloat vset1(float f) { return _mm512_set1_ps(f); }
static inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vfloat vload(const bf16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline vfloat vload(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// The first n <= 16 lanes (n < 16 in the tails: the rest zero; masked loads never touch memory past
// the mask).
static inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
static inline vfloat vload_tail(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
static inline vfloat vload_tail(const bf16_t* p, int64_t n) {
  __m256i h = _mm256_maskz_loadu_epi16(tail_mask(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline vfloat vload_tail(const f16_t* p, int64_t n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail_mask(n), p));
}
static inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
static inline void vstore_tail(float* p, vfloat v, int64_t n) { _mm512_mask_storeu_ps(p, tail_mask(n), v); }
static inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
static inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
static inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
static inline float vhsum(vfloat v) { return _mm512_reduce_add_ps(v); }
static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
// quantized weights (quant_rows.inc): 16 int8 values, chunk c of a Q4_0 block
static inline vfloat vload_q8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
static inline vfloat vload_q4(const uint8_t* q, int c) {  // values 16c..16c+15: c = 0 low nibbles, 1 high
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  if (c) b = _mm_srli_epi16(b, 4);
  b = _mm_and_si128(b, _mm_set1_epi8(15));
  return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(b), _mm512_set1_epi32(8)));
}
// quant_rows.inc: a block's fp16 scale (F16C), and the products of codes and x in integers:
// 32 codes times 32 int16 values summed in pairs into 16 int32 lanes (|lane| <= 2 * 128 * 32767).
static inline float scale_f32(uint16_t s) { return _cvtsh_ss(s); }
constexpr bool kQIntDot = true;
static inline vfloat qdot(const q8_0_t* b, const int16_t* xq) {
  const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b->q)));
  return _mm512_cvtepi32_ps(_mm512_madd_epi16(w, _mm512_loadu_si512(xq)));
}
static inline vfloat qdot(const q4_0_t* b, const int16_t* xq) {  // low nibbles: values 0..15, high: 16..31
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b->q));
  const __m128i lo = _mm_and_si128(q, _mm_set1_epi8(15));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(15));
  const __m512i w = _mm512_sub_epi16(_mm512_cvtepu8_epi16(_mm256_set_m128i(hi, lo)), _mm512_set1_epi16(8));
  return _mm512_cvtepi32_ps(_mm512_madd_epi16(w, _mm512_loadu_si512(xq)));
}
static inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

template <class W>
static void cvt_to_f32(const W* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, vload(src + i));
  if (i < n) _mm512_mask_storeu_ps(dst + i, tail_mask(n - i), vload_tail(src + i, n - i));
}
static inline __m256i f32x16_to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __m512i nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  const __mmask16 isnan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, isnan, nan);
  return _mm512_cvtepi32_epi16(r);  // values fit in 16 bits: plain truncation
}
static void cvt_from_f32(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
static void cvt_from_f32(const float* src, bf16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), f32x16_to_bf16(_mm512_loadu_ps(src + i)));
  for (; i < n; ++i) from_f32(src[i], dst + i);
}
static void cvt_from_f32(const float* src, f16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) from_f32(src[i], dst + i);
}

#include "simd_kernels.inc"
#include "neuron_groups.inc"
#include "ffn_driver.inc"

}  // namespace

extern const FfnTable kTable = GLASS_FFN_TABLE("avx512");

}  // namespace avx512
}  // namespace glass
