// CUDA max pooling: forward (values and int32 indices in one pass) and backward (a gather).
//
// Forward: one thread per output element, threads in y's memory order, so writes are
// coalesced and reads too along the contiguous axis (ow in NCHW, channels in NHWC). Each thread
// scans its window's in-bounds taps (window_taps) in row-major order and keeps the FIRST
// maximum; a NaN beats every number and the first NaN is kept. Index = h * W + w in the input
// plane; a window without in-bounds taps gives -inf and -1. Same rules as ffi/cpu/max_pool2d.cc.
//
// Backward: one thread per dx element (n, c, h, w), threads in dx's memory order. It visits the
// outputs whose window holds (h, w) (covering_outputs / window_holds in geometry.h), in
// row-major output order, and sums dy where idx == h * W + w, in float32 for half types. No two
// threads write the same cell and the order of the sum is fixed: no atomics, bitwise
// reproducible, and the same order as the CPU kernel. Indices that do not point into their own
// window (which the forward never produces) receive nothing.
#pragma once

#include <limits>

#include "kernel_common.cuh"

namespace jaxconv::cuda {

template <typename Acc>
__device__ __forceinline__ bool is_nan(Acc v) {
  return v != v;
}

template <typename T>
__global__ void __launch_bounds__(256)
    max_pool_fwd_kernel(PoolGeometry g, int64_t total, const T* __restrict__ x,
                        T* __restrict__ y, int32_t* __restrict__ idx) {
  using Acc = typename Num<T>::acc;
  const PoolParams& q = g.p;
  const Strides4 xs = g.x_strides();
  const int64_t stride = int64_t(gridDim.x) * 256;
  for (int64_t e = int64_t(blockIdx.x) * 256 + threadIdx.x; e < total; e += stride) {
    // e is y's offset: NCHW ((n*C + c)*OH + oh)*OW + ow, NHWC ((n*OH + oh)*OW + ow)*C + c.
    int64_t n, c, oh, ow, rest;
    if (q.layout == kNHWC) {
      c = e % g.C;
      rest = e / g.C;
      ow = rest % g.OW;
      rest /= g.OW;
      oh = rest % g.OH;
      n = rest / g.OH;
    } else {
      ow = e % g.OW;
      rest = e / g.OW;
      oh = rest % g.OH;
      rest /= g.OH;
      c = rest % g.C;
      n = rest / g.C;
    }
    const TapRange th = window_taps(oh, q.stride_h, q.pad_top, q.dilation_h, q.kernel_h, g.H);
    const TapRange tw = window_taps(ow, q.stride_w, q.pad_left, q.dilation_w, q.kernel_w, g.W);
    const int64_t ih0 = oh * q.stride_h - q.pad_top, iw0 = ow * q.stride_w - q.pad_left;
    const T* plane = x + n * xs.n + c * xs.c;
    Acc best = Acc(0);
    int64_t arg = -1;
    for (int64_t kh = th.lo; kh < th.hi; ++kh) {
      const int64_t ih = ih0 + kh * q.dilation_h;
      for (int64_t kw = tw.lo; kw < tw.hi; ++kw) {
        const int64_t iw = iw0 + kw * q.dilation_w;
        const Acc v = Num<T>::load(plane[ih * xs.h + iw * xs.w]);
        if (arg < 0 || v > best || (is_nan(v) && !is_nan(best))) {
          best = v;
          arg = ih * g.W + iw;
        }
      }
    }
    y[e] = Num<T>::store(arg >= 0 ? best : -std::numeric_limits<Acc>::infinity());
    idx[e] = int32_t(arg);  // the plane has < 2^31 cells (make_pool_geometry checks it)
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    max_pool_bwd_kernel(PoolGeometry g, int64_t total, const T* __restrict__ dy,
                        const int32_t* __restrict__ idx, T* __restrict__ dx) {
  using Acc = typename Num<T>::acc;
  const PoolParams& q = g.p;
  const Strides4 ys = g.y_strides();
  const int64_t stride = int64_t(gridDim.x) * 256;
  for (int64_t e = int64_t(blockIdx.x) * 256 + threadIdx.x; e < total; e += stride) {
    // e is dx's offset: NCHW ((n*C + c)*H + h)*W + w, NHWC ((n*H + h)*W + w)*C + c.
    int64_t n, c, h, w, rest;
    if (q.layout == kNHWC) {
      c = e % g.C;
      rest = e / g.C;
      w = rest % g.W;
      rest /= g.W;
      h = rest % g.H;
      n = rest / g.H;
    } else {
      w = e % g.W;
      rest = e / g.W;
      h = rest % g.H;
      rest /= g.H;
      c = rest % g.C;
      n = rest / g.C;
    }
    const OutputRange rh =
        covering_outputs(h, q.stride_h, q.pad_top, q.dilation_h, q.kernel_h, g.OH);
    const OutputRange rw =
        covering_outputs(w, q.stride_w, q.pad_left, q.dilation_w, q.kernel_w, g.OW);
    const int32_t self = int32_t(h * g.W + w);
    const int64_t base = n * ys.n + c * ys.c;
    Acc sum = Acc(0);
    for (int64_t oh = rh.lo; oh < rh.hi; ++oh) {
      if (!window_holds(oh, h, q.stride_h, q.pad_top, q.dilation_h)) continue;
      for (int64_t ow = rw.lo; ow < rw.hi; ++ow) {
        if (!window_holds(ow, w, q.stride_w, q.pad_left, q.dilation_w)) continue;
        const int64_t o = base + oh * ys.h + ow * ys.w;
        if (idx[o] == self) sum += Num<T>::load(dy[o]);
      }
    }
    dx[e] = Num<T>::store(sum);
  }
}

template <typename T>
cudaError_t max_pool2d_forward(const PoolGeometry& g, const T* x, T* y, int32_t* idx,
                               cudaStream_t stream) {
  const int64_t total = g.N * g.C * g.OH * g.OW;
  if (total == 0) return cudaSuccess;
  return launch(max_pool_fwd_kernel<T>, dim3(grid_blocks(ceil_div_pos(total, 256))), dim3(256),
                stream, g, total, x, y, idx);
}

template <typename T>
cudaError_t max_pool2d_backward(const PoolGeometry& g, const T* dy, const int32_t* idx, T* dx,
                                cudaStream_t stream) {
  const int64_t total = g.N * g.C * g.H * g.W;
  if (total == 0) return cudaSuccess;
  return launch(max_pool_bwd_kernel<T>, dim3(grid_blocks(ceil_div_pos(total, 256))), dim3(256),
                stream, g, total, dy, idx, dx);
}

}  // namespace jaxconv::cuda
