// AVX2 + FMA + F16C sparse FFN (compiled with -mavx2 -mfma -mf16c for this file only; chosen at run
// time when CPUID and XGETBV say the CPU and the OS support it). The driver (ffn_driver.inc) is
// shared with the other ISAs; this file supplies the vector primitives:
//  - weights are converted to fp32 in registers (bf16: zero-extend + shift, fp16: vcvtph2ps);
//  - rows are walked in 64-byte chunks (one cache line of every row per step), with one software
//    prefetch per line of the NEXT selected neuron's row: indices jump, and the hardware streamer
//    neither follows a jump nor crosses a 4 KiB page, so each new row would start with a miss;
//  - up to kTile = 4 tokens share one pass over a row (register blocking: 4 tokens x 2 rows = 8
//    accumulators for gate/up), so T > 1 reads each weight row once per 4 tokens;
//  - with one token, alternate accumulators per vector keep 4 independent FMA chains.
#include <immintrin.h>

#include "internal.h"
#include "parallel.h"

namespace glass {
namespace avx2 {
namespace {

constexpr int kTile = 4;
template <class W>
constexpr bool kDotNativeX = false;  // dot products read x in fp32

// ---- loads: 8 weights -> 8 fp32 ----
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const bf16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline __m256 load8(const f16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// n < 8 weights, zero padded (tails of odd d).
template <class W>
static inline __m256 load_tail(const W* p, int64_t n) {
  alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) t[i] = to_f32(p[i]);
  return _mm256_load_ps(t);
}
static inline __m256 load_tail_f(const float* p, int64_t n) {
  alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return _mm256_load_ps(t);
}
static inline void store_tail_f(float* p, __m256 v, int64_t n) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (int64_t i = 0; i < n; ++i) p[i] = t[i];
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline void prefetch(const void* p) {
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
}

// ---- conversions of activations ----
template <class W>
static void cvt_to_f32(const W* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
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

// Elements of W per 64-byte cache line: the unit of one step (and one prefetch per row).
template <class W>
constexpr int64_t line_elems() { return 64 / static_cast<int64_t>(sizeof(W)); }

// ---- gate/up: ga[t] = a . x_t, gb[t] = b . x_t for NT tokens ----
template <int NT, class W>
static inline void dot2_n(const W* a, const W* b, const float* x, int64_t ldx, int64_t d, float* ga,
                          float* gb, const W* pfa, const W* pfb) {
  constexpr int64_t E = line_elems<W>();
  // NT == 1: two accumulators per row (alternating vectors) -> 4 independent FMA chains.
  constexpr int U = NT == 1 ? 2 : 1;
  __m256 sa[NT][U], sb[NT][U];
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < U; ++u) sa[t][u] = sb[t][u] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + E <= d; c += E) {
    prefetch(pfa + c);
    prefetch(pfb + c);
    for (int64_t v = 0; v < E; v += 8) {
      const __m256 wa = load8(a + c + v);
      const __m256 wb = load8(b + c + v);
      const int u = U == 1 ? 0 : static_cast<int>((v / 8) & 1);
      for (int t = 0; t < NT; ++t) {
        const __m256 xv = _mm256_loadu_ps(x + t * ldx + c + v);
        sa[t][u] = _mm256_fmadd_ps(wa, xv, sa[t][u]);
        sb[t][u] = _mm256_fmadd_ps(wb, xv, sb[t][u]);
      }
    }
  }
  for (; c + 8 <= d; c += 8) {
    const __m256 wa = load8(a + c);
    const __m256 wb = load8(b + c);
    for (int t = 0; t < NT; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * ldx + c);
      sa[t][0] = _mm256_fmadd_ps(wa, xv, sa[t][0]);
      sb[t][0] = _mm256_fmadd_ps(wb, xv, sb[t][0]);
    }
  }
  if (c < d) {
    const __m256 wa = load_tail(a + c, d - c);
    const __m256 wb = load_tail(b + c, d - c);
    for (int t = 0; t < NT; ++t) {
      const __m256 xv = load_tail_f(x + t * ldx + c, d - c);
      sa[t][0] = _mm256_fmadd_ps(wa, xv, sa[t][0]);
      sb[t][0] = _mm256_fmadd_ps(wb, xv, sb[t][0]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    __m256 ra = sa[t][0], rb = sb[t][0];
    if (U == 2) {
      ra = _mm256_add_ps(ra, sa[t][U - 1]);
      rb = _mm256_add_ps(rb, sb[t][U - 1]);
    }
    ga[t] = hsum(ra);
    gb[t] = hsum(rb);
  }
}

template <int NT, class W>
static inline void dot1_n(const W* a, const float* x, int64_t ldx, int64_t d, float* ga,
                          const W* pfa) {
  constexpr int64_t E = line_elems<W>();
  constexpr int U = NT == 1 ? 4 : (NT == 2 ? 2 : 1);  // >= 4 chains
  __m256 sa[NT][U];
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < U; ++u) sa[t][u] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + E <= d; c += E) {
    prefetch(pfa + c);
    for (int64_t v = 0; v < E; v += 8) {
      const __m256 wa = load8(a + c + v);
      const int u = static_cast<int>((v / 8) % U);
      for (int t = 0; t < NT; ++t)
        sa[t][u] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x + t * ldx + c + v), sa[t][u]);
    }
  }
  for (; c + 8 <= d; c += 8) {
    const __m256 wa = load8(a + c);
    for (int t = 0; t < NT; ++t)
      sa[t][0] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x + t * ldx + c), sa[t][0]);
  }
  if (c < d) {
    const __m256 wa = load_tail(a + c, d - c);
    for (int t = 0; t < NT; ++t)
      sa[t][0] = _mm256_fmadd_ps(wa, load_tail_f(x + t * ldx + c, d - c), sa[t][0]);
  }
  for (int t = 0; t < NT; ++t) {
    __m256 r = sa[t][0];
    for (int u = 1; u < U; ++u) r = _mm256_add_ps(r, sa[t][u]);
    ga[t] = hsum(r);
  }
}

// ---- down: acc_t += h[t] * w for NT tokens ----
template <int NT, class W>
static inline void axpy_n(const W* w, const float* h, float* acc, int64_t ldacc, int64_t d,
                          const W* pf) {
  constexpr int64_t E = line_elems<W>();
  __m256 hv[NT];
  for (int t = 0; t < NT; ++t) hv[t] = _mm256_set1_ps(h[t]);
  int64_t c = 0;
  for (; c + E <= d; c += E) {
    prefetch(pf + c);
    for (int64_t v = 0; v < E; v += 8) {
      const __m256 wv = load8(w + c + v);
      for (int t = 0; t < NT; ++t) {
        float* o = acc + t * ldacc + c + v;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(hv[t], wv, _mm256_loadu_ps(o)));
      }
    }
  }
  for (; c + 8 <= d; c += 8) {
    const __m256 wv = load8(w + c);
    for (int t = 0; t < NT; ++t) {
      float* o = acc + t * ldacc + c;
      _mm256_storeu_ps(o, _mm256_fmadd_ps(hv[t], wv, _mm256_loadu_ps(o)));
    }
  }
  if (c < d) {
    const __m256 wv = load_tail(w + c, d - c);
    for (int t = 0; t < NT; ++t) {
      float* o = acc + t * ldacc + c;
      store_tail_f(o, _mm256_fmadd_ps(hv[t], wv, load_tail_f(o, d - c)), d - c);
    }
  }
}

template <class W>
static void dot2_tile(const W* a, const W* b, const float* x, int64_t ldx, int nt, int64_t d,
                      float* ga, float* gb, const W* pfa, const W* pfb) {
  switch (nt) {
    case 1: dot2_n<1>(a, b, x, ldx, d, ga, gb, pfa, pfb); break;
    case 2: dot2_n<2>(a, b, x, ldx, d, ga, gb, pfa, pfb); break;
    case 3: dot2_n<3>(a, b, x, ldx, d, ga, gb, pfa, pfb); break;
    default: dot2_n<4>(a, b, x, ldx, d, ga, gb, pfa, pfb); break;
  }
}
template <class W>
static void dot1_tile(const W* a, const float* x, int64_t ldx, int nt, int64_t d, float* ga,
                      const W* pfa) {
  switch (nt) {
    case 1: dot1_n<1>(a, x, ldx, d, ga, pfa); break;
    case 2: dot1_n<2>(a, x, ldx, d, ga, pfa); break;
    case 3: dot1_n<3>(a, x, ldx, d, ga, pfa); break;
    default: dot1_n<4>(a, x, ldx, d, ga, pfa); break;
  }
}
template <class W>
static void axpy_tile(const W* w, const float* h, int nt, float* acc, int64_t ldacc, int64_t d,
                      const W* pf) {
  switch (nt) {
    case 1: axpy_n<1>(w, h, acc, ldacc, d, pf); break;
    case 2: axpy_n<2>(w, h, acc, ldacc, d, pf); break;
    case 3: axpy_n<3>(w, h, acc, ldacc, d, pf); break;
    default: axpy_n<4>(w, h, acc, ldacc, d, pf); break;
  }
}

#include "ffn_driver.inc"

static void ffn_f32(const FfnArgs& a) { ffn_driver<float>(a); }
static void ffn_f16(const FfnArgs& a) { ffn_driver<f16_t>(a); }
static void ffn_bf16(const FfnArgs& a) { ffn_driver<bf16_t>(a); }

}  // namespace

extern const FfnTable kTable = {
    {ffn_f32, ffn_f16, ffn_bf16},
    {"f32_sparse_ffn__avx2", "f16_sparse_ffn__avx2", "bf16_sparse_ffn__avx2"},
    {"f32_sparse_mlp__avx2", "f16_sparse_mlp__avx2", "bf16_sparse_mlp__avx2"},
};

}  // namespace avx2
}  // namespace glass
