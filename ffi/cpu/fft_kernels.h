// The FFT convolution kernels of one capability (fft.h states what each direction computes):
// depthwise (fft_depthwise.cc) and dense / grouped (fft_dense.cc). fft.cc puts the dispatch
// between the two into the kernel table. Each returns false without writing anything when an
// operand holds inf or NaN; instantiated for float, f16_t and bf16_t.
#pragma once

#include "fft.h"

namespace jaxconv::JAXCONV_CPU_CAPABILITY::fft {

template <typename T>
bool depthwise_fft_forward(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                           const T* x, const T* w, const T* bias, T* y);
template <typename T>
bool depthwise_fft_backward_data(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                                 const T* dy, const T* w, const T* bias, T* dx);
template <typename T>
bool depthwise_fft_backward_filter(const ParallelRunner& pr, const ConvGeometry& g,
                                   const FftPlan& pl, const T* x, const T* dy, T* dw);

template <typename T>
bool dense_fft_forward(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                       const T* x, const T* w, const T* bias, T* y);
template <typename T>
bool dense_fft_backward_data(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                             const T* dy, const T* w, const T* bias, T* dx);
template <typename T>
bool dense_fft_backward_filter(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                               const T* x, const T* dy, T* dw);

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY::fft
