// This capability's kernel table (compiled once per capability; see kernel_table.h).
#include "kernel_table.h"

#ifndef JAXCONV_CPU_CAPABILITY
#error "compile once per capability with -DJAXCONV_CPU_CAPABILITY=cpu_<name> (CMakeLists.txt)"
#endif

#define JAXCONV_STR2(x) #x
#define JAXCONV_STR(x) JAXCONV_STR2(x)

namespace jaxconv::JAXCONV_CPU_CAPABILITY {

const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t{};
    // "cpu_avx2" -> "avx2"
    t.capability = JAXCONV_STR(JAXCONV_CPU_CAPABILITY) + 4;
    add_gemm_kernels(&t);
    add_half_convert_kernels(&t);
    add_depthwise_kernels(&t);
#if JAXCONV_CPU_POOL_FROM_AVX2
    // The avx512 table: AVX2's pool kernels, faster here than the same source built for AVX-512
    // (ffi/CMakeLists.txt, which leaves max_pool2d_kernels.cc out of the avx512 objects).
    cpu_avx2::add_pool_kernels(&t);
#else
    add_pool_kernels(&t);
#endif
    add_winograd_kernels(&t);
    add_fft_kernels(&t);
    return t;
  }();
  return table;
}

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY
