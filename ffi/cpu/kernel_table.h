// One table of the CPU kernels that have vector code, chosen once at load time.
//
// Each kernel file with vector code (gemm.cc, gemm_bf16.cc, half_convert.cc,
// depthwise_kernels.cc, max_pool2d_kernels.cc, winograd.cc, fft.cc, kernel_table.cc) is compiled
// once per instruction-set capability by CMake, as its own object library with flags for that
// capability and JAXCONV_CPU_CAPABILITY set to a namespace name:
//
//   capability    namespace      flags
//   baseline      cpu_baseline   (x86-64 / the compiler's default)
//   AVX2 + FMA    cpu_avx2       -mavx2 -mfma
//   AVX-512       cpu_avx512     the AVX2 flags, -mf16c, -mavx512{f,dq,bw,vl}
//                                (auto-vectorizer kept at 256 bits; explicit 512-bit code where
//                                it pays: the GEMM micro-kernel)
//   avx512_bf16   (cpu_avx512)   not a build of its own: the avx512 table plus gemm_bf16,
//                                functions with target("avx512bf16") in the avx512 objects,
//                                chosen by kernel_select.cc when cpuid reports AVX512_BF16
//
// so every function is defined once per capability, in that namespace. Each capability's
// kernel_table() fills a KernelTable with its own functions; kernels() (kernel_select.cc,
// compiled for the baseline only) asks cpuid (and XCR0, for the OS's register saving) once
// which table this CPU can run. Nothing is compiled with -march=native, so one build runs on
// any x86-64 CPU. Adding a capability is one more row in CMakeLists.txt's
// JAXCONV_CPU_CAPABILITIES and one branch in kernel_select.cc.
//
// Everything else (packing, epilogues, handlers) is compiled once for the baseline. Inline
// functions from shared headers (Num<T>, std::vector, ...) are emitted by every object; the
// linker keeps the first copy, so CMake links the baseline objects before any capability's.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cpu_common.h"
#include "fft.h"
#include "winograd.h"

namespace jaxconv {

// The direct depthwise kernels of one storage type (depthwise_kernels.cc).
template <typename T>
struct DepthwiseKernels {
  void (*forward)(const ParallelRunner&, const ConvGeometry&, const T* x, const T* w, const T* bias,
                  T* y);
  void (*backward_data)(const ParallelRunner&, const ConvGeometry&, const T* dy, const T* w,
                        const T* bias, T* dx);
  void (*backward_filter)(const ParallelRunner&, const ConvGeometry&, const T* x, const T* dy,
                          T* dw);
};

// The max-pool kernels of one storage type (max_pool2d_kernels.cc). forward_values is the
// forward without indices (the same y, bit for bit).
template <typename T>
struct PoolKernels {
  void (*forward)(const ParallelRunner&, const PoolGeometry&, const T* x, T* y, int32_t* idx);
  void (*forward_values)(const ParallelRunner&, const PoolGeometry&, const T* x, T* y);
  void (*backward)(const ParallelRunner&, const PoolGeometry&, const T* dy, const int32_t* idx,
                   T* dx);
};

// The packed GEMM of gemm.cc (see gemm.h for the operand formats).
template <typename S>
using GemmPacked = void (*)(int64_t M, int64_t N, int64_t K, const S* A, int64_t lda, const S* Bp,
                            int64_t panel_stride, S* C, int64_t ldc, bool accumulate);

// The same GEMM with A read indirectly (gemm.cc): A[r][k] = rows[r][koff[k]], a row pointer per
// row of C and an offset per reduction index (gemm.h's gemm_indirect).
template <typename S>
using GemmIndirect = void (*)(int64_t M, int64_t N, int64_t K, const S* const* rows,
                              const int64_t* koff, const S* Bp, int64_t panel_stride, S* C,
                              int64_t ldc, bool accumulate);

struct KernelTable {
  const char* capability;  // "baseline", "avx2", "avx512", "avx512_bf16"
  GemmPacked<float> gemm_f32;
  // The same GEMM for float32 operands that hold bfloat16 values (gemm_bf16.cc: vdpbf16ps, bf16
  // pairs along K, float32 accumulation); null except in the avx512_bf16 table.
  GemmPacked<float> gemm_bf16;
  // Winograd's bfloat16 GEMM stage (gemm_bf16.cc, vdpbf16ps): C[M x N] (+)= A * B on operands
  // already rounded to bf16 pairs along K (one uint32_t per pair): A rows of KP pairs, lda
  // pairs apart; B panels of KP x 16 pairs (pair row j of panel p: the 16 columns' pairs
  // (B[2j, c], B[2j+1, c])), panel_stride pairs apart. Null except in the avx512_bf16 table.
  void (*gemm_bf16_pairs)(int64_t M, int64_t N, int64_t KP, const uint32_t* A, int64_t lda,
                          const uint32_t* Bq, int64_t panel_stride, float* C, int64_t ldc,
                          bool accumulate);
  // n float16 values (raw bits) widened to float32, exactly (half_convert.cc: F16C where the
  // capability has it); the packing of float16 operands (conv_pack.h's copy_widen).
  void (*widen_f16)(float* dst, const uint16_t* src, int64_t n);
  GemmPacked<double> gemm_f64;
  GemmIndirect<float> gemm_indirect_f32;
  GemmIndirect<double> gemm_indirect_f64;
  DepthwiseKernels<float> depthwise_f32;
  DepthwiseKernels<double> depthwise_f64;
  DepthwiseKernels<f16_t> depthwise_f16;
  DepthwiseKernels<bf16_t> depthwise_bf16;
  PoolKernels<float> pool_f32;
  PoolKernels<double> pool_f64;
  PoolKernels<f16_t> pool_f16;
  PoolKernels<bf16_t> pool_bf16;
  WinogradKernels<float> winograd_f32;
  WinogradKernels<double> winograd_f64;
  WinogradKernels<f16_t> winograd_f16;
  WinogradKernels<bf16_t> winograd_bf16;
  WinogradTileRule winograd_tile;
  FftKernels<float> fft_f32;
  FftKernels<double> fft_f64;  // all null: float64 stays direct
  FftKernels<f16_t> fft_f16;
  FftKernels<bf16_t> fft_bf16;

  template <typename T>
  const DepthwiseKernels<T>& depthwise() const {
    if constexpr (std::is_same_v<T, float>)
      return depthwise_f32;
    else if constexpr (std::is_same_v<T, double>)
      return depthwise_f64;
    else if constexpr (std::is_same_v<T, f16_t>)
      return depthwise_f16;
    else
      return depthwise_bf16;
  }
  template <typename T>
  const WinogradKernels<T>& winograd() const {
    if constexpr (std::is_same_v<T, float>)
      return winograd_f32;
    else if constexpr (std::is_same_v<T, double>)
      return winograd_f64;
    else if constexpr (std::is_same_v<T, f16_t>)
      return winograd_f16;
    else
      return winograd_bf16;
  }
  template <typename T>
  const FftKernels<T>& fft() const {
    if constexpr (std::is_same_v<T, float>)
      return fft_f32;
    else if constexpr (std::is_same_v<T, double>)
      return fft_f64;
    else if constexpr (std::is_same_v<T, f16_t>)
      return fft_f16;
    else
      return fft_bf16;
  }
  template <typename T>
  const PoolKernels<T>& pool() const {
    if constexpr (std::is_same_v<T, float>)
      return pool_f32;
    else if constexpr (std::is_same_v<T, double>)
      return pool_f64;
    else if constexpr (std::is_same_v<T, f16_t>)
      return pool_f16;
    else
      return pool_bf16;
  }
};

// Each capability's table and the parts its kernel files fill in.
#define JAXCONV_DECLARE_CAPABILITY(cap)        \
  namespace cap {                              \
  const KernelTable& kernel_table();           \
  void add_gemm_kernels(KernelTable*);         \
  void add_bf16_gemm_kernels(KernelTable*);    \
  void add_half_convert_kernels(KernelTable*); \
  void add_depthwise_kernels(KernelTable*);    \
  void add_pool_kernels(KernelTable*);         \
  void add_winograd_kernels(KernelTable*);     \
  void add_fft_kernels(KernelTable*);          \
  }
JAXCONV_DECLARE_CAPABILITY(cpu_baseline)
JAXCONV_DECLARE_CAPABILITY(cpu_avx2)
JAXCONV_DECLARE_CAPABILITY(cpu_avx512)
#undef JAXCONV_DECLARE_CAPABILITY

// The environment variable that forces a capability no higher than the machine's: "baseline",
// "avx2" or "avx512" (unset or empty: the highest the CPU and OS support). Read once, at the
// first kernels() call (the module's import asks for it, so in practice at import).
inline constexpr char kCpuCapabilityEnv[] = "JAXCONV_CPU_CAPABILITY";

// The table for this CPU (kernel_select.cc): the highest capability cpuid and XCR0 allow, or
// the one JAXCONV_CPU_CAPABILITY names.
const KernelTable& kernels();

// Non-empty when JAXCONV_CPU_CAPABILITY is not a capability name, or names one this CPU lacks;
// the message names the value. Handlers return it as their error (check_cpu_capability_env);
// the module's cpu_capability() raises it, so `import jaxconv` fails with it.
const std::string& cpu_capability_error();

// The capabilities this CPU and this build can run, lowest first ("baseline", ...).
std::vector<const char*> cpu_capabilities();

inline ffi::Error check_cpu_capability_env(const char* target) {
  const std::string& e = cpu_capability_error();
  if (e.empty()) return ffi::Error::Success();
  return invalid(target, e);
}

}  // namespace jaxconv
