// bf16 sparse FFN on AVX-512 with AVX512-BF16 (Cooper Lake, Sapphire Rapids and later Xeons, AMD Zen 4
// and later): the plain AVX-512 kernels (avx512_traits.inc and the shared .inc files), except that
// when the activations are bf16 too, the gate/up dot products of the neuron-group decode path multiply
// bf16 rows by bf16 x with VDPBF16PS, 32 products per instruction, instead of widening every weight
// to fp32 first (two instructions per 16 values, each double-pumped on Zen 4). The token-tile path
// (T > 1) reads x in bf16 and widens it as it widens the weights.
//
// Same sums up to the order of additions: VDPBF16PS adds, in each fp32 lane, the products of its two
// bf16 pairs one after the other, each product exact in fp32 and each add rounded to nearest as an
// FMA rounds it (Intel SDM, VDPBF16PS). Unlike FMA it treats denormal inputs and results as zero:
// a product below 2^-126 in magnitude (both factors near bf16's smallest normals) adds nothing.
// The down projection scales rows by an fp32 activation: widened and FMA'd as on plain AVX-512.
//
// Measured (2026-12-07, AMD EPYC Zen 4, 2 threads, one process against the plain AVX-512 kernel,
// 4 neurons in flight, prefetch 4; reports/bench/ab-builds/zen4-bf16dot-20261207.md): cold rows,
// the bandwidth in its slow state: bf16 2048x8192 1.17-1.38x, 4096x14336 1.13x, 576x1536 1.03-1.05x;
// rows in L2: 1.16-1.30x. (On a Xeon, before the neuron groups and the in-loop prefetch, the same
// instruction gained nothing: README.)
//
// Compiled with the AVX-512 flags plus -mavx512bf16 for this file only; GLASS_ISA_AVX512_EXT uses it
// for bf16 when CPUID reports AVX512-BF16.
#include <immintrin.h>

#include "internal.h"
#include "parallel.h"

namespace glass {
namespace avx512_bf16 {
namespace {

constexpr int kTile = 8;
// bf16 x is read as is (ffn_driver.inc: x stays bf16 where the weights are bf16 too).
template <class W>
constexpr bool kDotNativeX = std::is_same<W, bf16_t>::value;
template <class W>
constexpr bool kNeuronGroups = true;

#include "avx512_traits.inc"

static inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

// ga[i] = a[i] . x (and gb[i] = b[i] . x when Two) for NF bf16 rows and bf16 x: the neuron-group
// path's dot products (neuron_groups.inc; declared before it, so its group_ffn calls this overload for
// bf16 x). One 64-byte line of each row per step: one L2 prefetch per row of the later neurons
// (pa / pb, nullptr: none) per step, as the widening version does.
template <int NF, bool Two>
static inline void group_dot(const bf16_t* const* a, const bf16_t* const* b, const bf16_t* x, int64_t d,
                             float* ga, float* gb, const bf16_t* const* pa, const bf16_t* const* pb) {
  vfloat sa[NF], sb[Two ? NF : 1];
  for (int i = 0; i < NF; ++i) sa[i] = vzero();
  if constexpr (Two)
    for (int i = 0; i < NF; ++i) sb[i] = vzero();
  int64_t c = 0;
  for (; c + 32 <= d; c += 32) {
    if (pa)
      for (int i = 0; i < NF; ++i) {
        prefetch_l2(pa[i] + c);
        if constexpr (Two) prefetch_l2(pb[i] + c);
      }
    const __m512bh xv = as_bh(_mm512_loadu_si512(x + c));
    for (int i = 0; i < NF; ++i) {
      sa[i] = _mm512_dpbf16_ps(sa[i], as_bh(_mm512_loadu_si512(a[i] + c)), xv);
      if constexpr (Two) sb[i] = _mm512_dpbf16_ps(sb[i], as_bh(_mm512_loadu_si512(b[i] + c)), xv);
    }
  }
  if (c < d) {  // masked loads: the lanes past d are zero in x and the rows, and never read
    const __mmask32 m = static_cast<__mmask32>((1ull << (d - c)) - 1);
    const __m512bh xv = as_bh(_mm512_maskz_loadu_epi16(m, x + c));
    for (int i = 0; i < NF; ++i) {
      sa[i] = _mm512_dpbf16_ps(sa[i], as_bh(_mm512_maskz_loadu_epi16(m, a[i] + c)), xv);
      if constexpr (Two) sb[i] = _mm512_dpbf16_ps(sb[i], as_bh(_mm512_maskz_loadu_epi16(m, b[i] + c)), xv);
    }
  }
  for (int i = 0; i < NF; ++i) {
    ga[i] = vhsum(sa[i]);
    if constexpr (Two) gb[i] = vhsum(sb[i]);
  }
}

#include "simd_kernels.inc"
#include "neuron_groups.inc"
#include "ffn_driver.inc"

static void ffn_bf16(const FfnArgs& a) { ffn_driver<bf16_t>(a); }

}  // namespace

extern const ffn_fn kFfnBf16 = ffn_bf16;

}  // namespace avx512_bf16
}  // namespace glass
