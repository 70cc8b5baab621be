// The one algorithm choice of the CPU convolution: direct (implicit GEMM, or the direct
// depthwise kernel), Winograd or FFT, per call and direction (conv_algo.cc). Conv<T> asks it
// before running anything; the benchmark asks it (through the module's conv_algorithm) which
// algorithm a call takes.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu_common.h"
#include "fft.h"

namespace jaxconv {

// The environment variable JAXCONV_CPU_CONV_ALGO overrides the choice, per call:
//   unset, "" or "auto"  the cost model below
//   "direct"             always the direct kernels
//   "winograd"           Winograd wherever applicable (tile size chosen by shape)
//   "winograd2" / "winograd4"  Winograd F(2x2,3x3) / F(4x4,3x3) wherever applicable
//   "fft"                FFT; a call it cannot run is an error naming why (check_forced_algo)
// Any other value is an error the handlers return (check_conv_algo_env). Read on every call (a
// getenv is a short scan of the environment), so a test or a user can switch algorithms
// between calls of one jitted function.
enum class ConvAlgo { kAuto, kDirect, kWinograd, kWinograd2, kWinograd4, kFft, kInvalid };

inline constexpr char kConvAlgoEnv[] = "JAXCONV_CPU_CONV_ALGO";

inline ConvAlgo conv_algo() {
  const char* s = std::getenv(kConvAlgoEnv);
  if (s == nullptr || s[0] == '\0' || std::strcmp(s, "auto") == 0) return ConvAlgo::kAuto;
  if (std::strcmp(s, "direct") == 0) return ConvAlgo::kDirect;
  if (std::strcmp(s, "winograd") == 0) return ConvAlgo::kWinograd;
  if (std::strcmp(s, "winograd2") == 0) return ConvAlgo::kWinograd2;
  if (std::strcmp(s, "winograd4") == 0) return ConvAlgo::kWinograd4;
  if (std::strcmp(s, "fft") == 0) return ConvAlgo::kFft;
  return ConvAlgo::kInvalid;
}

inline ffi::Error check_conv_algo_env(const char* target) {
  if (conv_algo() != ConvAlgo::kInvalid) return ffi::Error::Success();
  return invalid(target, std::string("environment variable ") + kConvAlgoEnv + "='" +
                             std::getenv(kConvAlgoEnv) +
                             "' is not one of auto, direct, winograd, winograd2, winograd4, fft");
}

struct AlgoChoice {
  enum Kind { kDirect, kWinograd, kFft } kind = kDirect;
  int winograd_tile = 0;  // 2 or 4 for kWinograd
  FftPlan fft;            // for kFft
};

// Why the FFT kernels cannot run this call, or nullptr when they can.
const char* fft_inapplicable(const ConvGeometry& g, ConvDirection dir, bool float64);

// The algorithm for this call under JAXCONV_CPU_CONV_ALGO (read here). Non-finite operands
// are found later by the kernels, which then decline and the caller runs direct. bfloat16:
// the call's storage type is bfloat16 (Winograd's tile rule then knows whether F(2x2) runs its
// GEMMs on vdpbf16ps).
AlgoChoice choose_conv_algo(const ConvGeometry& g, ConvDirection dir, bool float64,
                            bool bfloat16 = false);

// An error when JAXCONV_CPU_CONV_ALGO=fft forces FFT on a call it cannot run.
ffi::Error check_forced_algo(const char* target, const ConvGeometry& g, ConvDirection dir,
                             bool float64);

// "direct", "winograd2", "winograd4" or "fft PxQ/TxT" (transform size and output tile).
std::string algo_name(const AlgoChoice& c);

}  // namespace jaxconv
