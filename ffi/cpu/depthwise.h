// Direct depthwise convolution kernels (depthwise.cc), used by conv2d.cc when every group has
// exactly one input and one output channel.
#pragma once

#include "cpu_common.h"

namespace jaxconv {

bool depthwise_applicable(const ConvGeometry& g);

template <typename T>
void depthwise_forward(const ParallelRunner& pr, const ConvGeometry& g, const T* x, const T* w,
                       const T* bias, T* y);
template <typename T>
void depthwise_backward_data(const ParallelRunner& pr, const ConvGeometry& g, const T* dy,
                             const T* w, const T* bias, T* dx);
template <typename T>
void depthwise_backward_filter(const ParallelRunner& pr, const ConvGeometry& g, const T* x,
                               const T* dy, T* dw);

}  // namespace jaxconv
