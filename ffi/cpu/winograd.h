// Winograd convolution for 3x3 stride-1 dilation-1 layers on the CPU: forward and bwd_data
// (which, at stride 1, is itself a 3x3 convolution of dy with the flipped, transposed filter).
// See winograd.cc for the algorithm; the direct implicit-GEMM passes of conv2d.cc remain the
// fallback and the reference.
#pragma once

#include "cpu_common.h"

namespace jaxconv {

// The algorithm is chosen per call from the environment variable JAXCONV_CPU_CONV_ALGO:
//   unset, "" or "auto"  Winograd where it is applicable and measured faster, else direct
//   "direct"             always the direct implicit GEMM
//   "winograd"           Winograd wherever applicable (tile size chosen by shape)
//   "winograd2" / "winograd4"  Winograd F(2x2,3x3) / F(4x4,3x3) wherever applicable
// Any other value is an error for the handler to return (checked by check_conv_algo_env).
ffi::Error check_conv_algo_env(const char* target);

// Each returns true when it computed the whole result with Winograd, false when the caller
// must run the direct algorithm (not a 3x3 stride-1 conv, float64, too few channels, non-finite
// values, or the environment asks for direct).
template <typename T>
bool winograd_forward(const ParallelRunner& pr, const ConvGeometry& g, const T* x, const T* w,
                      const T* bias, T* y);
template <typename T>
bool winograd_backward_data(const ParallelRunner& pr, const ConvGeometry& g, const T* dy,
                            const T* w, const T* bias, T* dx);

}  // namespace jaxconv
