// FFT convolution on the CPU: the transform plan (sizes and output tiles) and the kernels'
// signatures. fft_transform.cc (transforms), fft_depthwise.cc and fft_dense.cc (kernels) and
// fft.cc (their dispatch into the kernel table) are compiled once per capability
// (kernel_table.h: kernels().fft<T>()); the choice of algorithm (conv_algo.h) decides when
// they run and with which plan.
//
// Every direction is a stride-1 correlation of a "data" plane with a small "filter" plane,
// channel by channel (depthwise; dense layers sum such correlations over the group's input
// channels, fft_dense.cc):
//
//   out[u, v] = sum over (a, b) of in[u + a - pad_h, v + b - pad_w] * f[a, b]
//
// over the effective (dilated) kernel a < KE_h = (KH-1)*dh + 1, b < KE_w, f zero between the
// dilated taps. Forward: in = x, f = w. bwd_data (stride 1): in = dy, f = w flipped,
// pad = KE - 1 - pad. bwd_filter: the correlation of x with dy, summed over images, read at
// the taps (a, b) = (kh*dh, kw*dw).
//
// The output is cut into tiles of TH x TW; a tile's input patch (TH + KE_h - 1 rows) lies in
// one P x Q transform (P >= TH + KE_h - 1), so the circular correlation of the patch with f
// equals the linear one on the tile's cells (overlap-save). One tile covering the whole output
// is the "whole plane" case.
#pragma once

#include <cstdint>

#include "cpu_common.h"

namespace jaxconv {

struct FftPlan {
  int64_t P = 0, Q = 0;    // transform size (rows, columns): products of 2, 3 and 5
  int64_t TH = 0, TW = 0;  // output tile (rows, columns); tiles = ceil(U/TH) * ceil(V/TW)
  bool valid() const { return P > 0; }
};

// Largest transform the plans use, per axis: bounds the scratch (see docs/design.md).
inline constexpr int64_t kFftMaxSide = 128;

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
