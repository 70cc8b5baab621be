// CUDA max pooling: forward (values and int32 indices in one pass, or values only) and backward
// (a gather).
//
// Pooling does a few compares per byte, so it runs at memory speed or not at all. Three things
// get it there:
//   - Channel vectors in NHWC: a thread owns V consecutive channels of one output pixel
//     (V = 16 bytes / sizeof(T): 4 x float32, 8 x float16/bfloat16, 2 x float64) and moves them
//     with one 128-bit load or store when C is a multiple of V and the buffers are 16-byte
//     aligned; otherwise the same V lanes go element by element (the last vector of a pixel
//     then holds C % V channels). The window walk and its index math are shared by V lanes.
//     NCHW keeps one output per thread (V = 1): consecutive threads read consecutive ow.
//   - 32-bit index math: when every tensor has < 2^30 elements and every axis extent fits
//     (fits_int32 below), offsets are int32 and the divisions of the element decomposition and
//     of the window bounds use FastDivmod (fast_divmod.cuh, multiply-high + shift). Larger
//     tensors take the same kernel instantiated with int64 and plain division.
//   - No local memory: lanes are fixed-size arrays indexed by unrolled loops only.
//
// Forward: work item e in y's memory order (NCHW: one element, NHWC: one V-channel vector).
// Each item scans its window's in-bounds taps (window_taps) in row-major order and keeps the
// FIRST maximum; a NaN beats every number and the first NaN is kept. Index = h * W + w in the
// input plane; a window without in-bounds taps gives -inf and -1. Same rules as
// ffi/cpu/max_pool2d.cc. The kernel's kIndices = false instantiation is the values-only forward
// (max_pool2d without a gradient): the same scan and y, with the index lanes and their store
// compiled out (idx is null there and never touched).
//
// Backward: work item e in dx's memory order. It visits the outputs whose window holds (h, w)
// (covering_outputs / window_holds of geometry.h), in row-major output order, and sums dy where
// idx == h * W + w, in float32 for half types. No two threads write the same cell and the order
// of each sum is fixed: no atomics, bitwise reproducible, and the same order as the CPU kernel.
// Indices that do not point into their own window (which the forward never produces) receive
// nothing.
#pragma once

#include <limits>

#include "fast_divmod.cuh"
#include "kernel_common.cuh"

#if defined(__CUDACC__)
#define JAXCONV_POOL_UNROLL _Pragma("unroll")
#else
#define JAXCONV_POOL_UNROLL
#endif

namespace jaxconv::cuda {

template <typename Acc>
__device__ __forceinline__ bool is_nan(Acc v) {
  return v != v;
}

// N elements of E moved as one aligned unit (ld/st.global.v4 etc. for 16 bytes).
template <typename E, int N>
struct alignas(sizeof(E) * N) Pack {
  E v[N];
};

// Channels per thread in NHWC: one 16-byte vector.
template <typename T>
constexpr int pool_vector_width() {
  return int(16 / sizeof(T));
}

// Everything a pool kernel indexes with, in index type I, computed once on the host.
template <typename I>
struct PoolPlan {
  I H, W, C, OH, OW;
  I kernel_h, kernel_w, stride_h, stride_w, dil_h, dil_w, pad_top, pad_left;
  I items;   // work items: elements (NCHW) or channel vectors (NHWC) of y (forward) / dx (bwd)
  I groups;  // channel vectors per pixel, ceil(C / V) (NHWC; 1 in NCHW)
  int vec;   // 1: C % V == 0 and the buffers are 16-byte aligned: 128-bit loads and stores
  // Divisors of the item decomposition (innermost first) and of the window math.
  Divider<I> d0, d1, d2, div_stride_h, div_stride_w, div_dil_h, div_dil_w;
};

// Whether the 32-bit path covers this pooling: elements of x and y below 2^30, axes bounded.
inline bool pool_fits_int32(const PoolGeometry& g) {
  const int64_t limit = int64_t(1) << 30;
  const PoolParams& q = g.p;
  return g.N * g.C * g.H * g.W < limit && g.N * g.C * g.OH * g.OW < limit &&
         axis_fits_int32(g.H, g.OH, q.kernel_h, q.stride_h, q.dilation_h, q.pad_top,
                         q.pad_bottom) &&
         axis_fits_int32(g.W, g.OW, q.kernel_w, q.stride_w, q.dilation_w, q.pad_left, q.pad_right);
}

// backward: the items cover dx (spatial H x W) instead of y (OH x OW).
template <typename I, int V>
PoolPlan<I> make_pool_plan(const PoolGeometry& g, bool backward, bool buffers_aligned) {
  const PoolParams& q = g.p;
  PoolPlan<I> p;
  p.H = I(g.H);
  p.W = I(g.W);
  p.C = I(g.C);
  p.OH = I(g.OH);
  p.OW = I(g.OW);
  p.kernel_h = I(q.kernel_h);
  p.kernel_w = I(q.kernel_w);
  p.stride_h = I(q.stride_h);
  p.stride_w = I(q.stride_w);
  p.dil_h = I(q.dilation_h);
  p.dil_w = I(q.dilation_w);
  p.pad_top = I(q.pad_top);
  p.pad_left = I(q.pad_left);
  const int64_t rows = backward ? g.H : g.OH, cols = backward ? g.W : g.OW;
  const int64_t groups = q.layout == kNHWC ? (g.C + V - 1) / V : 1;
  p.groups = I(groups);
  p.items = I(g.N * rows * cols * (q.layout == kNHWC ? groups : g.C));
  p.vec = q.layout == kNHWC && g.C % V == 0 && buffers_aligned;
  if (q.layout == kNHWC) {  // e = ((n*rows + r)*cols + c)*groups + v
    p.d0 = Divider<I>(groups);
    p.d1 = Divider<I>(cols);
    p.d2 = Divider<I>(rows);
  } else {  // e = ((n*C + ch)*rows + r)*cols + c
    p.d0 = Divider<I>(cols);
    p.d1 = Divider<I>(rows);
    p.d2 = Divider<I>(g.C > 0 ? g.C : 1);
  }
  p.div_stride_h = Divider<I>(q.stride_h);
  p.div_stride_w = Divider<I>(q.stride_w);
  p.div_dil_h = Divider<I>(q.dilation_h);
  p.div_dil_w = Divider<I>(q.dilation_w);
  return p;
}

// An item's place: NCHW its plane n*C + channel; NHWC its image n, its pixel
// (n*rows + r)*cols + c and the first channel c0 of its vector; both the position (r, c).
template <typename I>
struct PoolItem {
  I plane_or_n, pixel, r, c, c0;
};

template <int kLayout, int V, typename I>
__device__ __forceinline__ PoolItem<I> split_item(const PoolPlan<I>& p, I e) {
  PoolItem<I> it;
  I rest;
  if constexpr (kLayout == kNHWC) {
    I v;
    it.pixel = p.d0.divmod(e, v);
    it.c0 = v * V;
    rest = p.d1.divmod(it.pixel, it.c);  // n*rows + r
    it.plane_or_n = p.d2.divmod(rest, it.r);
  } else {
    rest = p.d0.divmod(e, it.c);
    it.plane_or_n = p.d1.divmod(rest, it.r);  // n*C + channel
    it.pixel = e;
    it.c0 = 0;
  }
  return it;
}

// Loads `lanes` (<= V) consecutive elements into Acc lanes; one 128-bit load when `vec`.
template <typename T, int V>
__device__ __forceinline__ void load_lanes(const T* __restrict__ src, int lanes, int vec,
                                           typename Num<T>::acc (&out)[V]) {
  if (vec) {
    const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(src);
    JAXCONV_POOL_UNROLL
    for (int l = 0; l < V; ++l) out[l] = Num<T>::load(pk.v[l]);
  } else {
    JAXCONV_POOL_UNROLL
    for (int l = 0; l < V; ++l) out[l] = l < lanes ? Num<T>::load(src[l]) : typename Num<T>::acc(0);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_lanes(T* __restrict__ dst, int lanes, int vec,
                                            const typename Num<T>::acc (&in)[V]) {
  if (vec) {
    Pack<T, V> pk;
    JAXCONV_POOL_UNROLL
    for (int l = 0; l < V; ++l) pk.v[l] = Num<T>::store(in[l]);
    *reinterpret_cast<Pack<T, V>*>(dst) = pk;
  } else {
    JAXCONV_POOL_UNROLL
    for (int l = 0; l < V; ++l)
      if (l < lanes) dst[l] = Num<T>::store(in[l]);
  }
}

// int32 indices: V lanes as packs of up to four (16 bytes). With C % V == 0 each vector's
// offset is a multiple of V, so a pack of min(V, 4) is aligned to its size.
template <int V>
__device__ __forceinline__ void load_index_lanes(const int32_t* __restrict__ src, int lanes,
                                                 int vec, int32_t (&out)[V]) {
  constexpr int P = V < 4 ? V : 4;
  if (vec) {
    JAXCONV_POOL_UNROLL
    for (int j = 0; j < V; j += P) {
      const Pack<int32_t, P> pk = *reinterpret_cast<const Pack<int32_t, P>*>(src + j);
      JAXCONV_POOL_UNROLL
      for (int l = 0; l < P; ++l) out[j + l] = pk.v[l];
    }
  } else {
    JAXCONV_POOL_UNROLL
    for (int l = 0; l < V; ++l) out[l] = l < lanes ? src[l] : -1;
  }
}

template <int V>
__device__ __forceinline__ void store_index_lanes(int32_t* __restrict__ dst, int lanes, int vec,
                                                  const int32_t (&in)[V]) {
  constexpr int P = V < 4 ? V : 4;
  if (vec) {
    JAXCONV_POOL_UNROLL
    for (int j = 0; j < V; j += P) {
      Pack<int32_t, P> pk;
      JAXCONV_POOL_UNROLL
      for (int l = 0; l < P; ++l) pk.v[l] = in[j + l];
      *reinterpret_cast<Pack<int32_t, P>*>(dst + j) = pk;
    }
  } else {
    JAXCONV_POOL_UNROLL
    for (int l = 0; l < V; ++l)
      if (l < lanes) dst[l] = in[l];
  }
}

template <typename T, int kLayout, typename I, bool kIndices>
__global__ void __launch_bounds__(256, 1)
    max_pool_fwd_kernel(PoolPlan<I> p, const T* __restrict__ x, T* __restrict__ y,
                        int32_t* __restrict__ idx) {
  using Acc = typename Num<T>::acc;
  constexpr int V = kLayout == kNHWC ? pool_vector_width<T>() : 1;
  const I step = I(gridDim.x) * 256;
  for (I e = I(blockIdx.x) * 256 + I(threadIdx.x); e < p.items; e += step) {
    const PoolItem<I> it = split_item<kLayout, V>(p, e);
    const I oh = it.r, ow = it.c;
    const TapSpan<I> th =
        window_taps_div(oh, p.stride_h, p.pad_top, p.div_dil_h, p.dil_h, p.kernel_h, p.H);
    const TapSpan<I> tw =
        window_taps_div(ow, p.stride_w, p.pad_left, p.div_dil_w, p.dil_w, p.kernel_w, p.W);
    const I ih0 = oh * p.stride_h - p.pad_top, iw0 = ow * p.stride_w - p.pad_left;
    // Input plane base and the step between pixels: NCHW x[plane][ih][iw], NHWC
    // x[n][ih][iw][c0 + lane] with n = pixel / (OH * OW).
    const T* base;
    I pixel_step, y_off;
    int lanes = 1;
    if constexpr (kLayout == kNHWC) {
      base = x + it.plane_or_n * p.H * p.W * p.C + it.c0;
      pixel_step = p.C;
      y_off = it.pixel * p.C + it.c0;
      lanes = int(p.C - it.c0 < I(V) ? p.C - it.c0 : I(V));
    } else {
      base = x + it.plane_or_n * p.H * p.W;
      pixel_step = 1;
      y_off = e;
    }
    Acc best[V];
    int32_t arg[V];
    JAXCONV_POOL_UNROLL
    for (int l = 0; l < V; ++l) {
      best[l] = -std::numeric_limits<Acc>::infinity();
      arg[l] = -1;
    }
    bool first = true;
    for (I kh = th.lo; kh < th.hi; ++kh) {
      const I ih = ih0 + kh * p.dil_h;
      for (I kw = tw.lo; kw < tw.hi; ++kw) {
        const I iw = iw0 + kw * p.dil_w;
        const I cell = ih * p.W + iw;
        Acc v[V];
        load_lanes<T, V>(base + cell * pixel_step, lanes, p.vec, v);
        JAXCONV_POOL_UNROLL
        for (int l = 0; l < V; ++l) {
          if (first || v[l] > best[l] || (is_nan(v[l]) && !is_nan(best[l]))) {
            best[l] = v[l];
            // the plane has < 2^31 cells (make_pool_geometry)
            if constexpr (kIndices) arg[l] = int32_t(cell);
          }
        }
        first = false;
      }
    }
    store_lanes<T, V>(y + y_off, lanes, p.vec, best);
    if constexpr (kIndices) store_index_lanes<V>(idx + y_off, lanes, p.vec, arg);
  }
}

template <typename T, int kLayout, typename I>
__global__ void __launch_bounds__(256, 1)
    max_pool_bwd_kernel(PoolPlan<I> p, const T* __restrict__ dy, const int32_t* __restrict__ idx,
                        T* __restrict__ dx) {
  using Acc = typename Num<T>::acc;
  constexpr int V = kLayout == kNHWC ? pool_vector_width<T>() : 1;
  const I step = I(gridDim.x) * 256;
  for (I e = I(blockIdx.x) * 256 + I(threadIdx.x); e < p.items; e += step) {
    const PoolItem<I> it = split_item<kLayout, V>(p, e);
    const I h = it.r, w = it.c;
    const TapSpan<I> rh =
        covering_outputs_div(h, p.div_stride_h, p.stride_h, p.pad_top, p.dil_h, p.kernel_h, p.OH);
    const TapSpan<I> rw =
        covering_outputs_div(w, p.div_stride_w, p.stride_w, p.pad_left, p.dil_w, p.kernel_w, p.OW);
    const int32_t self = int32_t(h * p.W + w);
    // dy plane base and the step between its pixels, as in the forward.
    I base, pixel_step, dx_off;
    int lanes = 1;
    if constexpr (kLayout == kNHWC) {
      base = it.plane_or_n * p.OH * p.OW * p.C + it.c0;
      pixel_step = p.C;
      dx_off = it.pixel * p.C + it.c0;
      lanes = int(p.C - it.c0 < I(V) ? p.C - it.c0 : I(V));
    } else {
      base = it.plane_or_n * p.OH * p.OW;
      pixel_step = 1;
      dx_off = e;
    }
    Acc sum[V];
    JAXCONV_POOL_UNROLL
    for (int l = 0; l < V; ++l) sum[l] = Acc(0);
    for (I oh = rh.lo; oh < rh.hi; ++oh) {
      // window_holds: (h + pad - oh*s) is a multiple of d (non-negative for covering oh).
      if (p.div_dil_h.mod(h + p.pad_top - oh * p.stride_h) != 0) continue;
      for (I ow = rw.lo; ow < rw.hi; ++ow) {
        if (p.div_dil_w.mod(w + p.pad_left - ow * p.stride_w) != 0) continue;
        const I o = base + (oh * p.OW + ow) * pixel_step;
        int32_t hit[V];
        load_index_lanes<V>(idx + o, lanes, p.vec, hit);
        Acc g[V];
        load_lanes<T, V>(dy + o, lanes, p.vec, g);
        JAXCONV_POOL_UNROLL
        for (int l = 0; l < V; ++l)
          if (hit[l] == self) sum[l] += g[l];
      }
    }
    store_lanes<T, V>(dx + dx_off, lanes, p.vec, sum);
  }
}

// Host side: the layout and the index width pick the instantiation; kIndices = false is the
// values-only forward (idx null).
template <typename T, int kLayout, typename I, bool kIndices = true>
cudaError_t launch_pool_fwd(const PoolGeometry& g, const T* x, T* y, int32_t* idx,
                            cudaStream_t stream) {
  constexpr int V = kLayout == kNHWC ? pool_vector_width<T>() : 1;
  const bool aligned = aligned16(x) && aligned16(y) && (!kIndices || aligned16(idx));
  const PoolPlan<I> p = make_pool_plan<I, V>(g, false, aligned);
  return launch(max_pool_fwd_kernel<T, kLayout, I, kIndices>,
                dim3(grid_blocks(ceil_div_pos(int64_t(p.items), 256))), dim3(256), stream, p, x, y,
                idx);
}

template <typename T, int kLayout, typename I>
cudaError_t launch_pool_bwd(const PoolGeometry& g, const T* dy, const int32_t* idx, T* dx,
                            cudaStream_t stream) {
  constexpr int V = kLayout == kNHWC ? pool_vector_width<T>() : 1;
  const PoolPlan<I> p =
      make_pool_plan<I, V>(g, true, aligned16(dy) && aligned16(idx) && aligned16(dx));
  return launch(max_pool_bwd_kernel<T, kLayout, I>,
                dim3(grid_blocks(ceil_div_pos(int64_t(p.items), 256))), dim3(256), stream, p, dy,
                idx, dx);
}

template <typename T, bool kIndices>
cudaError_t max_pool2d_forward_as(const PoolGeometry& g, const T* x, T* y, int32_t* idx,
                                  cudaStream_t stream) {
  if (g.N * g.C * g.OH * g.OW == 0) return cudaSuccess;
  const bool small = pool_fits_int32(g);
  if (g.p.layout == kNHWC)
    return small ? launch_pool_fwd<T, kNHWC, int32_t, kIndices>(g, x, y, idx, stream)
                 : launch_pool_fwd<T, kNHWC, int64_t, kIndices>(g, x, y, idx, stream);
  return small ? launch_pool_fwd<T, kNCHW, int32_t, kIndices>(g, x, y, idx, stream)
               : launch_pool_fwd<T, kNCHW, int64_t, kIndices>(g, x, y, idx, stream);
}

// y and the int32 indices (the gradient's residual).
template <typename T>
cudaError_t max_pool2d_forward(const PoolGeometry& g, const T* x, T* y, int32_t* idx,
                               cudaStream_t stream) {
  return max_pool2d_forward_as<T, true>(g, x, y, idx, stream);
}

// y alone, bit for bit the y of max_pool2d_forward; no index bytes are written.
template <typename T>
cudaError_t max_pool2d_forward_values(const PoolGeometry& g, const T* x, T* y,
                                      cudaStream_t stream) {
  return max_pool2d_forward_as<T, false>(g, x, y, nullptr, stream);
}

template <typename T>
cudaError_t max_pool2d_backward(const PoolGeometry& g, const T* dy, const int32_t* idx, T* dx,
                                cudaStream_t stream) {
  if (g.N * g.C * g.H * g.W == 0) return cudaSuccess;
  const bool small = pool_fits_int32(g);
  if (g.p.layout == kNHWC)
    return small ? launch_pool_bwd<T, kNHWC, int32_t>(g, dy, idx, dx, stream)
                 : launch_pool_bwd<T, kNHWC, int64_t>(g, dy, idx, dx, stream);
  return small ? launch_pool_bwd<T, kNCHW, int32_t>(g, dy, idx, dx, stream)
               : launch_pool_bwd<T, kNCHW, int64_t>(g, dy, idx, dx, stream);
}

}  // namespace jaxconv::cuda
