// The CUDA convolution's algorithm choice between the direct depthwise kernels
// (depthwise_kernels.cuh) and the FFT kernel (fft_conv.cuh), per call and direction. Host code
// only (no device code, no XLA header): conv2d.cu asks it before launching, and the emulation
// tests (tests/cuda_emulation/fft_kernels.cc) ask it the same question.
//
// Applicability is the CPU's (../fft_plan.h, fft_depthwise_inapplicable: depthwise, stride 1,
// not float64, all three directions) plus the GPU's own limit: a dilated kernel of at most
// kCudaFftMaxSide per axis (one 64 x 64 complex float transform is the block's 32 KiB of
// static shared memory).
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

struct CudaAlgoChoice {
  FftPlan fft;        // valid: run the FFT kernel with this plan; else the direct kernels
  std::string error;  // non-empty: the handler fails the call with this message
};

// The algorithm of this call under JAXCONV_CUDA_CONV_ALGO (read here). Only meaningful where
// the direct depthwise kernels would run (conv_takes_direct_kernels); non-finite operands are
// found by the FFT kernel itself, which then computes the affected tiles directly.
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
