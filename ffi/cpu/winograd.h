// Winograd convolution for 3x3 stride-1 dilation-1 layers on the CPU: forward and bwd_data
// (which, at stride 1, is itself a 3x3 convolution of dy with the flipped, transposed filter).
// winograd.cc holds the algorithm and is compiled once per capability; its entry points are
// reached through the kernel table (kernel_table.h: kernels().winograd<T>()). The direct
// implicit-GEMM passes (conv_fwd.cc, conv_bwd_data.cc) remain the fallback and the reference.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu_common.h"

namespace jaxconv {

// The algorithm is chosen per call from the environment variable JAXCONV_CPU_CONV_ALGO:
//   unset, "" or "auto"  Winograd where it is applicable and measured faster, else direct
//   "direct"             always the direct implicit GEMM
//   "winograd"           Winograd wherever applicable (tile size chosen by shape)
//   "winograd2" / "winograd4"  Winograd F(2x2,3x3) / F(4x4,3x3) wherever applicable
// Any other value is an error the handlers return (check_conv_algo_env). Read on every call (a
// getenv is a short scan of the environment), so a test or a user can switch algorithms
// between calls of one jitted function.
enum class ConvAlgo { kAuto, kDirect, kWinograd, kWinograd2, kWinograd4, kInvalid };

inline constexpr char kConvAlgoEnv[] = "JAXCONV_CPU_CONV_ALGO";

inline ConvAlgo conv_algo() {
  const char* s = std::getenv(kConvAlgoEnv);
  if (s == nullptr || s[0] == '\0' || std::strcmp(s, "auto") == 0) return ConvAlgo::kAuto;
  if (std::strcmp(s, "direct") == 0) return ConvAlgo::kDirect;
  if (std::strcmp(s, "winograd") == 0) return ConvAlgo::kWinograd;
  if (std::strcmp(s, "winograd2") == 0) return ConvAlgo::kWinograd2;
  if (std::strcmp(s, "winograd4") == 0) return ConvAlgo::kWinograd4;
  return ConvAlgo::kInvalid;
}

inline ffi::Error check_conv_algo_env(const char* target) {
  if (conv_algo() != ConvAlgo::kInvalid) return ffi::Error::Success();
  return invalid(target, std::string("environment variable ") + kConvAlgoEnv + "='" +
                             std::getenv(kConvAlgoEnv) +
                             "' is not one of auto, direct, winograd, winograd2, winograd4");
}

// The Winograd kernels of one storage type. Each returns true when it computed the whole
// result, false when the caller must run the direct algorithm (not a 3x3 stride-1 conv,
// float64, too few channels, non-finite values, or the environment asks for direct).
template <typename T>
struct WinogradKernels {
  bool (*forward)(const ParallelRunner&, const ConvGeometry&, const T* x, const T* w,
                  const T* bias, T* y);
  bool (*backward_data)(const ParallelRunner&, const ConvGeometry&, const T* dy, const T* w,
                        const T* bias, T* dx);
};

}  // namespace jaxconv
