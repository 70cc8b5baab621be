// FFT convolution on the CPU: the transform plan (sizes and output tiles) and the kernels'
// signatures. fft.cc holds the transforms and the kernels and is compiled once per capability
// (kernel_table.h: kernels().fft<T>()); the choice of algorithm (conv_algo.h) decides when
// they run and with which plan.
//
// The plan, the correlation each direction computes and the overlap-save tiling are in
// ../fft_plan.h (shared with the CUDA kernels).
#pragma once

#include <cstdint>

#include "../fft_plan.h"
#include "cpu_common.h"

namespace jaxconv {

// The depthwise FFT kernels of one storage type (null for float64, which stays direct). Each
// returns false without writing anything when an operand holds inf or NaN (one of them would
// spread over the whole transform), and the caller then runs the direct kernel.
template <typename T>
struct FftKernels {
  bool (*forward)(const ParallelRunner&, const ConvGeometry&, const FftPlan&, const T* x,
                  const T* w, const T* bias, T* y);
  bool (*backward_data)(const ParallelRunner&, const ConvGeometry&, const FftPlan&, const T* dy,
                        const T* w, const T* bias, T* dx);
  bool (*backward_filter)(const ParallelRunner&, const ConvGeometry&, const FftPlan&, const T* x,
                          const T* dy, T* dw);
};

}  // namespace jaxconv
