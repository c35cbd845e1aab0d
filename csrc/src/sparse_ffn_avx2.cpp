// AVX2 + FMA + F16C sparse FFN (compiled with -mavx2 -mfma -mf16c for this file only; chosen at run
// time when CPUID and XGETBV say the CPU and the OS support it). This file supplies the vector
// traits (simd_traits.md) and the activation conversions; tiling, neuron groups and prefetch are
// the shared simd_kernels.inc / neuron_groups.inc / ffn_driver.inc:
//  - weights are converted to fp32 in registers (bf16: zero-extend + shift, fp16: vcvtph2ps);
//  - rows are walked one 64-byte cache line per step;
//  - up to kTile = 4 tokens share one pass over a row (4 tokens x 2 rows = 8 accumulators).
#include <immintrin.h>

#include "internal.h"
#include "parallel.h"

namespace glass {
namespace avx2 {
namespace {

constexpr int kTile = 4;
template <class W>
constexpr bool kDotNativeX = false;  // dot products read x in fp32
template <class W>
constexpr bool kNeuronGroups = true;

// ---- the vector traits (simd_traits.md): 8 fp32 lanes ----
using vfloat = __m256;
constexpr int kLanes = 8;
constexpr int64_t kStepBytes = 64;  // one cache line of a row per step

static inline vfloat vzero() { return _mm256_setzero_ps(); }
static inline vfloat vset1(float f) { return _mm256_set1_ps(f); }
static inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vfloat vload(const bf16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline vfloat vload(const f16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// n < 8 values, zero padded (tails of odd d).
template <class W>
static inline vfloat vload_tail(const W* p, int64_t n) {
  alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) t[i] = to_f32(p[i]);
  return _mm256_load_ps(t);
}
static inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
static inline void vstore_tail(float* p, vfloat v, int64_t n) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (int64_t i = 0; i < n; ++i) p[i] = t[i];
}
static inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
static inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
static inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
static inline float vhsum(vfloat v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
// quantized weights (quant_rows.inc): 8 int8 values, chunk c of a Q4_0 block
static inline vfloat vload_q8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
static inline vfloat vload_q4(const uint8_t* q, int c) {  // values 8c..8c+7: c < 2 low nibbles, else high
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * (c & 1)));
  if (c >= 2) b = _mm_srli_epi16(b, 4);
  b = _mm_and_si128(b, _mm_set1_epi8(15));
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(b), _mm256_set1_epi32(8)));
}
// quant_rows.inc: a block's fp16 scale (F16C), and the products of codes and x in integers:
// 32 codes times 32 int16 values summed in pairs (16 + 16) into 8 int32 lanes.
static inline float scale_f32(uint16_t s) { return _cvtsh_ss(s); }
constexpr bool kQIntDot = true;
static inline __m256i madd16(__m128i codes, const int16_t* xq) {  // 16 int8 codes times 16 int16 values
  return _mm256_madd_epi16(_mm256_cvtepi8_epi16(codes), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
}
static inline vfloat qdot(const q8_0_t* b, const int16_t* xq) {
  const __m128i* q = reinterpret_cast<const __m128i*>(b->q);
  return _mm256_cvtepi32_ps(_mm256_add_epi32(madd16(_mm_loadu_si128(q), xq), madd16(_mm_loadu_si128(q + 1), xq + 16)));
}
static inline vfloat qdot(const q4_0_t* b, const int16_t* xq) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b->q));
  const __m128i eight = _mm_set1_epi8(8);
  const __m128i lo = _mm_sub_epi8(_mm_and_si128(q, _mm_set1_epi8(15)), eight);
  const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(15)), eight);
  return _mm256_cvtepi32_ps(_mm256_add_epi32(madd16(lo, xq), madd16(hi, xq + 16)));
}
static inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

// ---- conversions of activations ----
template <class W>
static void cvt_to_f32(const W* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, vload(src + i));
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
}
static inline __m128i f32x8_to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i isnan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, nan, isnan);
  r = _mm256_packus_epi32(r, r);  // 16-bit values in lanes [0..3 | 4..7] of each 128-bit half
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(r, 0x08));
}
static void cvt_from_f32(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
static void cvt_from_f32(const float* src, bf16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), f32x8_to_bf16(_mm256_loadu_ps(src + i)));
  for (; i < n; ++i) from_f32(src[i], dst + i);
}
static void cvt_from_f32(const float* src, f16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) from_f32(src[i], dst + i);
}

#include "simd_kernels.inc"
#include "neuron_groups.inc"
#include "ffn_driver.inc"

}  // namespace

extern const FfnTable kTable = GLASS_FFN_TABLE("avx2");

}  // namespace avx2
}  // namespace glass
