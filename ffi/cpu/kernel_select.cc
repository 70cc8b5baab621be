// Chooses the kernel table for this CPU, once (kernel_table.h). Compiled for the baseline only.
#include <cstdlib>
#include <cstring>

#include "kernel_table.h"

namespace jaxconv {

namespace {

bool avx2_disabled_by_environment() {
  const char* off = std::getenv("JAXCONV_DISABLE_AVX2");
  return off != nullptr && off[0] != '\0' && std::strcmp(off, "0") != 0;
}

const KernelTable& select_kernels() {
#if JAXCONV_CPU_AVX2  // set by CMake where it builds the cpu_avx2 objects (x86-64)
  __builtin_cpu_init();
  if (!avx2_disabled_by_environment() && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    return cpu_avx2::kernel_table();
#endif
  return cpu_baseline::kernel_table();
}

}  // namespace

const KernelTable& kernels() {
  static const KernelTable& chosen = select_kernels();
  return chosen;
}

}  // namespace jaxconv
