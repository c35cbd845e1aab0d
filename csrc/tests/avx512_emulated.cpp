// Test-only translation unit: sparse_ffn_avx512.cpp compiled against SIMDe's portable AVX-512
// intrinsics (with AVX2 underneath), so the AVX-512 path's logic runs on CPUs without AVX-512.
// Linked into glass_tests_avx512_emulated only (CMakeLists.txt); see the note in that file.
#define GLASS_AVX512_EMULATED 1
#include "sparse_ffn_avx512.cpp"
