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
// Cost model (depthwise; the dense one is further down), in units of one direct multiply-add:
//   direct = N * C * OH * OW * KH * KW    (times the layout's and direction's factors below)
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
// at a time) and the FFT per point (its lanes gathered a plane apart: 1.0-1.4x, the model takes
// the high end). The direct kernel's extra grows as the planes narrow (short rows): fitted to
// same-run direct/FFT timings of depthwise 3x3 .. 13x13 on 7 .. 56 wide planes (docs/design.md),
// its cost per tap is kDirectNchw times NHWC's on planes at least kNchwNarrowWidth wide and
// kDirectNchw * kNchwNarrowWidth / width on narrower ones (fitted: 2.4x at 28, 4.7x at 14, 9x at
// 7, forward), and bwd_data's another kDirectNchwBwdData (it measured 1.5-3x the forward's).
constexpr double kDirectNchw = 1.5;
constexpr double kNchwNarrowWidth = 42.0;
constexpr double kDirectNchwBwdData = 1.5;
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
    int64_t U, V;
    fft_out_extent(g, dir, &U, &V);  // the direct kernel's output plane
    direct *= kDirectNchw * std::max(1.0, kNchwNarrowWidth / double(V));
    if (dir == ConvDirection::kBackwardData) direct *= kDirectNchwBwdData;
    fft *= kFftNchw;
  } else if (dir == ConvDirection::kBackwardFilter) {
    direct *= kDirectBwdFilterNhwc;
  }
  return kFftMargin * fft < direct;
}

// ---- Dense and grouped FFT (fft_dense.cc) ---------------------------------------------------
// Units: one multiply-add of the dense direct kernel (the implicit GEMM, near the FMA roof).
//   fft = items * (ceil(Cin/16) + ceil(Cout/16)) * c(P,Q) * kDenseTransform     (stages A, C)
//       + ceil(filter planes/16) * c(P,Q) * kDenseTransform        (filter spectra, or dw's
//       inverse)
//       + items * K * G*Ci*Co8 * 4 * kDenseGemm           (a complex GEMM per frequency, stage B)
//       + batches * K * G*Ci*Co8 * 8 bytes * kDenseByte   (the filter spectra streamed per batch)
// with K = P * (Q/2 + 1) frequencies, items = N * tiles, Co8 = Co rounded up to 8, c(P,Q) the
// depthwise model's transform cost (above; in direct depthwise multiply-adds, each about
// kDenseTransform dense ones). Constants from same-run measurements (docs/design.md).
constexpr double kDenseTransform = 3.0;
constexpr double kDenseGemm = 1.5;
constexpr double kDenseByte = 0.5;
// Winograd F(4x4, 3x3) does 4x fewer multiplies than direct; its transforms take some back.
constexpr double kWinogradGain = 2.5;
// The spectra of one batch of items (fft_dense.cc's kBatchBytes) and the bound on the filter
// spectra (or bwd_filter's sums), which the plan must keep.
constexpr double kDenseBatchBytes = double(int64_t(32) << 20);
constexpr double kDenseSpectraBytes = double(int64_t(1) << 30);

struct DenseShape {
  int64_t in, out, G, Ci, Co;  // transformed input / output channels; per-group GEMM sides
};

DenseShape dense_shape(const ConvGeometry& g, ConvDirection dir) {
  if (dir == ConvDirection::kBackwardData)
    return {g.O, g.C, g.groups(), g.out_per_group(), g.in_per_group()};
  return {g.C, g.O, g.groups(), g.in_per_group(), g.out_per_group()};
}

double dense_spectra_bytes(const DenseShape& s, int64_t P, int64_t Q) {
  const int64_t co8 = (s.Co + 7) / 8 * 8;
  return double(P * (Q / 2 + 1)) * double(s.G * s.Ci * co8) * 8.0;
}

double dense_cost(const ConvGeometry& g, ConvDirection dir, int64_t P, int64_t Q, int64_t tiles) {
  const DenseShape s = dense_shape(g, dir);
  const double items = double(g.N * tiles), K = double(P * (Q / 2 + 1));
  const double co8 = double((s.Co + 7) / 8 * 8), gemm_cols = double(s.G * s.Ci) * co8;
  const double c = transform_cost(P, Q) * kDenseTransform;
  double planes = gemm_cols;  // the filter spectra; bwd_filter: the O * Ci8 planes of its sums
  if (dir == ConvDirection::kBackwardFilter)
    planes = double(g.O) * double((g.in_per_group() + 7) / 8 * 8);
  const double per_item = K * 2.0 * double(s.in + s.out + 48) * 4.0;
  const double batch = std::max(1.0, std::min(items, std::floor(kDenseBatchBytes / per_item)));
  return items * double((s.in + 15) / 16 + (s.out + 15) / 16) * c + std::ceil(planes / 16) * c +
         items * K * gemm_cols * 4.0 * kDenseGemm +
         std::ceil(items / batch) * K * gemm_cols * 8.0 * kDenseByte;
}

// The cheapest dense plan whose filter spectra stay under kDenseSpectraBytes (invalid if none).
FftPlan fft_dense_plan(const ConvGeometry& g, ConvDirection dir, double* cost) {
  int64_t U, V;
  fft_out_extent(g, dir, &U, &V);
  const int64_t KEh = effective_kernel(g.KH, g.p.dilation_h),
                KEw = effective_kernel(g.KW, g.p.dilation_w);
  const DenseShape s = dense_shape(g, dir);
  FftPlan best;
  double best_cost = 0;
  for (int64_t P : smooth_sizes()) {
    if (P < KEh) continue;
    const int64_t TH = std::min(U, P - KEh + 1);
    for (int64_t Q : smooth_sizes()) {
      if (Q < KEw) continue;
      const int64_t TW = std::min(V, Q - KEw + 1);
      if (dense_spectra_bytes(s, P, Q) <= kDenseSpectraBytes) {
        const int64_t tiles = ((U + TH - 1) / TH) * ((V + TW - 1) / TW);
        const double c = dense_cost(g, dir, P, Q, tiles);
        if (!best.valid() || c < best_cost) {
          best = {P, Q, TH, TW};
          best_cost = c;
        }
      }
      if (TW == V) break;
    }
    if (TH == U) break;
  }
  *cost = best_cost;
  return best;
}

bool fft_depthwise(const ConvGeometry& g) {
  return g.in_per_group() == 1 && g.out_per_group() == 1;
}

// Whether the dense FFT is cheaper than the direct kernel by the model, or than Winograd where
// Winograd's shape rule holds (3x3 stride 1: then the FFT must win by kWinogradGain more; the
// FFT measured up to 1.4x direct on 3x3 64 -> 64 @56, where Winograd F(4x4) runs).
bool fft_dense_pays(const ConvGeometry& g, double fft) {
  double direct =
      double(g.N) * double(g.O) * double(g.OH * g.OW) * double(g.in_per_group() * g.KH * g.KW);
  if (winograd_applicable(g)) direct /= kWinogradGain;
  return kFftMargin * fft < direct;
}

}  // namespace

const char* fft_inapplicable(const ConvGeometry& g, ConvDirection dir, bool float64) {
  if (float64) return "float64 runs the direct kernels only";
  if (g.p.stride_h != 1 || g.p.stride_w != 1) return "the FFT kernels need stride 1";
  double cost;
  if (!fft_depthwise(g) && !fft_dense_plan(g, dir, &cost).valid()) {
    if (effective_kernel(g.KH, g.p.dilation_h) > kFftMaxSide ||
        effective_kernel(g.KW, g.p.dilation_w) > kFftMaxSide)
      return "the dilated kernel is larger than the largest transform (128)";
    return "the filter spectra of this dense layer would exceed 1 GiB";
  }
  if (fft_depthwise(g) && !fft_plan(g, dir, &cost).valid())
    return "the dilated kernel is larger than the largest transform (128)";
  return nullptr;
}

AlgoChoice choose_conv_algo(const ConvGeometry& g, ConvDirection dir, bool float64, bool bfloat16) {
  AlgoChoice c;
  const ConvAlgo algo = conv_algo();
  if (algo == ConvAlgo::kDirect || algo == ConvAlgo::kInvalid) return c;
  const bool forced_fft = algo == ConvAlgo::kFft;
  if ((algo == ConvAlgo::kAuto || forced_fft) && !fft_inapplicable(g, dir, float64)) {
    double cost;
    const bool dense = !fft_depthwise(g);
    const FftPlan pl = dense ? fft_dense_plan(g, dir, &cost) : fft_plan(g, dir, &cost);
    if (forced_fft || (dense ? fft_dense_pays(g, cost) : fft_pays(g, dir, pl, cost))) {
      c.kind = AlgoChoice::kFft;
      c.fft = pl;
      return c;
    }
  }
  if (forced_fft || float64 || !winograd_applicable(g)) return c;
  // Winograd's correlation: forward x -> y (Cg -> Og onto OH x OW); bwd_data dy -> dx;
  // bwd_filter the forward's (its tiles are the forward's, its result the filter).
  const bool fwd = dir != ConvDirection::kBackwardData;
  const int tile =
      kernels().winograd_tile(algo, dir, g.N, fwd ? g.in_per_group() : g.out_per_group(),
                              fwd ? g.out_per_group() : g.in_per_group(), fwd ? g.OH : g.H,
                              fwd ? g.OW : g.W, bfloat16 && kernels().gemm_bf16_pairs != nullptr);
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
