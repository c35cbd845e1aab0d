// AArch64 Advanced SIMD (NEON) sparse FFN: 4-lane fp32 vectors, the same structure as the AVX2
// file (64-byte steps with one prefetch per line of the next selected neuron's rows, 4-token tiles,
// independent accumulators). fp16 weights widen with vcvt_f32_f16 and bf16 with a 16-bit shift,
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

static inline float32x4_t load4(const float* p) { return vld1q_f32(p); }
static inline float32x4_t load4(const bf16_t* p) {
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
}
static inline float32x4_t load4(const f16_t* p) {
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
}
template <class W>
static inline float32x4_t load_tail(const W* p, int64_t n) {
  float t[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) t[i] = to_f32(p[i]);
  return vld1q_f32(t);
}
static inline void store_tail(float* p, float32x4_t v, int64_t n) {
  float t[4];
  vst1q_f32(t, v);
  for (int64_t i = 0; i < n; ++i) p[i] = t[i];
}
static inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

template <class W>
static void cvt_to_f32(const W* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, load4(src + i));
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
}
template <class W>
static void cvt_from_f32(const float* src, W* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) from_f32(src[i], dst + i);  // same rounding as the scalar path
}

template <class W>
constexpr int64_t line_elems() { return 64 / static_cast<int64_t>(sizeof(W)); }

template <int NT, class W>
static inline void dot2_n(const W* a, const W* b, const float* x, int64_t ldx, int64_t d, float* ga,
                          float* gb, const W* pfa, const W* pfb) {
  constexpr int64_t E = line_elems<W>();
  constexpr int U = NT == 1 ? 2 : 1;
  float32x4_t sa[NT][U], sb[NT][U];
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < U; ++u) sa[t][u] = sb[t][u] = vdupq_n_f32(0.0f);
  int64_t c = 0;
  for (; c + E <= d; c += E) {
    prefetch(pfa + c);
    prefetch(pfb + c);
    for (int64_t v = 0; v < E; v += 4) {
      const float32x4_t wa = load4(a + c + v);
      const float32x4_t wb = load4(b + c + v);
      const int u = U == 1 ? 0 : static_cast<int>((v / 4) & 1);
      for (int t = 0; t < NT; ++t) {
        const float32x4_t xv = vld1q_f32(x + t * ldx + c + v);
        sa[t][u] = vfmaq_f32(sa[t][u], wa, xv);
        sb[t][u] = vfmaq_f32(sb[t][u], wb, xv);
      }
    }
  }
  for (; c + 4 <= d; c += 4) {
    const float32x4_t wa = load4(a + c);
    const float32x4_t wb = load4(b + c);
    for (int t = 0; t < NT; ++t) {
      const float32x4_t xv = vld1q_f32(x + t * ldx + c);
      sa[t][0] = vfmaq_f32(sa[t][0], wa, xv);
      sb[t][0] = vfmaq_f32(sb[t][0], wb, xv);
    }
  }
  if (c < d) {
    const float32x4_t wa = load_tail(a + c, d - c);
    const float32x4_t wb = load_tail(b + c, d - c);
    for (int t = 0; t < NT; ++t) {
      const float32x4_t xv = load_tail(x + t * ldx + c, d - c);
      sa[t][0] = vfmaq_f32(sa[t][0], wa, xv);
      sb[t][0] = vfmaq_f32(sb[t][0], wb, xv);
    }
  }
  for (int t = 0; t < NT; ++t) {
    float32x4_t ra = sa[t][0], rb = sb[t][0];
    if (U == 2) {
      ra = vaddq_f32(ra, sa[t][U - 1]);
      rb = vaddq_f32(rb, sb[t][U - 1]);
    }
    ga[t] = vaddvq_f32(ra);
    gb[t] = vaddvq_f32(rb);
  }
}

template <int NT, class W>
static inline void dot1_n(const W* a, const float* x, int64_t ldx, int64_t d, float* ga,
                          const W* pfa) {
  constexpr int64_t E = line_elems<W>();
  constexpr int U = NT == 1 ? 4 : (NT == 2 ? 2 : 1);
  float32x4_t sa[NT][U];
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < U; ++u) sa[t][u] = vdupq_n_f32(0.0f);
  int64_t c = 0;
  for (; c + E <= d; c += E) {
    prefetch(pfa + c);
    for (int64_t v = 0; v < E; v += 4) {
      const float32x4_t wa = load4(a + c + v);
      const int u = static_cast<int>((v / 4) % U);
      for (int t = 0; t < NT; ++t) sa[t][u] = vfmaq_f32(sa[t][u], wa, vld1q_f32(x + t * ldx + c + v));
    }
  }
  for (; c + 4 <= d; c += 4) {
    const float32x4_t wa = load4(a + c);
    for (int t = 0; t < NT; ++t) sa[t][0] = vfmaq_f32(sa[t][0], wa, vld1q_f32(x + t * ldx + c));
  }
  if (c < d) {
    const float32x4_t wa = load_tail(a + c, d - c);
    for (int t = 0; t < NT; ++t) sa[t][0] = vfmaq_f32(sa[t][0], wa, load_tail(x + t * ldx + c, d - c));
  }
  for (int t = 0; t < NT; ++t) {
    float32x4_t r = sa[t][0];
    for (int u = 1; u < U; ++u) r = vaddq_f32(r, sa[t][u]);
    ga[t] = vaddvq_f32(r);
  }
}

template <int NT, class W>
static inline void axpy_n(const W* w, const float* h, float* acc, int64_t ldacc, int64_t d,
                          const W* pf) {
  constexpr int64_t E = line_elems<W>();
  float32x4_t hv[NT];
  for (int t = 0; t < NT; ++t) hv[t] = vdupq_n_f32(h[t]);
  int64_t c = 0;
  for (; c + E <= d; c += E) {
    prefetch(pf + c);
    for (int64_t v = 0; v < E; v += 4) {
      const float32x4_t wv = load4(w + c + v);
      for (int t = 0; t < NT; ++t) {
        float* o = acc + t * ldacc + c + v;
        vst1q_f32(o, vfmaq_f32(vld1q_f32(o), hv[t], wv));
      }
    }
  }
  for (; c + 4 <= d; c += 4) {
    const float32x4_t wv = load4(w + c);
    for (int t = 0; t < NT; ++t) {
      float* o = acc + t * ldacc + c;
      vst1q_f32(o, vfmaq_f32(vld1q_f32(o), hv[t], wv));
    }
  }
  if (c < d) {
    const float32x4_t wv = load_tail(w + c, d - c);
    for (int t = 0; t < NT; ++t) {
      float* o = acc + t * ldacc + c;
      store_tail(o, vfmaq_f32(load_tail(o, d - c), hv[t], wv), d - c);
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
    {"f32_sparse_ffn__neon", "f16_sparse_ffn__neon", "bf16_sparse_ffn__neon"},
    {"f32_sparse_mlp__neon", "f16_sparse_mlp__neon", "bf16_sparse_mlp__neon"},
};

}  // namespace neon
}  // namespace glass
