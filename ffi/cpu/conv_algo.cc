// The one algorithm choice of the CPU convolution (conv_algo.h).
//
// Order, per call and direction:
//   1. JAXCONV_CPU_CONV_ALGO=direct: direct. =fft: FFT (the handler has already failed the
//      call if FFT cannot run it). =winograd*: Winograd's tile rule where Winograd applies.
//   2. auto: FFT where it applies and the cost model below says it is cheaper than the direct
//      kernel; else Winograd where it applies and its tile rule (winograd.cc, choose_tile)
//      takes a tile; else direct.
// The kernels decline (and the caller runs direct) on inf or NaN operands, float64, or an
// empty problem.
//
// Cost model (depthwise, the only FFT kernels so far), in units of one direct multiply-add:
//   direct = N * C * OH * OW * KH * KW
//   fft    = N * ceil(C/16) * tiles * P*Q * (kFftLog * log2(P*Q) + kFftPoint)     (per direction)
//          + ceil(C/16) * P*Q * kFftLog * log2(P*Q) / 2   (filter spectra or bwd_filter's inverse)
// where one complex transform serves 16 channels (two per complex lane). The constants are
// measured (docs/design.md, "FFT convolution"); the plan (P, Q, tile) minimizes the fft cost.
#include "conv_algo.h"

#include <cmath>

#include "kernel_table.h"
#include "winograd.h"

namespace jaxconv {
namespace {

// Measured cost of one transform point per log2(size), and of the pointwise work plus the
// loads and stores per point, in direct depthwise multiply-adds (docs/design.md).
constexpr double kFftLog = 27.0;
constexpr double kFftPoint = 175.0;
// Transforms above this many points no longer keep their four per-thread planes (and the
// block's filter spectra) in a 1 MB L2; each further kFftCachePoints points cost as much again.
// (90x90 measured 1.3-1.9x the per-point cost of 64x64, yet beat 60x60 tiles of 30x30.)
constexpr double kFftCachePoints = 8192.0;
// NCHW costs more on both sides: the direct depthwise kernels per tap (phase rows, one plane
// at a time: 1.45-5x NHWC's on the measured shapes, 1.45x at 7x7 on 56x56) and the FFT per
// point (its lanes gathered a plane apart: 1.0-1.4x). The model takes the low end of the first
// and the high end of the second.
constexpr double kDirectNchw = 1.5;
// The direct NHWC depthwise bwd_filter costs about half its forward per tap (0.55-0.65x
// measured on 9x9 at 28 and 13x13 at 14), while the FFT's bwd_filter costs about its forward.
constexpr double kDirectBwdFilterNhwc = 0.55;
constexpr double kFftNchw = 1.35;
// The FFT must win by this factor before auto takes it (the model's error margin).
constexpr double kFftMargin = 1.3;
constexpr int64_t kChannelsPerTransform = 16;

// Transform sizes: products of 2, 3 and 5 up to kFftMaxSide.
const std::vector<int64_t>& smooth_sizes() {
  static const std::vector<int64_t> sizes = fft_sizes(kFftMaxSide, {2, 3, 5});
  return sizes;
}

double transform_cost(int64_t P, int64_t Q) {
  const double pq = double(P * Q);
  const double cache = 1.0 + std::max(0.0, pq - kFftCachePoints) / kFftCachePoints;
  return cache * pq * (kFftLog * std::log2(pq) + kFftPoint);
}

FftPlan fft_plan(const ConvGeometry& g, ConvDirection dir, double* cost) {
  int64_t U, V;
  fft_out_extent(g, dir, &U, &V);
  return best_fft_plan(U, V, effective_kernel(g.KH, g.p.dilation_h),
                       effective_kernel(g.KW, g.p.dilation_w), smooth_sizes(), transform_cost,
                       cost);
}

// Whether the FFT is cheaper than the direct kernel by the model.
bool fft_pays(const ConvGeometry& g, ConvDirection dir, const FftPlan& pl, double tile_cost) {
  const double blocks = double((g.C + kChannelsPerTransform - 1) / kChannelsPerTransform);
  double fft = double(g.N) * blocks * tile_cost;
  // Once per block: the filter spectra (fwd, bwd_data) or the inverse of the sums (bwd_filter).
  fft += blocks * double(pl.P * pl.Q) * kFftLog * std::log2(double(pl.P * pl.Q)) / 2;
  double direct = double(g.N) * double(g.C) * double(g.OH * g.OW) * double(g.KH * g.KW);
  if (g.p.layout == kNCHW) {
    direct *= kDirectNchw;
    fft *= kFftNchw;
  } else if (dir == ConvDirection::kBackwardFilter) {
    direct *= kDirectBwdFilterNhwc;
  }
  return kFftMargin * fft < direct;
}

}  // namespace

const char* fft_inapplicable(const ConvGeometry& g, ConvDirection dir, bool float64) {
  if (const char* why = fft_depthwise_inapplicable(g, float64)) return why;
  double cost;
  if (!fft_plan(g, dir, &cost).valid())
    return "the dilated kernel is larger than the largest transform (128)";
  return nullptr;
}

AlgoChoice choose_conv_algo(const ConvGeometry& g, ConvDirection dir, bool float64) {
  AlgoChoice c;
  const ConvAlgo algo = conv_algo();
  if (algo == ConvAlgo::kDirect || algo == ConvAlgo::kInvalid) return c;
  const bool forced_fft = algo == ConvAlgo::kFft;
  if ((algo == ConvAlgo::kAuto || forced_fft) && !fft_inapplicable(g, dir, float64)) {
    double cost;
    const FftPlan pl = fft_plan(g, dir, &cost);
    if (forced_fft || fft_pays(g, dir, pl, cost)) {
      c.kind = AlgoChoice::kFft;
      c.fft = pl;
      return c;
    }
  }
  if (forced_fft || dir == ConvDirection::kBackwardFilter || float64 || !winograd_applicable(g))
    return c;
  // Winograd's correlation: forward x -> y (Cg -> Og onto OH x OW); bwd_data dy -> dx.
  const bool fwd = dir == ConvDirection::kForward;
  const int tile = kernels().winograd_tile(algo, g.N, fwd ? g.in_per_group() : g.out_per_group(),
                                           fwd ? g.out_per_group() : g.in_per_group(),
                                           fwd ? g.OH : g.H, fwd ? g.OW : g.W);
  if (tile != 0) {
    c.kind = AlgoChoice::kWinograd;
    c.winograd_tile = tile;
  }
  return c;
}

ffi::Error check_forced_algo(const char* target, const ConvGeometry& g, ConvDirection dir,
                             bool float64) {
  if (conv_algo() != ConvAlgo::kFft) return ffi::Error::Success();
  if (const char* why = fft_inapplicable(g, dir, float64))
    return invalid(target, std::string(kConvAlgoEnv) + "=fft cannot run this call: " + why);
  return ffi::Error::Success();
}

std::string algo_name(const AlgoChoice& c) {
  switch (c.kind) {
    case AlgoChoice::kWinograd: return "winograd" + std::to_string(c.winograd_tile);
    case AlgoChoice::kFft:
      return "fft " + std::to_string(c.fft.P) + "x" + std::to_string(c.fft.Q) + "/" +
             std::to_string(c.fft.TH) + "x" + std::to_string(c.fft.TW);
    default: return "direct";
  }
}

}  // namespace jaxconv
