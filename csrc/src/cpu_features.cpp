// CPU feature detection: CPUID + XGETBV on x86 (the OS must save the wide registers, else the
// instructions fault even though CPUID lists them), HWCAP on aarch64.
#include "internal.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define GLASS_X86 1
#include <cpuid.h>
#endif
#if defined(__aarch64__)
#include <sys/auxv.h>
#endif

namespace glass {

#if defined(GLASS_X86)
namespace {
struct X86Features {
  bool avx2 = false, avx512 = false, avx512bf16 = false;
  X86Features() {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    const bool osxsave = c & (1u << 27);
    const bool fma = c & (1u << 12);
    const bool f16c = c & (1u << 29);
    const bool avx = c & (1u << 28);
    if (!osxsave || !avx) return;
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    const bool ymm_os = (xlo & 0x6u) == 0x6u;     // XMM + YMM state
    const bool zmm_os = (xlo & 0xe6u) == 0xe6u;   // + opmask, ZMM_Hi256, Hi16_ZMM
    if (__get_cpuid_max(0, nullptr) < 7) return;
    __cpuid_count(7, 0, a, b, c, d);
    const bool avx2f = b & (1u << 5);
    const bool f512 = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
    avx2 = ymm_os && avx2f && fma && f16c;
    avx512 = avx2 && zmm_os && f512 && dq && bw && vl;
    unsigned a1, b1, c1, d1;
    __cpuid_count(7, 1, a1, b1, c1, d1);
    avx512bf16 = avx512 && (a1 & (1u << 5));
  }
};
const X86Features& x86() {
  static const X86Features f;
  return f;
}
}  // namespace
bool cpu_has_avx2() { return x86().avx2; }
bool cpu_has_avx512() { return x86().avx512; }
bool cpu_has_avx512bf16() { return x86().avx512bf16; }
bool cpu_has_neon() { return false; }
bool cpu_has_neon_fhm() { return false; }
bool cpu_has_neon_bf16() { return false; }
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
bool cpu_has_avx512bf16() { return false; }
#if defined(__aarch64__)
// Linux's bits (asm/hwcap.h), spelled out so that older C libraries' headers still build.
constexpr unsigned long kHwcapAsimdHp = 1ul << 10;   // HWCAP_ASIMDHP: fp16 vector arithmetic
constexpr unsigned long kHwcapAsimdFhm = 1ul << 23;  // HWCAP_ASIMDFHM: FMLAL/FMLSL
constexpr unsigned long kHwcap2Bf16 = 1ul << 14;     // HWCAP2_BF16: BFDOT, BFMLALB/T, ...
bool cpu_has_neon() { return true; }  // Advanced SIMD is mandatory in AArch64
bool cpu_has_neon_fhm() {
  static const bool has = (getauxval(AT_HWCAP) & (kHwcapAsimdHp | kHwcapAsimdFhm)) ==
                          (kHwcapAsimdHp | kHwcapAsimdFhm);
  return has;
}
bool cpu_has_neon_bf16() {
  static const bool has = (getauxval(AT_HWCAP2) & kHwcap2Bf16) != 0;
  return has;
}
#else
bool cpu_has_neon() { return false; }
bool cpu_has_neon_fhm() { return false; }
bool cpu_has_neon_bf16() { return false; }
#endif
#endif

}  // namespace glass
