// The CUDA convolution's algorithm choice between the direct kernels (depthwise_kernels.cuh,
// the implicit GEMMs) and the FFT kernels (fft_conv.cuh for depthwise, fft_conv_dense.cuh for
// dense and grouped layers), per call and direction. Host code
// only (no device code, no XLA header): conv2d.cu asks it before launching, and the emulation
// tests (tests/cuda_emulation/fft_kernels.cc) ask it the same question.
//
// Applicability is the CPU's (../fft_plan.h, fft_depthwise_inapplicable: depthwise, stride 1,
// not float64, all three directions) plus the GPU's own limit: a dilated kernel of at most
// kCudaFftMaxSide per axis (one 64 x 64 complex float transform is the block's 32 KiB of
// static shared memory). Dense / grouped (cuda_fft_dense_inapplicable): stride 1, not float64,
// the same kernel limit, and a workspace within kCudaFftDenseMaxWorkspace.
//
// The environment variable JAXCONV_CUDA_CONV_ALGO takes the values of the CPU's
// JAXCONV_CPU_CONV_ALGO, read on every call (a getenv is a short scan of the environment):
//   unset, "" or "auto"  the cost model below
//   "direct"             always the direct kernels
//   "winograd", "winograd2", "winograd4"  the direct kernels (CUDA has no Winograd; as on the
//                        CPU, forcing Winograd where it does not apply is not an error)
//   "fft"                FFT; a call it cannot run is an error naming why
// A separate variable, so that forcing one platform (e.g. the CPU in a test) never makes the
// other platform's calls fail.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../fft_plan.h"

namespace jaxconv::cuda {

// Largest transform side of the CUDA FFT kernel: P x Q float2 in static shared memory, at most
// 64 x 64 x 8 bytes = 32 KiB (CUDA allows 48 KiB of static shared memory per block).
inline constexpr int64_t kCudaFftMaxSide = 64;

enum class CudaConvAlgo { kAuto, kDirect, kFft, kInvalid };

inline constexpr char kCudaConvAlgoEnv[] = "JAXCONV_CUDA_CONV_ALGO";

inline CudaConvAlgo cuda_conv_algo() {
  const char* s = std::getenv(kCudaConvAlgoEnv);
  if (s == nullptr || s[0] == '\0' || std::strcmp(s, "auto") == 0) return CudaConvAlgo::kAuto;
  if (std::strcmp(s, "direct") == 0 || std::strcmp(s, "winograd") == 0 ||
      std::strcmp(s, "winograd2") == 0 || std::strcmp(s, "winograd4") == 0)
    return CudaConvAlgo::kDirect;
  if (std::strcmp(s, "fft") == 0) return CudaConvAlgo::kFft;
  return CudaConvAlgo::kInvalid;
}

// GPU cost model, in units of one direct depthwise multiply-add (a tap of the direct kernel: an
// FMA and an L1/shared load). ESTIMATES, not measured: no GPU has timed either kernel yet
// (docs/design.md, "FFT convolution (CUDA)"). The same for the three directions (each runs two
// transforms per tile and image against the direct kernel's one multiply-add per tap and
// position). Per tile the kernel runs two radix-2 2-d
// transforms of P*Q points, log2(P*Q) stages each, every point taking part in half a butterfly
// per stage (a complex multiply-add on shared memory, about 4 units), and per point a load, the
// pointwise product, a store (about 20 units).
inline constexpr double kCudaFftStage = 8.0;   // both transforms, per point and stage
inline constexpr double kCudaFftPoint = 20.0;  // loads, pointwise product, store, per point
// The FFT must win by this factor before auto takes it (the model's error margin).
inline constexpr double kCudaFftMargin = 1.5;

inline double cuda_fft_transform_cost(int64_t P, int64_t Q) {
  const double pq = double(P * Q);
  return pq * (kCudaFftStage * std::log2(pq) + kCudaFftPoint);
}

inline const std::vector<int64_t>& cuda_fft_sizes() {
  static const std::vector<int64_t> sizes = fft_sizes(kCudaFftMaxSide, {2});
  return sizes;
}

// The cheapest power-of-two plan (invalid when the dilated kernel exceeds kCudaFftMaxSide).
inline FftPlan cuda_fft_plan(const ConvGeometry& g, ConvDirection dir, double* cost) {
  int64_t U, V;
  fft_out_extent(g, dir, &U, &V);
  return best_fft_plan(U, V, effective_kernel(g.KH, g.p.dilation_h),
                       effective_kernel(g.KW, g.p.dilation_w), cuda_fft_sizes(),
                       cuda_fft_transform_cost, cost);
}

// Why the CUDA FFT kernel cannot run this call, or nullptr when it can.
inline const char* cuda_fft_inapplicable(const ConvGeometry& g, ConvDirection dir, bool float64) {
  if (const char* why = fft_depthwise_inapplicable(g, float64)) return why;
  double cost;
  if (!cuda_fft_plan(g, dir, &cost).valid())
    return "the dilated kernel is larger than the largest CUDA transform (64)";
  return nullptr;
}

// Whether the FFT is cheaper than the direct kernel by the (estimated) model.
inline bool cuda_fft_pays(const ConvGeometry& g, double plan_cost) {
  const double fft = double(g.N) * double(g.C) * plan_cost;
  const double direct = double(g.N) * double(g.C) * double(g.OH * g.OW) * double(g.KH * g.KW);
  return kCudaFftMargin * fft < direct;
}

// Device memory the FFT bwd_filter needs (forward and bwd_data need none): the per-tile tap
// sums, float32, tiles * C * KH * KW of them (independent of the batch: each block sums its
// images in place).
inline int64_t cuda_fft_workspace_bytes(const ConvGeometry& g, ConvDirection dir,
                                        const FftPlan& pl) {
  if (dir != ConvDirection::kBackwardFilter || !pl.valid()) return 0;
  return pl.tiles(g.OH, g.OW) * g.C * g.KH * g.KW * int64_t(sizeof(float));
}

// ---- Dense and grouped FFT (fft_conv_dense.cuh): all three directions, stride 1 ---------------
//
// Per direction the GEMM's "data" channels (transformed tiles) and "result" channels (inverse
// transformed): forward x (C) -> y (O), bwd_data dy (O) -> dx (C); the reduction per frequency
// runs over the data channels of one group. bwd_filter: data x (C), result dy (O), the
// reduction over the rows m, the output (O, C/groups) filter planes.
struct CudaDenseChannels {
  int64_t data, result, data_per_group, result_per_group;
};
inline CudaDenseChannels cuda_dense_channels(const ConvGeometry& g, ConvDirection dir) {
  if (dir == ConvDirection::kBackwardData) return {g.O, g.C, g.out_per_group(), g.in_per_group()};
  return {g.C, g.O, g.in_per_group(), g.out_per_group()};
}

// The workspace of the dense FFT, one device allocation from XLA: a 256-byte head (the
// non-finite flag, an int), then three complex float arrays, each 256-byte aligned:
//   X[f][m][cd]         data spectra, m = n * tiles + tile, cd the data channel
//   Wf[f][cr][cd_local] filter spectra (conjugated, scaled by 1 / PQ)
//   Y[f][m][cr]         result spectra (bwd_filter: dy's tiles' spectra)
// (bwd_filter: Wf holds the summed S[f][o][cl], the same size.)
// over the half spectrum f = k1 * (Q/2 + 1) + k2, k2 <= Q/2 (the rest is Hermitian).
struct CudaDenseWorkspace {
  int64_t freqs = 0, rows = 0;  // F = P * (Q/2 + 1), M = N * tiles
  int64_t x_off = 0, w_off = 0, y_off = 0, bytes = 0;
};
inline CudaDenseWorkspace cuda_dense_workspace(const ConvGeometry& g, ConvDirection dir,
                                               const FftPlan& pl) {
  CudaDenseWorkspace w;
  if (!pl.valid()) return w;
  int64_t U, V;
  fft_out_extent(g, dir, &U, &V);
  const CudaDenseChannels ch = cuda_dense_channels(g, dir);
  const auto align = [](int64_t b) { return (b + 255) / 256 * 256; };
  const int64_t c8 = 8;  // sizeof(float2)
  w.freqs = pl.P * (pl.Q / 2 + 1);
  w.rows = g.N * pl.tiles(U, V);
  w.x_off = 256;
  w.w_off = w.x_off + align(w.freqs * w.rows * ch.data * c8);
  w.y_off = w.w_off + align(w.freqs * ch.result * ch.data_per_group * c8);
  w.bytes = w.y_off + align(w.freqs * w.rows * ch.result * c8);
  return w;
}

// Above this the dense FFT is not planned (auto runs direct; forced is an error): the three
// spectra arrays grow with N * C * tiles * PQ and with C * C / groups * PQ.
inline constexpr int64_t kCudaFftDenseMaxWorkspace = int64_t(512) << 20;

// Dense cost model, in seconds. UNCALIBRATED: no GPU has timed the dense FFT or the direct
// kernels against it; the rates are guesses for an H100-class card, chosen so that the model
// takes FFT only far from the break-even point (docs/design.md, "Dense FFT convolution (CUDA)").
//   direct: 2 N O (C/g) OH OW KH KW flops at the implicit GEMM's effective (tensor-core) rate;
//   FFT: 5 PQ log2(PQ) flops per 2-d transform (shared-memory radix-2, SIMT) over the
//   N * tiles * (data + result) planes and the result * data_per_group filters; the
//   per-frequency complex GEMM, 8 flops per complex multiply-add, at a SIMT rate; the workspace
//   written and read once each at memory bandwidth; a fixed cost for the launches.
inline constexpr double kCudaDenseDirectRate = 100e12;   // flop/s
inline constexpr double kCudaDenseTransformRate = 8e12;  // flop/s
inline constexpr double kCudaDenseGemmRate = 25e12;      // flop/s
inline constexpr double kCudaDenseBandwidth = 2.5e12;    // byte/s
inline constexpr double kCudaDenseLaunches = 5 * 4e-6;   // s
// The FFT must win by this factor before auto takes it. Smaller than the depthwise margin: with
// the filter transforms (result * data_per_group planes) in the cost, the model already leans
// towards direct at small batches.
inline constexpr double kCudaFftDenseMargin = 1.25;

inline double cuda_dense_direct_cost(const ConvGeometry& g) {
  return 2.0 * double(g.N) * double(g.O) * double(g.in_per_group()) * double(g.OH * g.OW) *
         double(g.KH * g.KW) / kCudaDenseDirectRate;
}

inline double cuda_dense_fft_cost(const ConvGeometry& g, ConvDirection dir, const FftPlan& pl) {
  const CudaDenseChannels ch = cuda_dense_channels(g, dir);
  const CudaDenseWorkspace w = cuda_dense_workspace(g, dir, pl);
  const double pq = double(pl.P * pl.Q);
  const double planes =
      double(w.rows) * double(ch.data + ch.result) + double(ch.result * ch.data_per_group);
  const double transforms = planes * 5.0 * pq * std::log2(pq) / kCudaDenseTransformRate;
  const double gemm = 8.0 * double(w.freqs) * double(w.rows) * double(ch.result) *
                      double(ch.data_per_group) / kCudaDenseGemmRate;
  return transforms + gemm + 2.0 * double(w.bytes) / kCudaDenseBandwidth + kCudaDenseLaunches;
}

// The cheapest power-of-two plan whose workspace is within kCudaFftDenseMaxWorkspace (invalid:
// none is; *kernel_fits tells whether the dilated kernel fits a transform at all).
inline FftPlan cuda_fft_dense_plan(const ConvGeometry& g, ConvDirection dir, double* cost,
                                   bool* kernel_fits) {
  int64_t U, V;
  fft_out_extent(g, dir, &U, &V);
  const int64_t KEh = effective_kernel(g.KH, g.p.dilation_h);
  const int64_t KEw = effective_kernel(g.KW, g.p.dilation_w);
  FftPlan best;
  *kernel_fits = false;
  *cost = 0;
  for (int64_t P : cuda_fft_sizes()) {
    if (P < KEh) continue;
    for (int64_t Q : cuda_fft_sizes()) {
      if (Q < KEw) continue;
      *kernel_fits = true;
      const FftPlan pl{P, Q, U < P - KEh + 1 ? U : P - KEh + 1, V < Q - KEw + 1 ? V : Q - KEw + 1};
      if (cuda_dense_workspace(g, dir, pl).bytes > kCudaFftDenseMaxWorkspace) continue;
      const double c = cuda_dense_fft_cost(g, dir, pl);
      if (!best.valid() || c < *cost) {
        best = pl;
        *cost = c;
      }
    }
  }
  return best;
}

// Why the dense FFT cannot run this call, or nullptr when it can (with a plan).
inline const char* cuda_fft_dense_inapplicable(const ConvGeometry& g, ConvDirection dir,
                                               bool float64) {
  if (float64) return "float64 runs the direct kernels only";
  if (g.p.stride_h != 1 || g.p.stride_w != 1) return "the FFT kernels need stride 1";
  double cost;
  bool fits;
  const FftPlan pl = cuda_fft_dense_plan(g, dir, &cost, &fits);
  if (!fits) return "the dilated kernel is larger than the largest CUDA transform (64)";
  if (!pl.valid())
    return "the dense FFT workspace would exceed its bound of 512 MiB for every transform size";
  return nullptr;
}

struct CudaAlgoChoice {
  FftPlan fft;         // valid: run the FFT kernel with this plan; else the direct kernels
  bool dense = false;  // fft valid: the dense / grouped FFT (fft_conv_dense.cuh), else depthwise
  int64_t workspace_bytes = 0;  // dense: cuda_dense_workspace(...).bytes
  std::string error;            // non-empty: the handler fails the call with this message
};

// The algorithm of this call under JAXCONV_CUDA_CONV_ALGO (read here): depthwise calls by the
// depthwise model, the others (dense, grouped, channel multiplier) by the dense one. Non-finite
// operands are found by the FFT kernels themselves, which then compute directly (the depthwise
// kernel the affected tiles, the dense kernels the whole call).
inline CudaAlgoChoice choose_cuda_conv_algo(const ConvGeometry& g, ConvDirection dir,
                                            bool float64) {
  CudaAlgoChoice c;
  const CudaConvAlgo algo = cuda_conv_algo();
  if (algo == CudaConvAlgo::kInvalid) {
    c.error = std::string("environment variable ") + kCudaConvAlgoEnv + "='" +
              std::getenv(kCudaConvAlgoEnv) +
              "' is not one of auto, direct, winograd, winograd2, winograd4, fft";
    return c;
  }
  if (algo == CudaConvAlgo::kDirect) return c;
  if (g.in_per_group() != 1 || g.out_per_group() != 1) {  // dense or grouped
    if (const char* why = cuda_fft_dense_inapplicable(g, dir, float64)) {
      if (algo == CudaConvAlgo::kFft)
        c.error = std::string(kCudaConvAlgoEnv) + "=fft cannot run this call: " + why;
      return c;
    }
    double cost;
    bool fits;
    const FftPlan pl = cuda_fft_dense_plan(g, dir, &cost, &fits);
    if (algo == CudaConvAlgo::kFft || kCudaFftDenseMargin * cost < cuda_dense_direct_cost(g)) {
      c.fft = pl;
      c.dense = true;
      c.workspace_bytes = cuda_dense_workspace(g, dir, pl).bytes;
    }
    return c;
  }
  if (const char* why = cuda_fft_inapplicable(g, dir, float64)) {
    if (algo == CudaConvAlgo::kFft)
      c.error = std::string(kCudaConvAlgoEnv) + "=fft cannot run this call: " + why;
    return c;
  }
  double cost;
  const FftPlan pl = cuda_fft_plan(g, dir, &cost);
  if (algo == CudaConvAlgo::kFft || cuda_fft_pays(g, cost)) c.fft = pl;
  return c;
}

}  // namespace jaxconv::cuda
