// The shape-only part of FFT convolution, shared by the CPU (ffi/cpu/fft.cc, conv_algo.cc) and
// the CUDA (ffi/cuda/fft_conv.cuh, fft_conv_choice.h) kernels: the plan (transform size and
// output tile), its search under a platform's cost function, and which calls FFT can run at all.
// Plain host C++ on geometry.h, no CPU- or CUDA-specific include.
//
// Every direction is a stride-1 correlation of a "data" plane with a small "filter" plane,
// channel by channel (depthwise: one input and one output channel per group):
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
#include <initializer_list>
#include <vector>

#include "geometry.h"

namespace jaxconv {

struct FftPlan {
  int64_t P = 0, Q = 0;    // transform size (rows, columns)
  int64_t TH = 0, TW = 0;  // output tile (rows, columns); tiles = ceil(U/TH) * ceil(V/TW)
  bool valid() const { return P > 0; }
  int64_t tiles(int64_t U, int64_t V) const { return ceil_div(U, TH) * ceil_div(V, TW); }
};

// Largest transform the CPU plans use, per axis: bounds the scratch (see docs/design.md).
inline constexpr int64_t kFftMaxSide = 128;

enum class ConvDirection { kForward, kBackwardData, kBackwardFilter };

// The extent U x V of the correlation's output (the tiled plane) per direction: forward writes
// y, bwd_data dx, bwd_filter tiles the positions of dy.
inline void fft_out_extent(const ConvGeometry& g, ConvDirection dir, int64_t* U, int64_t* V) {
  if (dir == ConvDirection::kBackwardData) {
    *U = g.H;
    *V = g.W;
  } else {
    *U = g.OH;
    *V = g.OW;
  }
}

// Transform sizes up to max_side whose only prime factors are in `radices` (2, 3, 5 on the CPU;
// 2 on the GPU), ascending.
inline std::vector<int64_t> fft_sizes(int64_t max_side, std::initializer_list<int64_t> radices) {
  std::vector<int64_t> s;
  for (int64_t n = 2; n <= max_side; ++n) {
    int64_t m = n;
    for (int64_t f : radices)
      while (m % f == 0) m /= f;
    if (m == 1) s.push_back(n);
  }
  return s;
}

// The cheapest plan, by tiles * cost(P, Q), for a U x V output and a KEh x KEw effective kernel
// over the ascending transform sizes `sizes` (invalid when the kernel does not fit one).
template <typename Cost>
FftPlan best_fft_plan(int64_t U, int64_t V, int64_t KEh, int64_t KEw,
                      const std::vector<int64_t>& sizes, Cost cost_of, double* cost) {
  FftPlan best;
  double best_cost = 0;
  for (int64_t P : sizes) {
    if (P < KEh) continue;
    const int64_t TH = U < P - KEh + 1 ? U : P - KEh + 1;
    for (int64_t Q : sizes) {
      if (Q < KEw) continue;
      const int64_t TW = V < Q - KEw + 1 ? V : Q - KEw + 1;
      const int64_t tiles = ((U + TH - 1) / TH) * ((V + TW - 1) / TW);
      const double c = double(tiles) * cost_of(P, Q);
      if (!best.valid() || c < best_cost) {
        best = {P, Q, TH, TW};
        best_cost = c;
      }
      if (TW == V) break;  // a larger whole-width transform only costs more
    }
    if (TH == U) break;  // likewise along the rows
  }
  *cost = best_cost;
  return best;
}

// Why the depthwise FFT kernels cannot run this call whatever its size, or nullptr when they
// can if the dilated kernel fits a transform (the platform checks that with its own sizes).
inline const char* fft_depthwise_inapplicable(const ConvGeometry& g, bool float64) {
  if (float64) return "float64 runs the direct kernels only";
  if (g.p.stride_h != 1 || g.p.stride_w != 1) return "the FFT kernels need stride 1";
  if (g.in_per_group() != 1 || g.out_per_group() != 1)
    return "the FFT kernels are depthwise only (one input and one output channel per group)";
  return nullptr;
}

}  // namespace jaxconv
