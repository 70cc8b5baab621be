// Direct depthwise convolution (depthwise_kernels.cc), used by the conv kernels (conv.h) when
// every group has exactly one input and one output channel. The kernels run from the table
// chosen for this CPU (kernel_table.h).
#pragma once

#include "cpu_common.h"
#include "kernel_table.h"

namespace jaxconv {

inline bool depthwise_applicable(const ConvGeometry& g) {
  // One channel in and out per group; tap lists hold up to 64 taps per axis; the NCHW phase
  // rows start at the left padding, which must not be negative.
  return g.groups() > 1 && g.in_per_group() == 1 && g.out_per_group() == 1 && g.KH <= 64 &&
         g.KW <= 64 && g.p.pad_left >= 0;
}

template <typename T>
void depthwise_forward(const ParallelRunner& pr, const ConvGeometry& g, const T* x, const T* w,
                       const T* bias, T* y) {
  kernels().depthwise<T>().forward(pr, g, x, w, bias, y);
}

template <typename T>
void depthwise_backward_data(const ParallelRunner& pr, const ConvGeometry& g, const T* dy,
                             const T* w, const T* bias, T* dx) {
  kernels().depthwise<T>().backward_data(pr, g, dy, w, bias, dx);
}

template <typename T>
void depthwise_backward_filter(const ParallelRunner& pr, const ConvGeometry& g, const T* x,
                               const T* dy, T* dw) {
  kernels().depthwise<T>().backward_filter(pr, g, x, dy, dw);
}

}  // namespace jaxconv
