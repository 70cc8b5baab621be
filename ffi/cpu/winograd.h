// Winograd convolution for 3x3 stride-1 dilation-1 layers on the CPU: forward, bwd_data
// (which, at stride 1, is itself a 3x3 convolution of dy with the flipped, transposed filter)
// and bwd_filter (the adjoint of the forward's per-tile algorithm).
// winograd.cc holds the algorithm and is compiled once per capability; its entry points are
// reached through the kernel table (kernel_table.h: kernels().winograd<T>()). The direct
// implicit-GEMM passes (conv_fwd.cc, conv_bwd_data.cc, conv_bwd_filter.cc) remain the fallback
// and the reference.
#pragma once

#include <cstdint>

#include "conv_algo.h"
#include "cpu_common.h"

namespace jaxconv {

// 3x3, stride 1, dilation 1, more than one channel on each side of a group (depthwise layers
// have their own kernel).
inline bool winograd_applicable(const ConvGeometry& g) {
  return g.KH == 3 && g.KW == 3 && g.p.stride_h == 1 && g.p.stride_w == 1 && g.p.dilation_h == 1 &&
         g.p.dilation_w == 1 && g.in_per_group() > 1 && g.out_per_group() > 1;
}

// Winograd's tile rule (winograd.cc): 2 or 4, or 0 for the direct algorithm, for a correlation
// with Cin input and Cout output channels per group onto a U x V plane, in direction dir
// (bwd_filter: the forward's correlation, whose filter is the result); bf16_gemm: bfloat16 data
// whose F(2x2) GEMMs run on vdpbf16ps (F(4x4) and bwd_filter stay float32). Only the one
// algorithm choice (conv_algo.cc) calls it.
using WinogradTileRule = int (*)(ConvAlgo, ConvDirection dir, int64_t N, int64_t Cin, int64_t Cout,
                                 int64_t U, int64_t V, bool bf16_gemm);

// The Winograd kernels of one storage type, run with the tile the algorithm choice took. Each
// returns true when it computed the whole result, false when the caller must run the direct
// algorithm (not a 3x3 stride-1 conv, float64, an empty problem, non-finite values).
template <typename T>
struct WinogradKernels {
  bool (*forward)(const ParallelRunner&, const ConvGeometry&, int tile, const T* x, const T* w,
                  const T* bias, T* y);
  bool (*backward_data)(const ParallelRunner&, const ConvGeometry&, int tile, const T* dy,
                        const T* w, const T* bias, T* dx);
  bool (*backward_filter)(const ParallelRunner&, const ConvGeometry&, int tile, const T* x,
                          const T* dy, T* dw);
};

}  // namespace jaxconv
