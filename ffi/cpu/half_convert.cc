// Widening float16 to float32 for the packing of float16 convolutions (conv_pack.h's
// copy_widen): compiled once per capability (kernel_table.h). The baseline converts one value
// at a time (cpu_common.h's f16_to_float: a dozen instructions and a branch or two per value);
// the AVX2 and AVX-512 objects use F16C's vcvtph2ps, 8 values per instruction, exact for every
// float16 (subnormals, inf, NaN) like the scalar conversion. For a float16 GEMM whose packed
// operand feeds few output columns (NHWC with 64 output channels: 4 FMA instructions per packed
// value) the scalar conversion cost more than the multiply-adds.
#include <cstdint>

#include "kernel_table.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace jaxconv::JAXCONV_CPU_CAPABILITY {
namespace {

#if defined(__AVX2__)
// F16C ships with every AVX2 CPU; kernel_select.cc checks its cpuid bit with AVX2's.
__attribute__((target("f16c"))) void widen_f16(float* dst, const uint16_t* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = f16_to_float(src[i]);
}
#else
void widen_f16(float* dst, const uint16_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(src[i]);
}
#endif

}  // namespace

void add_half_convert_kernels(KernelTable* table) { table->widen_f16 = widen_f16; }

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY
