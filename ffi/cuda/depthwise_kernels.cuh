// CUDA direct convolution kernels for layers the implicit GEMM serves badly: depthwise
// (groups == C, any channel multiplier M = O / C) and few-channel inputs (C <= 4: image stems,
// LeNet). Forward, bwd_data and bwd_filter, both layouts, every dtype (float32 accumulation
// for half types, double for float64).
//
// Both cases have at most 4 input channels per group (Cg = C / groups), so a GEMM's reduction
// (Cg * KH * KW) is short and, in depthwise layers, its N side (Og = O / groups) is 1-few
// columns of a 16-64 wide tile. Computing each output directly wastes nothing:
//
//   forward    y[n, o, oh, ow]  = bias[o] + sum over ci < Cg, in-bounds taps (kh, kw) of
//                                 x[n, g*Cg + ci, oh*s - pad + kh*d, ...] * w[o, ci, kh, kw],
//                                 g = o / Og. One thread per y element, in y's memory order.
//   bwd_data   dx[n, c, h, w]   = bias_dx[c] + sum over taps (kh, kw) whose output
//                                 oh = (h + pad - kh*d) / s is exact and in range, and over the
//                                 Og outputs o of group g = c / Cg, of dy[n, o, oh, ow] *
//                                 w[o, c % Cg, kh, kw]. One thread per dx element.
//   bwd_filter dw[o, ci, kh, kw] = sum over positions p = (n, oh, ow) with an in-bounds tap of
//                                 x[n, g*Cg + ci, ih, iw] * dy[n, o, oh, ow]. A block of 256
//                                 threads reduces channel_lanes weights at once: NHWC up to 32
//                                 consecutive o (coalesced along channels), NCHW one (the
//                                 position lanes then read consecutive ow), over one split of
//                                 the positions: plan_direct_filter cuts P = N*OH*OW into
//                                 `splits` chunks, a function of the shape only, so that the
//                                 launch reaches kFilterSplitTargetBlocks blocks (4 per SM of
//                                 an H100; a 32-channel 3x3 depthwise layer has only 9 weight
//                                 items, each a reduction over N*OH*OW positions). Position lane
//                                 pl sums p = begin + pl, begin + pl + PL, ... of its split in
//                                 order, then a shared-memory tree halves the lanes; with
//                                 splits > 1 each block stores its partial sum and
//                                 split_reduce.cuh's sum_partials_kernel adds the splits in
//                                 order. The order of every sum depends on the shape only
//                                 (bitwise deterministic, no atomics).
//
// Index math: int32 with FastDivmod (fast_divmod.cuh) when every tensor has < 2^30 elements
// and the axes fit, else int64 with plain division (the same kernels instantiated twice). The
// window bounds are geometry.h's window_taps in that width (window_taps_div, tested against
// brute force).
#pragma once

#include <cstdint>

#include "fast_divmod.cuh"
#include "kernel_common.cuh"
#include "split_reduce.cuh"

namespace jaxconv::cuda {

// Which convolutions take the direct kernels: depthwise (one input channel per group) and
// inputs of at most 4 channels.
inline bool direct_conv_applies(const ConvGeometry& g) { return g.groups() == g.C || g.C <= 4; }

template <typename I>
struct Strides4I {
  I n, c, h, w;
};

template <typename I>
Strides4I<I> strides_as(Strides4 s) {
  return {I(s.n), I(s.c), I(s.h), I(s.w)};
}

template <typename I>
struct DirectPlan {
  I N, C, H, W, O, OH, OW, KH, KW, Cg, Og;
  I stride_h, stride_w, dil_h, dil_w, pad_top, pad_left;
  I items;  // forward: y elements; bwd_data: dx elements; bwd_filter: blocks (filter_items*splits)
  Strides4I<I> xs, ys, ws;  // x, y addressed (n, c, h, w); w addressed (o, ci, kh, kw)
  // Item e = ((rest*r2 + a2)*r1 + a1)*r0 + a0, radices r0, r1, r2 by layout (see each kernel).
  Divider<I> d0, d1, d2;
  Divider<I> div_og, div_cg, div_stride_h, div_stride_w, div_dil_h, div_dil_w;
  I channel_lanes, o_tiles;  // bwd_filter
  // bwd_filter's split over positions (plan_direct_filter): block b reduces weight item
  // b / splits over the positions [split*chunk, min(P, (split + 1)*chunk)), split = b % splits.
  int64_t splits, chunk;
};

// bwd_filter's plan, a function of the shape only (split_reduce.cuh says why): weight items of
// channel_lanes output channels each (one block per item and split), and the split of the P
// positions. Each split keeps at least kDirectFilterMinPerLane positions per position lane
// (below that a block's setup and tree would outweigh its sums), and the partial sums fit
// kMaxFilterWorkspaceBytes.
constexpr int64_t kDirectFilterMinPerLane = 8;
struct DirectFilterPlan {
  int64_t channel_lanes, position_lanes, items, positions, splits, chunk, blocks;
  int64_t dw_elems;  // elements of dw and of each partial sum
};
inline DirectFilterPlan plan_direct_filter(const ConvGeometry& g, int64_t acc_bytes) {
  DirectFilterPlan f{};
  f.channel_lanes = 1;
  if (g.p.layout == kNHWC)
    while (f.channel_lanes < 32 && f.channel_lanes < g.O) f.channel_lanes *= 2;
  f.position_lanes = 256 / f.channel_lanes;
  f.items = ceil_div_pos(g.O, f.channel_lanes) * g.in_per_group() * g.KH * g.KW;
  f.positions = g.N * g.OH * g.OW;
  f.dw_elems = g.O * g.gemm_k();
  int64_t splits = ceil_div_pos(kFilterSplitTargetBlocks, f.items);
  const int64_t by_work = f.positions / (f.position_lanes * kDirectFilterMinPerLane);
  if (splits > by_work) splits = by_work;
  const int64_t fit = kMaxFilterWorkspaceBytes / (f.dw_elems * acc_bytes);
  if (splits > fit) splits = fit;
  if (splits < 1) splits = 1;
  f.chunk = f.positions > 0 ? ceil_div_pos(f.positions, splits) : 1;
  f.splits = f.positions > 0 ? ceil_div_pos(f.positions, f.chunk) : 1;  // no empty split
  f.blocks = f.items * f.splits;
  return f;
}

inline bool direct_fits_int32(const ConvGeometry& g) {
  const int64_t limit = int64_t(1) << 30;
  const ConvParams& q = g.p;
  return g.N * g.C * g.H * g.W < limit && g.N * g.O * g.OH * g.OW < limit &&
         g.O * g.gemm_k() < limit &&
         axis_fits_int32(g.H, g.OH, g.KH, q.stride_h, q.dilation_h,
                         q.pad_top < 0 ? -q.pad_top : q.pad_top,
                         q.pad_bottom < 0 ? -q.pad_bottom : q.pad_bottom) &&
         axis_fits_int32(g.W, g.OW, g.KW, q.stride_w, q.dilation_w,
                         q.pad_left < 0 ? -q.pad_left : q.pad_left,
                         q.pad_right < 0 ? -q.pad_right : q.pad_right);
}

// which: 0 forward, 1 bwd_data, 2 bwd_filter (acc_bytes: its accumulation type's size).
template <typename I>
DirectPlan<I> make_direct_plan(const ConvGeometry& g, int which, int64_t acc_bytes = 4) {
  const ConvParams& q = g.p;
  DirectPlan<I> p;
  p.N = I(g.N);
  p.C = I(g.C);
  p.H = I(g.H);
  p.W = I(g.W);
  p.O = I(g.O);
  p.OH = I(g.OH);
  p.OW = I(g.OW);
  p.KH = I(g.KH);
  p.KW = I(g.KW);
  p.Cg = I(g.in_per_group());
  p.Og = I(g.out_per_group());
  p.stride_h = I(q.stride_h);
  p.stride_w = I(q.stride_w);
  p.dil_h = I(q.dilation_h);
  p.dil_w = I(q.dilation_w);
  p.pad_top = I(q.pad_top);
  p.pad_left = I(q.pad_left);
  p.xs = strides_as<I>(g.x_strides());
  p.ys = strides_as<I>(g.y_strides());
  p.ws = strides_as<I>(g.w_strides());
  p.div_og = Divider<I>(g.out_per_group());
  p.div_cg = Divider<I>(g.in_per_group());
  p.div_stride_h = Divider<I>(q.stride_h);
  p.div_stride_w = Divider<I>(q.stride_w);
  p.div_dil_h = Divider<I>(q.dilation_h);
  p.div_dil_w = Divider<I>(q.dilation_w);
  const bool nhwc = q.layout == kNHWC;
  // forward walks y (channels O, OH x OW), bwd_data walks dx (channels C, H x W).
  const int64_t ch = which == 1 ? g.C : g.O, rows = which == 1 ? g.H : g.OH,
                cols = which == 1 ? g.W : g.OW;
  if (nhwc) {  // e = ((n*rows + r)*cols + c)*ch + channel
    p.d0 = Divider<I>(ch);
    p.d1 = Divider<I>(cols);
    p.d2 = Divider<I>(rows);
  } else {  // e = ((n*ch + channel)*rows + r)*cols + c
    p.d0 = Divider<I>(cols);
    p.d1 = Divider<I>(rows);
    p.d2 = Divider<I>(ch);
  }
  // bwd_filter's plan (acc_bytes only caps the split by the workspace; launch_direct_filter
  // and direct_filter_workspace_bytes pass the same size).
  const DirectFilterPlan f = plan_direct_filter(g, acc_bytes);
  p.channel_lanes = I(f.channel_lanes);
  p.o_tiles = I(ceil_div_pos(g.O, f.channel_lanes));
  p.splits = f.splits;
  p.chunk = f.chunk;
  if (which == 2)
    p.items = I(f.blocks);
  else
    p.items = I(g.N * ch * rows * cols);
  return p;
}

// e -> (channel, r, c, n) of the element walk described in make_direct_plan.
template <int kLayout, typename I>
__device__ __forceinline__ void split_element(const DirectPlan<I>& p, I e, I& n, I& ch, I& r,
                                              I& c) {
  I a0, a1, a2;
  I t = p.d0.divmod(e, a0);
  t = p.d1.divmod(t, a1);
  n = p.d2.divmod(t, a2);
  if constexpr (kLayout == kNHWC) {
    ch = a0;
    c = a1;
    r = a2;
  } else {
    c = a0;
    r = a1;
    ch = a2;
  }
}

template <typename T, int kLayout, typename I>
__global__ void __launch_bounds__(256, 1)
    direct_conv_fwd_kernel(DirectPlan<I> p, const T* __restrict__ x, const T* __restrict__ w,
                           const T* __restrict__ bias, T* __restrict__ y) {
  using Acc = typename Num<T>::acc;
  const I step = I(gridDim.x) * 256;
  for (I e = I(blockIdx.x) * 256 + I(threadIdx.x); e < p.items; e += step) {
    I n, o, oh, ow;
    split_element<kLayout>(p, e, n, o, oh, ow);
    const I g = p.div_og.div(o);
    const TapSpan<I> th =
        window_taps_div(oh, p.stride_h, p.pad_top, p.div_dil_h, p.dil_h, p.KH, p.H);
    const TapSpan<I> tw =
        window_taps_div(ow, p.stride_w, p.pad_left, p.div_dil_w, p.dil_w, p.KW, p.W);
    const I ih0 = oh * p.stride_h - p.pad_top, iw0 = ow * p.stride_w - p.pad_left;
    const T* xg = x + n * p.xs.n + g * p.Cg * p.xs.c;
    const T* wo = w + o * p.ws.n;
    Acc acc = Acc(0);
    for (I ci = 0; ci < p.Cg; ++ci) {
      for (I kh = th.lo; kh < th.hi; ++kh) {
        const T* xrow = xg + ci * p.xs.c + (ih0 + kh * p.dil_h) * p.xs.h;
        const T* wrow = wo + ci * p.ws.c + kh * p.ws.h;
        for (I kw = tw.lo; kw < tw.hi; ++kw)
          acc +=
              Num<T>::load(xrow[(iw0 + kw * p.dil_w) * p.xs.w]) * Num<T>::load(wrow[kw * p.ws.w]);
      }
    }
    if (bias) acc += Num<T>::load(bias[o]);
    y[e] = Num<T>::store(acc);
  }
}

template <typename T, int kLayout, typename I>
__global__ void __launch_bounds__(256, 1)
    direct_conv_bwd_data_kernel(DirectPlan<I> p, const T* __restrict__ dy, const T* __restrict__ w,
                                const T* __restrict__ bias, T* __restrict__ dx) {
  using Acc = typename Num<T>::acc;
  const I step = I(gridDim.x) * 256;
  for (I e = I(blockIdx.x) * 256 + I(threadIdx.x); e < p.items; e += step) {
    I n, c, h, wc;
    split_element<kLayout>(p, e, n, c, h, wc);
    I ci;
    const I g = p.div_cg.divmod(c, ci);
    const T* dyg = dy + n * p.ys.n + g * p.Og * p.ys.c;
    const T* wg = w + g * p.Og * p.ws.n + ci * p.ws.c;
    Acc acc = Acc(0);
    // Tap kh reaches output oh = (h + pad - kh*d) / s when the division is exact; the
    // numerator falls as kh grows, so the first negative one ends the walk.
    for (I kh = 0; kh < p.KH; ++kh) {
      const I num_h = h + p.pad_top - kh * p.dil_h;
      if (num_h < 0) break;
      I rem_h;
      const I oh = p.div_stride_h.divmod(num_h, rem_h);
      if (rem_h != 0 || oh >= p.OH) continue;
      for (I kw = 0; kw < p.KW; ++kw) {
        const I num_w = wc + p.pad_left - kw * p.dil_w;
        if (num_w < 0) break;
        I rem_w;
        const I ow = p.div_stride_w.divmod(num_w, rem_w);
        if (rem_w != 0 || ow >= p.OW) continue;
        const T* dyp = dyg + oh * p.ys.h + ow * p.ys.w;
        const T* wp = wg + kh * p.ws.h + kw * p.ws.w;
        for (I j = 0; j < p.Og; ++j)
          acc += Num<T>::load(dyp[j * p.ys.c]) * Num<T>::load(wp[j * p.ws.n]);
      }
    }
    if (bias) acc += Num<T>::load(bias[c]);
    dx[e] = Num<T>::store(acc);
  }
}

// Block b: weight item b / splits (channel_lanes output channels at one (ci, kh, kw)), positions
// of split b % splits. splits == 1: the sums go to dw; else to partial[split] (laid out like dw).
template <typename T, int kLayout, typename I>
__global__ void __launch_bounds__(256, 1)
    direct_conv_bwd_filter_kernel(DirectPlan<I> p, const T* __restrict__ x,
                                  const T* __restrict__ dy, T* __restrict__ dw,
                                  typename Num<T>::acc* __restrict__ partial) {
  using Acc = typename Num<T>::acc;
  __shared__ Acc sums[256];
  const I lanes = p.channel_lanes, position_lanes = I(256) / lanes;
  const I tid = I(threadIdx.x), cl = tid % lanes, pl = tid / lanes;
  const int64_t positions = int64_t(p.N) * p.OH * p.OW;
  const int64_t dw_elems = int64_t(p.O) * p.Cg * p.KH * p.KW;
  // Position lanes step by position_lanes positions: as digits (n, oh, ow).
  const Digits3 stride = split_index(int64_t(position_lanes), p.OH, p.OW);
  for (I block = I(blockIdx.x); block < p.items; block += I(gridDim.x)) {
    const int64_t split = int64_t(block) % p.splits;
    const I item = I(int64_t(block) / p.splits);
    // item = ((o_tile*Cg + ci)*KH + kh)*KW + kw: once per block, plain division is fine.
    const I kw = item % p.KW, kh = (item / p.KW) % p.KH, ci = (item / (p.KW * p.KH)) % p.Cg;
    const I o = (item / (p.KW * p.KH * p.Cg)) * lanes + cl;
    const int64_t begin = split * p.chunk;
    const int64_t end = begin + p.chunk < positions ? begin + p.chunk : positions;
    const bool live = o < p.O;
    Acc acc = Acc(0);
    if (live) {
      const T* xc = x + (p.div_og.div(o) * p.Cg + ci) * p.xs.c;
      const T* dyo = dy + o * p.ys.c;
      const I dh = kh * p.dil_h - p.pad_top, dwo = kw * p.dil_w - p.pad_left;
      Digits3 at = split_index(begin + pl, p.OH, p.OW);
      for (int64_t pos = begin + pl; pos < end; pos += position_lanes) {
        const I n = I(at.a), oh = I(at.b), ow = I(at.c);
        const I ih = oh * p.stride_h + dh, iw = ow * p.stride_w + dwo;
        if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W)
          acc += Num<T>::load(xc[n * p.xs.n + ih * p.xs.h + iw * p.xs.w]) *
                 Num<T>::load(dyo[n * p.ys.n + oh * p.ys.h + ow * p.ys.w]);
        at = add_digits(at, stride, p.OH, p.OW);
      }
    }
    sums[tid] = acc;
    __syncthreads();
    // Tree over the position lanes of each channel lane: lanes [half, 2*half) fold into [0, half).
    for (I half = position_lanes / 2; half > 0; half /= 2) {
      if (pl < half) sums[tid] += sums[tid + half * lanes];
      __syncthreads();
    }
    if (pl == 0 && live) {
      const I off = o * p.ws.n + ci * p.ws.c + kh * p.ws.h + kw * p.ws.w;
      if (p.splits > 1)
        partial[split * dw_elems + off] = sums[tid];
      else
        dw[off] = Num<T>::store(sums[tid]);
    }
    __syncthreads();  // `sums` is rewritten by the next block
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: the layout and the index width pick the instantiation.

template <typename T, int kLayout, typename I>
cudaError_t launch_direct(const ConvGeometry& g, int which, const T* a, const T* b, const T* bias,
                          T* out, cudaStream_t stream) {
  const DirectPlan<I> p = make_direct_plan<I>(g, which);
  const dim3 grid(grid_blocks(ceil_div_pos(int64_t(p.items), 256)));
  if (which == 1)
    return launch(direct_conv_bwd_data_kernel<T, kLayout, I>, grid, dim3(256), stream, p, a, b,
                  bias, out);
  return launch(direct_conv_fwd_kernel<T, kLayout, I>, grid, dim3(256), stream, p, a, b, bias, out);
}

// which: 0 forward (a = x, b = w, out = y), 1 bwd_data (a = dy, b = w, out = dx).
// bwd_filter, which needs a workspace, is direct_conv_bwd_filter. index_bits: 0 picks by size,
// 32 or 64 force an instantiation (tests).
template <typename T>
cudaError_t direct_conv(const ConvGeometry& g, int which, const T* a, const T* b, const T* bias,
                        T* out, cudaStream_t stream, int index_bits = 0) {
  if (which != 0 && which != 1) return cudaErrorInvalidValue;
  const bool small = index_bits == 0 ? direct_fits_int32(g) : index_bits == 32;
  if (g.p.layout == kNHWC)
    return small ? launch_direct<T, kNHWC, int32_t>(g, which, a, b, bias, out, stream)
                 : launch_direct<T, kNHWC, int64_t>(g, which, a, b, bias, out, stream);
  return small ? launch_direct<T, kNCHW, int32_t>(g, which, a, b, bias, out, stream)
               : launch_direct<T, kNCHW, int64_t>(g, which, a, b, bias, out, stream);
}

// bwd_filter in two calls, as FilterLauncher: the workspace the plan needs for its partial sums
// (0: none, a single split writes dw directly), then the launch. Expects g.N > 0.
template <typename T>
int64_t direct_filter_workspace_bytes(const ConvGeometry& g) {
  using Acc = typename Num<T>::acc;
  const DirectFilterPlan f = plan_direct_filter(g, int64_t(sizeof(Acc)));
  return f.splits > 1 ? f.splits * f.dw_elems * int64_t(sizeof(Acc)) : 0;
}

template <typename T, int kLayout, typename I>
cudaError_t launch_direct_filter(const ConvGeometry& g, const T* x, const T* dy, T* dw,
                                 typename Num<T>::acc* workspace, cudaStream_t stream) {
  using Acc = typename Num<T>::acc;
  const DirectPlan<I> p = make_direct_plan<I>(g, 2, int64_t(sizeof(Acc)));
  cudaError_t err = launch(direct_conv_bwd_filter_kernel<T, kLayout, I>, dim3(grid_blocks(p.items)),
                           dim3(256), stream, p, x, dy, dw, workspace);
  if (err != cudaSuccess || p.splits == 1) return err;
  const int64_t elems = g.O * g.gemm_k();
  return launch(sum_partials_kernel<T>, dim3(grid_blocks(ceil_div_pos(elems, 256))), dim3(256),
                stream, static_cast<const Acc*>(workspace), p.splits, elems, dw);
}

template <typename T>
cudaError_t direct_conv_bwd_filter(const ConvGeometry& g, const T* x, const T* dy, T* dw,
                                   typename Num<T>::acc* workspace, cudaStream_t stream,
                                   int index_bits = 0) {
  // No workspace where the plan needs one: refuse rather than write through a null pointer.
  if (workspace == nullptr && direct_filter_workspace_bytes<T>(g) > 0) return cudaErrorInvalidValue;
  const bool small = index_bits == 0 ? direct_fits_int32(g) : index_bits == 32;
  if (g.p.layout == kNHWC)
    return small ? launch_direct_filter<T, kNHWC, int32_t>(g, x, dy, dw, workspace, stream)
                 : launch_direct_filter<T, kNHWC, int64_t>(g, x, dy, dw, workspace, stream);
  return small ? launch_direct_filter<T, kNCHW, int32_t>(g, x, dy, dw, workspace, stream)
               : launch_direct_filter<T, kNCHW, int64_t>(g, x, dy, dw, workspace, stream);
}

}  // namespace jaxconv::cuda
