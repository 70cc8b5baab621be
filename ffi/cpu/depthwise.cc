// Depthwise convolution (one input and one output channel per group: groups = C = O), the three
// kernels computed directly instead of as degenerate GEMMs (a GEMM per channel would have a
// single row or column).
//
//   y[n, c, oh, ow]  = bias[c] + sum_{kh, kw} x[n, c, oh*s - pt + kh*d, ow*s - pl + kw*d] * w[c, kh, kw]
//   dx[n, c, h, w]   = bias[c] + sum of dy[n, c, oh, ow] * w[c, kh, kw] over the (oh, ow, kh, kw)
//                      whose forward tap reads (h, w)
//   dw[c, kh, kw]    = sum_{n, oh, ow} dy[n, c, oh, ow] * x[n, c, oh*s - pt + kh*d, ...]
//
// NHWC vectorizes across channels (contiguous): a block of kCB channels of one output cell is
// accumulated in registers over the taps. NCHW vectorizes along a row: each input plane is
// first copied, zero-padded, into s "phase" rows per input row, so that the columns a tap reads
// for consecutive outputs (ow*s + kw*d) become consecutive elements of one phase row; every
// kernel is then a sequence of contiguous multiply-adds (or dot products, for dw).
//
// Compiled for baseline x86-64 and again with AVX2+FMA, chosen at run time like the GEMM.
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "depthwise.h"

namespace jaxconv {

// The kernels twice: baseline x86-64, then with AVX2+FMA for every function they define.
namespace dw_generic {
#include "depthwise_kernels.inc"
}  // namespace dw_generic

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace dw_avx2 {
#include "depthwise_kernels.inc"
}  // namespace dw_avx2
#pragma GCC pop_options

bool depthwise_applicable(const ConvGeometry& g) {
  // One channel in and out per group; tap lists hold up to 64 taps per axis; the NCHW phase
  // rows start at the left padding, which must not be negative.
  return g.groups() > 1 && g.in_per_group() == 1 && g.out_per_group() == 1 && g.KH <= 64 &&
         g.KW <= 64 && g.p.pad_left >= 0;
}

template <typename T>
void depthwise_forward(const ParallelRunner& pr, const ConvGeometry& g, const T* x, const T* w,
                       const T* bias, T* y) {
  if (cpu_has_avx2_fma())
    dw_avx2::DW<T>(g).forward(pr, x, w, bias, y);
  else
    dw_generic::DW<T>(g).forward(pr, x, w, bias, y);
}

template <typename T>
void depthwise_backward_data(const ParallelRunner& pr, const ConvGeometry& g, const T* dy,
                             const T* w, const T* bias, T* dx) {
  if (cpu_has_avx2_fma())
    dw_avx2::DW<T>(g).backward_data(pr, dy, w, bias, dx);
  else
    dw_generic::DW<T>(g).backward_data(pr, dy, w, bias, dx);
}

template <typename T>
void depthwise_backward_filter(const ParallelRunner& pr, const ConvGeometry& g, const T* x,
                               const T* dy, T* dw) {
  if (cpu_has_avx2_fma())
    dw_avx2::DW<T>(g).backward_filter(pr, x, dy, dw);
  else
    dw_generic::DW<T>(g).backward_filter(pr, x, dy, dw);
}

#define JAXCONV_DW_INSTANTIATE(T)                                                           \
  template void depthwise_forward<T>(const ParallelRunner&, const ConvGeometry&, const T*,   \
                                     const T*, const T*, T*);                               \
  template void depthwise_backward_data<T>(const ParallelRunner&, const ConvGeometry&,       \
                                           const T*, const T*, const T*, T*);               \
  template void depthwise_backward_filter<T>(const ParallelRunner&, const ConvGeometry&,     \
                                             const T*, const T*, T*);
JAXCONV_DW_INSTANTIATE(float)
JAXCONV_DW_INSTANTIATE(double)
JAXCONV_DW_INSTANTIATE(f16_t)
JAXCONV_DW_INSTANTIATE(bf16_t)
#undef JAXCONV_DW_INSTANTIATE

}  // namespace jaxconv
