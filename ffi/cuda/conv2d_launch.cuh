// Host side of the conv implicit GEMMs (level 4 of the conv headers; see conv2d_kernels.cuh):
// the pass launchers (forward, bwd_data) and bwd_filter's FilterLauncher, which take the kernel
// and tile from conv2d_plan.cuh's selection and launch the SIMT (conv2d_simt.cuh) or tensor-core
// (conv2d_mma.cuh) kernels. Here, not in the handlers, so that the host emulation in tests runs
// exactly the same code.
#pragma once

#include <cstdint>

#include "conv2d_problem.cuh"
#include "conv2d_simt.cuh"
#include "conv2d_plan.cuh"
#include "split_reduce.cuh"
// After conv2d_problem.cuh: the tensor-core kernels read PassParams, FilterParams and the
// tile helpers it defines.
#include "conv2d_mma.cuh"

namespace jaxconv::cuda {

template <typename T, typename Cfg>
cudaError_t launch_pass(PassParams p, const T* in, const T* w, const T* bias, T* out,
                        cudaStream_t stream) {
  p.m_tiles = ceil_div_pos(p.M, Cfg::BM);
  p.n_tiles = ceil_div_pos(p.Cout, Cfg::BN);
  p.tiles = p.phases_h * p.phases_w * p.G * p.n_tiles * p.m_tiles;
  if (p.tiles == 0) return cudaSuccess;
  void (*kernel)(PassParams, const T*, const T*, const T*, T*);
  if (p.layout == kNHWC)
    kernel = p.w_co == 1 ? conv_pass_kernel<T, Cfg, kNHWC, true>
                         : conv_pass_kernel<T, Cfg, kNHWC, false>;
  else
    kernel = conv_pass_kernel<T, Cfg, kNCHW, false>;
  return launch(kernel, dim3(grid_blocks(p.tiles)), dim3(Cfg::kThreads), stream, p, in, w, bias,
                out);
}

template <typename T>
cudaError_t run_pass(const PassParams& p, const T* in, const T* w, const T* bias, T* out,
                     const PassOptions& opts, cudaStream_t stream) {
  if (p.M == 0) return cudaSuccess;
  if constexpr (sizeof(T) <= 4) {  // float64 has no tensor-core path
    switch (choose_pass_kernel<T>(p, opts)) {
      case PassKernel::kMmaLarge:
        return launch_pass_mma<T, MmaLargeTile>(p, in, w, bias, out, mma_index32(p), stream);
      case PassKernel::kMmaSmall:
        return launch_pass_mma<T, MmaSmallTile>(p, in, w, bias, out, mma_index32(p), stream);
      default: break;
    }
  }
  switch (choose_pass_kernel<T>(p, opts)) {
    case PassKernel::kSimtTall: return launch_pass<T, TallTile>(p, in, w, bias, out, stream);
    default: break;
  }
  return launch_pass<T, WideTile>(p, in, w, bias, out, stream);
}

// y = conv(x, w) + bias (bias may be null)
template <typename T>
cudaError_t conv2d_forward(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y,
                           cudaStream_t stream, const PassOptions& opts = {}) {
  return run_pass(forward_pass(g), x, w, bias, y, opts, stream);
}

// dx = conv_transpose(dy, w) + bias (bias over dx channels, may be null)
template <typename T>
cudaError_t conv2d_backward_data(const ConvGeometry& g, const T* dy, const T* w, const T* bias,
                                 T* dx, cudaStream_t stream, const PassOptions& opts = {}) {
  return run_pass(bwd_data_pass(g), dy, w, bias, dx, opts, stream);
}

template <typename T>
struct FilterLauncher {
  using Acc = typename Num<T>::acc;
  FilterParams p;
  FilterKernel kind;
  bool index32;  // tensor-core kernels: int32 offsets (mma_index32)

  explicit FilterLauncher(const ConvGeometry& g, const PassOptions& opts = {})
      : p(filter_params(g)), kind(choose_filter_kernel<T>(p, opts)), index32(mma_index32(p)) {
    plan();
  }
  // Tests: this kernel whatever the shape, and int64 offsets even where int32 would do.
  FilterLauncher(const ConvGeometry& g, FilterKernel forced, bool force_int64 = false)
      : p(filter_params(g)), kind(forced), index32(!force_int64 && mma_index32(p)) {
    plan();
  }

  int64_t workspace_bytes() const {
    return p.P > 0 && p.splits > 1 ? p.splits * p.dw_elems * int64_t(sizeof(Acc)) : 0;
  }

  // Expects p.P > 0 (the caller zeroes dw for an empty reduction) and, when splits > 1, a
  // workspace of workspace_bytes().
  cudaError_t run(const T* x, const T* dy, T* dw, Acc* workspace, cudaStream_t stream) const {
    // No workspace where the plan needs one: refuse (the handler reports the failed allocation
    // before getting here) rather than write partial sums through a null pointer.
    if (workspace == nullptr && workspace_bytes() > 0) return cudaErrorInvalidValue;
    cudaError_t err = launch_kernel(x, dy, dw, workspace, stream);
    if (err != cudaSuccess || p.splits == 1) return err;
    return launch(sum_partials_kernel<T>, dim3(grid_blocks(ceil_div_pos(p.dw_elems, 256))),
                  dim3(256), stream, static_cast<const Acc*>(workspace), p.splits, p.dw_elems, dw);
  }

 private:
  static constexpr bool kMmaType = sizeof(T) <= 4;  // float64 has no tensor-core path

  void plan() {
    if (p.P == 0) return;
    // Positions per step of the tensor-core kernels: one stage of kMmaRowBytes.
    const int64_t mma_bk = kMmaRowBytes / (sizeof(T) == 2 ? 2 : 4);
    switch (kind) {
      case FilterKernel::kSimtSmall:
        return plan_filter(&p, sizeof(Acc), SmallFilterTile::BM, SmallFilterTile::BN,
                           SmallFilterTile::BK);
      case FilterKernel::kMmaLarge:
        return plan_filter(&p, sizeof(Acc), MmaLargeTile::BM, MmaLargeTile::BN, mma_bk);
      case FilterKernel::kMmaSmall:
        return plan_filter(&p, sizeof(Acc), MmaSmallTile::BM, MmaSmallTile::BN, mma_bk);
      default: return plan_filter(&p, sizeof(Acc), FilterTile::BM, FilterTile::BN, FilterTile::BK);
    }
  }

  cudaError_t launch_kernel(const T* x, const T* dy, T* dw, Acc* workspace,
                            cudaStream_t stream) const {
    if constexpr (kMmaType) {
      if (kind == FilterKernel::kMmaLarge)
        return launch_filter_mma<T, MmaLargeTile>(p, x, dy, dw, workspace, index32, stream);
      if (kind == FilterKernel::kMmaSmall)
        return launch_filter_mma<T, MmaSmallTile>(p, x, dy, dw, workspace, index32, stream);
    } else {
      if (kind == FilterKernel::kMmaLarge || kind == FilterKernel::kMmaSmall)
        return cudaErrorInvalidValue;
    }
    void (*kernel)(FilterParams, const T*, const T*, T*, Acc*);
    int threads;
    if (kind == FilterKernel::kSimtSmall) {
      kernel = p.layout == kNHWC ? conv_filter_kernel<T, SmallFilterTile, kNHWC>
                                 : conv_filter_kernel<T, SmallFilterTile, kNCHW>;
      threads = SmallFilterTile::kThreads;
    } else {
      kernel = p.layout == kNHWC ? conv_filter_kernel<T, FilterTile, kNHWC>
                                 : conv_filter_kernel<T, FilterTile, kNCHW>;
      threads = FilterTile::kThreads;
    }
    return launch(kernel, dim3(grid_blocks(p.tiles)), dim3(threads), stream, p, x, dy, dw,
                  workspace);
  }
};

}  // namespace jaxconv::cuda
