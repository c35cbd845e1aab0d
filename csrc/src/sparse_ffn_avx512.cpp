// AVX-512 (F/BW/VL/DQ + FMA) sparse FFN: the vector traits (simd_traits.md) with 16-lane vectors,
// masked tails instead of zero-padded copies, and 8-token tiles (32 vector registers hold the
// 16 gate/up accumulators); the kernels themselves are the shared simd_kernels.inc /
// neuron_groups.inc / ffn_driver.inc. Compiled with the AVX-512 flags for this file only; chosen at run time
// when CPUID + XGETBV report AVX-512 F/BW/VL/DQ and OS support for the ZMM state.
//
// The traits themselves are avx512_traits.inc, shared with sparse_ffn_avx512_bf16.cpp.
//
// The C++ tests run this file against the scalar path and the fp64 oracle wherever the CPU has
// AVX-512, and a second test build (GLASS_AVX512_EMULATED, when the SIMDe headers are installed)
// compiles this same file against SIMDe's portable AVX-512 intrinsics so that its logic (tails,
// masks, tiles, conversions) is tested on any x86 machine.
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

#include "avx512_traits.inc"

#include "simd_kernels.inc"
#include "neuron_groups.inc"
#include "ffn_driver.inc"

}  // namespace

extern const FfnTable kTable = GLASS_FFN_TABLE("avx512");

}  // namespace avx512
}  // namespace glass
