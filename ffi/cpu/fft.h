// FFT convolution on the CPU: the transform plan (sizes and output tiles) and the kernels'
// signatures. fft_transform.cc (transforms), fft_depthwise.cc and fft_dense.cc (kernels) and
// fft.cc (their dispatch into the kernel table) are compiled once per capability
// (kernel_table.h: kernels().fft<T>()); the choice of algorithm (conv_algo.h) decides when
// they run and with which plan.
//
// The plan, the correlation each direction computes and the overlap-save tiling are in
// ../fft_plan.h (shared with the CUDA kernels); dense layers sum such correlations over the
// group's input channels (fft_dense.cc).
#pragma once

#include <cstdint>

#include "../fft_plan.h"
#include "cpu_common.h"

namespace jaxconv {

// The FFT kernels (depthwise or dense, by the geometry) of one storage type (null for float64,
// which stays direct). Each
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
