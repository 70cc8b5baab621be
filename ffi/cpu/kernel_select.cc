// Chooses the kernel table for this CPU, once (kernel_table.h). Compiled for the baseline only.
//
// A capability runs only where the CPU executes its instructions AND the operating system saves
// its registers on a context switch: cpuid reports the former, XCR0 (read with xgetbv, allowed
// once cpuid reports OSXSAVE) the latter. AVX needs the SSE and YMM state (XCR0 bits 1, 2);
// AVX-512 also the opmask, ZMM_Hi256 and Hi16_ZMM state (bits 5, 6, 7). A kernel with zmm
// instructions on an OS that does not save them would fault or, worse, lose register contents.
//
// avx512_bf16 is avx512 plus AVX512_BF16 (cpuid leaf 7 subleaf 1, EAX bit 5: vdpbf16ps and the
// bf16 conversions; Cooper Lake, Sapphire Rapids, Zen 4): the avx512 table with the bfloat16
// GEMM (gemm_bf16.cc) filled in, so JAXCONV_CPU_CAPABILITY=avx512 runs bfloat16 as before
// (widened to float32 in the float32 GEMM) and the two can be compared on one machine.
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "kernel_table.h"

namespace jaxconv {

namespace {

// Capabilities from lowest to highest; each includes the ones before it.
enum Capability { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kCapabilityCount = 4 };
constexpr const char* kCapabilityNames[kCapabilityCount] = {"baseline", "avx2", "avx512",
                                                            "avx512_bf16"};

#if defined(__x86_64__) || defined(__i386__)
uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}
#endif

// The highest capability this CPU and OS can run (among those this build holds).
Capability machine_capability() {
#if defined(JAXCONV_CPU_AVX2) && (defined(__x86_64__) || defined(__i386__))
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return kBaseline;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), avx = c & (1u << 28);
  const bool f16c = c & (1u << 29);  // half_convert.cc's vcvtph2ps (every AVX2 CPU has it)
  if (!osxsave || !avx || !fma || !f16c) return kBaseline;
  const uint64_t xcr0 = read_xcr0();
  if ((xcr0 & 0x6) != 0x6) return kBaseline;  // SSE + YMM state
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return kBaseline;
  const bool avx2 = b & (1u << 5);
  if (!avx2) return kBaseline;
#if defined(JAXCONV_CPU_AVX512)
  const bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  if (f && dq && bw && vl && (xcr0 & 0xe6) == 0xe6) {  // + opmask, ZMM state
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5))) return kAvx512Bf16;
    return kAvx512;
  }
#endif
  return kAvx2;
#else
  return kBaseline;
#endif
}

const KernelTable& table_of(Capability cap) {
  switch (cap) {
#if defined(JAXCONV_CPU_AVX512)
    case kAvx512Bf16: {
      static const KernelTable table = [] {
        KernelTable t = cpu_avx512::kernel_table();
        t.capability = kCapabilityNames[kAvx512Bf16];
        cpu_avx512::add_bf16_gemm_kernels(&t);
        return t;
      }();
      return table;
    }
    case kAvx512: return cpu_avx512::kernel_table();
#endif
#if defined(JAXCONV_CPU_AVX2)
    case kAvx2: return cpu_avx2::kernel_table();
#endif
    default: return cpu_baseline::kernel_table();
  }
}

struct Selection {
  Capability machine = kBaseline;
  const KernelTable* table = nullptr;
  std::string error;  // non-empty: JAXCONV_CPU_CAPABILITY asked for something this CPU can't do
};

Selection select() {
  Selection s;
  s.machine = machine_capability();
  Capability chosen = s.machine;
  const char* want = std::getenv(kCpuCapabilityEnv);
  if (want != nullptr && want[0] != '\0') {
    int found = -1;
    for (int i = 0; i < kCapabilityCount; ++i)
      if (std::strcmp(want, kCapabilityNames[i]) == 0) found = i;
    std::string names;
    for (int i = 0; i <= s.machine; ++i) names += std::string(i ? ", " : "") + kCapabilityNames[i];
    if (found < 0) {
      s.error = std::string("environment variable ") + kCpuCapabilityEnv + "='" + want +
                "' is not one of baseline, avx2, avx512, avx512_bf16";
    } else if (found > s.machine) {
      s.error = std::string("environment variable ") + kCpuCapabilityEnv + "='" + want +
                "' asks for a capability this CPU (or this build) lacks; it has " + names;
    } else {
      chosen = static_cast<Capability>(found);
    }
  }
  // On an error the kernels stay runnable (the machine's own table), but every handler and
  // cpu_capability() report it.
  s.table = &table_of(chosen);
  return s;
}

const Selection& selection() {
  static const Selection s = select();
  return s;
}

}  // namespace

const KernelTable& kernels() { return *selection().table; }

const std::string& cpu_capability_error() { return selection().error; }

std::vector<const char*> cpu_capabilities() {
  std::vector<const char*> names;
  for (int i = 0; i <= selection().machine; ++i) names.push_back(kCapabilityNames[i]);
  return names;
}

}  // namespace jaxconv
