// AVX-512 (F/BW/VL/DQ + FMA) sparse FFN: a close twin of sparse_ffn_avx2.cpp with 16-lane vectors,
// masked tails instead of zero-padded copies, and 8-token tiles (32 vector registers hold the
// 16 gate/up accumulators). Compiled with the AVX-512 flags for this file only; chosen at run time
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


static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const bf16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline __m512 load16(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// n < 16 elements, the rest zero (masked loads never touch memory past the mask).
static inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
static inline __m512 load_tail(const float* p, int64_t n) {
  return _mm512_maskz_loadu_ps(tail_mask(n), p);
}
static inline __m512 load_tail(const bf16_t* p, int64_t n) {
  __m256i h = _mm256_maskz_loadu_epi16(tail_mask(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline __m512 load_tail(const f16_t* p, int64_t n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail_mask(n), p));
}

static inline void prefetch(const void* p) {
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
}

template <class W>
static void cvt_to_f32(const W* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
  if (i < n) _mm512_mask_storeu_ps(dst + i, tail_mask(n - i), load_tail(src + i, n - i));
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

// Two 64-byte cache lines per step (so fp32 rows also get two vectors per step to alternate
// accumulators on), one prefetch per line of the next selected neuron's row.
template <class W>
constexpr int64_t step_elems() { return 128 / static_cast<int64_t>(sizeof(W)); }

template <int NT, class W>
static inline void dot2_n(const W* a, const W* b, const float* x, int64_t ldx, int64_t d, float* ga,
                          float* gb, const W* pfa, const W* pfb) {
  constexpr int64_t E = step_elems<W>();
  constexpr int U = NT == 1 ? 2 : 1;
  __m512 sa[NT][U], sb[NT][U];
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < U; ++u) sa[t][u] = sb[t][u] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + E <= d; c += E) {
    prefetch(pfa + c);
    prefetch(pfa + c + E / 2);
    prefetch(pfb + c);
    prefetch(pfb + c + E / 2);
    for (int64_t v = 0; v < E; v += 16) {
      const __m512 wa = load16(a + c + v);
      const __m512 wb = load16(b + c + v);
      const int u = U == 1 ? 0 : static_cast<int>((v / 16) & 1);
      for (int t = 0; t < NT; ++t) {
        const __m512 xv = _mm512_loadu_ps(x + t * ldx + c + v);
        sa[t][u] = _mm512_fmadd_ps(wa, xv, sa[t][u]);
        sb[t][u] = _mm512_fmadd_ps(wb, xv, sb[t][u]);
      }
    }
  }
  for (; c + 16 <= d; c += 16) {
    const __m512 wa = load16(a + c);
    const __m512 wb = load16(b + c);
    for (int t = 0; t < NT; ++t) {
      const __m512 xv = _mm512_loadu_ps(x + t * ldx + c);
      sa[t][0] = _mm512_fmadd_ps(wa, xv, sa[t][0]);
      sb[t][0] = _mm512_fmadd_ps(wb, xv, sb[t][0]);
    }
  }
  if (c < d) {
    const __m512 wa = load_tail(a + c, d - c);
    const __m512 wb = load_tail(b + c, d - c);
    for (int t = 0; t < NT; ++t) {
      const __m512 xv = load_tail(x + t * ldx + c, d - c);
      sa[t][0] = _mm512_fmadd_ps(wa, xv, sa[t][0]);
      sb[t][0] = _mm512_fmadd_ps(wb, xv, sb[t][0]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    __m512 ra = sa[t][0], rb = sb[t][0];
    if (U == 2) {
      ra = _mm512_add_ps(ra, sa[t][U - 1]);
      rb = _mm512_add_ps(rb, sb[t][U - 1]);
    }
    ga[t] = _mm512_reduce_add_ps(ra);
    gb[t] = _mm512_reduce_add_ps(rb);
  }
}

template <int NT, class W>
static inline void dot1_n(const W* a, const float* x, int64_t ldx, int64_t d, float* ga,
                          const W* pfa) {
  constexpr int64_t E = step_elems<W>();
  constexpr int U = NT == 1 ? 2 : 1;
  __m512 sa[NT][U];
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < U; ++u) sa[t][u] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + E <= d; c += E) {
    prefetch(pfa + c);
    prefetch(pfa + c + E / 2);
    for (int64_t v = 0; v < E; v += 16) {
      const __m512 wa = load16(a + c + v);
      const int u = U == 1 ? 0 : static_cast<int>((v / 16) & 1);
      for (int t = 0; t < NT; ++t)
        sa[t][u] = _mm512_fmadd_ps(wa, _mm512_loadu_ps(x + t * ldx + c + v), sa[t][u]);
    }
  }
  for (; c + 16 <= d; c += 16) {
    const __m512 wa = load16(a + c);
    for (int t = 0; t < NT; ++t)
      sa[t][0] = _mm512_fmadd_ps(wa, _mm512_loadu_ps(x + t * ldx + c), sa[t][0]);
  }
  if (c < d) {
    const __m512 wa = load_tail(a + c, d - c);
    for (int t = 0; t < NT; ++t)
      sa[t][0] = _mm512_fmadd_ps(wa, load_tail(x + t * ldx + c, d - c), sa[t][0]);
  }
  for (int t = 0; t < NT; ++t) {
    __m512 r = sa[t][0];
    if (U == 2) r = _mm512_add_ps(r, sa[t][U - 1]);
    ga[t] = _mm512_reduce_add_ps(r);
  }
}

template <int NT, class W>
static inline void axpy_n(const W* w, const float* h, float* acc, int64_t ldacc, int64_t d,
                          const W* pf) {
  constexpr int64_t E = step_elems<W>();
  __m512 hv[NT];
  for (int t = 0; t < NT; ++t) hv[t] = _mm512_set1_ps(h[t]);
  int64_t c = 0;
  for (; c + E <= d; c += E) {
    prefetch(pf + c);
    prefetch(pf + c + E / 2);
    for (int64_t v = 0; v < E; v += 16) {
      const __m512 wv = load16(w + c + v);
      for (int t = 0; t < NT; ++t) {
        float* o = acc + t * ldacc + c + v;
        _mm512_storeu_ps(o, _mm512_fmadd_ps(hv[t], wv, _mm512_loadu_ps(o)));
      }
    }
  }
  for (; c + 16 <= d; c += 16) {
    const __m512 wv = load16(w + c);
    for (int t = 0; t < NT; ++t) {
      float* o = acc + t * ldacc + c;
      _mm512_storeu_ps(o, _mm512_fmadd_ps(hv[t], wv, _mm512_loadu_ps(o)));
    }
  }
  if (c < d) {
    const __mmask16 m = tail_mask(d - c);
    const __m512 wv = load_tail(w + c, d - c);
    for (int t = 0; t < NT; ++t) {
      float* o = acc + t * ldacc + c;
      _mm512_mask_storeu_ps(o, m, _mm512_fmadd_ps(hv[t], wv, _mm512_maskz_loadu_ps(m, o)));
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
    case 4: dot2_n<4>(a, b, x, ldx, d, ga, gb, pfa, pfb); break;
    case 5: dot2_n<5>(a, b, x, ldx, d, ga, gb, pfa, pfb); break;
    case 6: dot2_n<6>(a, b, x, ldx, d, ga, gb, pfa, pfb); break;
    case 7: dot2_n<7>(a, b, x, ldx, d, ga, gb, pfa, pfb); break;
    default: dot2_n<8>(a, b, x, ldx, d, ga, gb, pfa, pfb); break;
  }
}
template <class W>
static void dot1_tile(const W* a, const float* x, int64_t ldx, int nt, int64_t d, float* ga,
                      const W* pfa) {
  switch (nt) {
    case 1: dot1_n<1>(a, x, ldx, d, ga, pfa); break;
    case 2: dot1_n<2>(a, x, ldx, d, ga, pfa); break;
    case 3: dot1_n<3>(a, x, ldx, d, ga, pfa); break;
    case 4: dot1_n<4>(a, x, ldx, d, ga, pfa); break;
    case 5: dot1_n<5>(a, x, ldx, d, ga, pfa); break;
    case 6: dot1_n<6>(a, x, ldx, d, ga, pfa); break;
    case 7: dot1_n<7>(a, x, ldx, d, ga, pfa); break;
    default: dot1_n<8>(a, x, ldx, d, ga, pfa); break;
  }
}
template <class W>
static void axpy_tile(const W* w, const float* h, int nt, float* acc, int64_t ldacc, int64_t d,
                      const W* pf) {
  switch (nt) {
    case 1: axpy_n<1>(w, h, acc, ldacc, d, pf); break;
    case 2: axpy_n<2>(w, h, acc, ldacc, d, pf); break;
    case 3: axpy_n<3>(w, h, acc, ldacc, d, pf); break;
    case 4: axpy_n<4>(w, h, acc, ldacc, d, pf); break;
    case 5: axpy_n<5>(w, h, acc, ldacc, d, pf); break;
    case 6: axpy_n<6>(w, h, acc, ldacc, d, pf); break;
    case 7: axpy_n<7>(w, h, acc, ldacc, d, pf); break;
    default: axpy_n<8>(w, h, acc, ldacc, d, pf); break;
  }
}

#include "ffn_driver.inc"

static void ffn_f32(const FfnArgs& a) { ffn_driver<float>(a); }
static void ffn_f16(const FfnArgs& a) { ffn_driver<f16_t>(a); }
static void ffn_bf16(const FfnArgs& a) { ffn_driver<bf16_t>(a); }

}  // namespace

extern const FfnTable kTable = {
    {ffn_f32, ffn_f16, ffn_bf16},
    {"f32_sparse_ffn__avx512", "f16_sparse_ffn__avx512", "bf16_sparse_ffn__avx512"},
    {"f32_sparse_mlp__avx512", "f16_sparse_mlp__avx512", "bf16_sparse_mlp__avx512"},
};

}  // namespace avx512
}  // namespace glass
