// Test-only: the AVX-512 intrinsics used by sparse_ffn_avx512.cpp that SIMDe 0.7 does not provide,
// written element by element from Intel's intrinsics guide on top of SIMDe's types, so that the
// emulated test build (GLASS_AVX512_EMULATED, csrc/tests) can run that file on a CPU without
// AVX-512. Never part of a shipped build.
#pragma once

#include <cstdint>
#include <cstring>

#include "internal.h"

namespace glass {
namespace emu512 {

static inline simde__m512 maskz_loadu_ps(simde__mmask16 m, const void* p) {
  float v[16] = {0};
  const float* f = static_cast<const float*>(p);
  for (int i = 0; i < 16; ++i)
    if (m & (1u << i)) v[i] = f[i];  // masked-off lanes are never read
  return simde_mm512_loadu_ps(v);
}
static inline void mask_storeu_ps(void* p, simde__mmask16 m, simde__m512 a) {
  float v[16];
  simde_mm512_storeu_ps(v, a);
  float* f = static_cast<float*>(p);
  for (int i = 0; i < 16; ++i)
    if (m & (1u << i)) f[i] = v[i];
}
static inline simde__m256i maskz_loadu_epi16(simde__mmask16 m, const void* p) {
  uint16_t v[16] = {0};
  const uint16_t* h = static_cast<const uint16_t*>(p);
  for (int i = 0; i < 16; ++i)
    if (m & (1u << i)) v[i] = h[i];
  return simde_mm256_loadu_si256(v);
}
static inline simde__m512i cvtepu16_epi32(simde__m256i a) {
  uint16_t h[16];
  uint32_t w[16];
  simde_mm256_storeu_si256(h, a);
  for (int i = 0; i < 16; ++i) w[i] = h[i];
  return simde_mm512_loadu_si512(w);
}
static inline simde__m256i cvtepi32_epi16(simde__m512i a) {  // vpmovdw: truncation
  uint32_t w[16];
  uint16_t h[16];
  simde_mm512_storeu_si512(w, a);
  for (int i = 0; i < 16; ++i) h[i] = static_cast<uint16_t>(w[i]);
  return simde_mm256_loadu_si256(h);
}
static inline simde__m512 cvtph_ps(simde__m256i a) {
  uint16_t h[16];
  float f[16];
  simde_mm256_storeu_si256(h, a);
  for (int i = 0; i < 16; ++i) f[i] = f16_to_f32(h[i]);
  return simde_mm512_loadu_ps(f);
}
static inline simde__m256i cvtps_ph(simde__m512 a, int) {  // round to nearest even
  float f[16];
  uint16_t h[16];
  simde_mm512_storeu_ps(f, a);
  for (int i = 0; i < 16; ++i) h[i] = f32_to_f16(f[i]);
  return simde_mm256_loadu_si256(h);
}
static inline float reduce_add_ps(simde__m512 a) {
  float f[16];
  simde_mm512_storeu_ps(f, a);
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += f[i];
  return s;
}

static inline simde__m512i cvtepi8_epi32(simde__m128i a) {  // vpmovsxbd: sign extension
  int8_t b[16];
  int32_t w[16];
  simde_mm_storeu_si128(b, a);
  for (int i = 0; i < 16; ++i) w[i] = b[i];
  return simde_mm512_loadu_si512(w);
}
static inline simde__m512i cvtepu8_epi32(simde__m128i a) {  // vpmovzxbd: zero extension
  uint8_t b[16];
  int32_t w[16];
  simde_mm_storeu_si128(b, a);
  for (int i = 0; i < 16; ++i) w[i] = b[i];
  return simde_mm512_loadu_si512(w);
}
static inline simde__m512 cvtepi32_ps(simde__m512i a) {  // exact for |a| < 2^24 (all that is used)
  int32_t w[16];
  float f[16];
  simde_mm512_storeu_si512(w, a);
  for (int i = 0; i < 16; ++i) f[i] = static_cast<float>(w[i]);
  return simde_mm512_loadu_ps(f);
}
static inline simde__m512i cvtepu8_epi16(simde__m256i a) {
  uint8_t b[32];
  int16_t w[32];
  simde_mm256_storeu_si256(b, a);
  for (int i = 0; i < 32; ++i) w[i] = b[i];
  return simde_mm512_loadu_si512(w);
}
static inline simde__m512i mask_i32gather_epi32(simde__m512i src, simde__mmask16 k, simde__m512i idx,
                                                const void* base, int scale) {
  int32_t r[16], o[16];
  simde_mm512_storeu_si512(r, src);
  simde_mm512_storeu_si512(o, idx);
  for (int i = 0; i < 16; ++i)
    if (k & (1u << i)) std::memcpy(&r[i], static_cast<const char*>(base) + int64_t(o[i]) * scale, 4);
  return simde_mm512_loadu_si512(r);
}
// SIMDe 0.7 has it, but its native alias takes the masked form's four arguments.
static inline simde__m512i madd_epi16(simde__m512i a, simde__m512i b) {
  int16_t x[32], y[32];
  int32_t r[16];
  simde_mm512_storeu_si512(x, a);
  simde_mm512_storeu_si512(y, b);
  for (int i = 0; i < 16; ++i) r[i] = int32_t(x[2 * i]) * y[2 * i] + int32_t(x[2 * i + 1]) * y[2 * i + 1];
  return simde_mm512_loadu_si512(r);
}

}  // namespace emu512
}  // namespace glass

#define _mm512_maskz_loadu_ps glass::emu512::maskz_loadu_ps
#define _mm512_mask_storeu_ps glass::emu512::mask_storeu_ps
#define _mm256_maskz_loadu_epi16 glass::emu512::maskz_loadu_epi16
#define _mm512_cvtepu16_epi32 glass::emu512::cvtepu16_epi32
#define _mm512_cvtepi32_epi16 glass::emu512::cvtepi32_epi16
#define _mm512_cvtph_ps glass::emu512::cvtph_ps
#define _mm512_cvtepi8_epi32 glass::emu512::cvtepi8_epi32
#define _mm512_cvtepu8_epi32 glass::emu512::cvtepu8_epi32
#define _mm512_cvtepi32_ps glass::emu512::cvtepi32_ps
#define _mm512_cvtepu8_epi16 glass::emu512::cvtepu8_epi16
#define _mm512_mask_i32gather_epi32 glass::emu512::mask_i32gather_epi32
#undef _mm512_madd_epi16
#define _mm512_madd_epi16 glass::emu512::madd_epi16
#define _mm512_cvtps_ph glass::emu512::cvtps_ph
#define _mm512_reduce_add_ps glass::emu512::reduce_add_ps
