// The SIMT kernels (level 2 of the conv headers; see conv2d_kernels.cuh): the forward /
// bwd_data pass and bwd_filter as shared-memory tiled implicit GEMMs on CUDA cores, for every
// dtype (float64, and float32 without TF32, never leave them). Both stage a BM x BK and a
// BK x BN tile in shared memory and multiply them with the same micro-tile (simt_multiply_stage);
// they differ in what the operands are (conv2d_problem.cuh).
#pragma once

#include <cstdint>

#include "conv2d_problem.cuh"

namespace jaxconv::cuda {

// ---------------------------------------------------------------------------------------------
// Tile configurations.
//
// A block of 256 threads computes a BM x BN tile of C = A * B, stepping through the reduction BK
// at a time through shared memory. The threads form a 16 x 16 grid of lanes; lane (lm, ln) owns
// the TM x TN accumulators at rows lm + 16*i and columns ln + 16*j. Strided ownership means a
// warp reads 16 consecutive words of one shared row and broadcasts the other operand.
// The tensor-core kernels (conv2d_mma.cuh) have their own tiles (MmaTile); choose_pass_kernel
// and choose_filter_kernel below pick between them and these.
template <int BM_, int BN_, int BK_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr int kLanes = 16;
  static constexpr int kThreads = kLanes * kLanes;
  static constexpr int TM = BM / kLanes, TN = BN / kLanes;
  static_assert(BM % kLanes == 0 && BN % kLanes == 0, "tile sides are multiples of 16");
  static_assert((BM * BK) % kThreads == 0 && (BN * BK) % kThreads == 0,
                "each thread stages the same number of elements");
};

using WideTile = TileConfig<64, 64, 16>;         // pass: both GEMM sides large
using TallTile = TileConfig<128, 16, 16>;        // pass: few channels per group (depthwise, heads)
using FilterTile = TileConfig<64, 64, 16>;       // bwd_filter: long reduction, deeper k step
using SmallFilterTile = TileConfig<16, 16, 64>;  // bwd_filter with a tiny dW per group

// The micro-tile both SIMT kernels multiply a stage with: lane (lane_m, lane_n) adds
// As[kk][lane_m + 16i] * Bs[kk][lane_n + 16j] into acc[i][j] for every kk < BK, in increasing
// kk (the order of every sum is fixed by the tile). As is BK x (BM + 1), Bs BK x (BN + 1): the
// extra column spreads a shared column over the banks.
template <typename Cfg, typename Acc>
__device__ __forceinline__ void simt_zero(Acc (&acc)[Cfg::TM][Cfg::TN]) {
  JAXCONV_UNROLL
  for (int i = 0; i < Cfg::TM; ++i) JAXCONV_UNROLL
  for (int j = 0; j < Cfg::TN; ++j) acc[i][j] = Acc(0);
}
template <typename Cfg, typename Acc>
__device__ __forceinline__ void simt_multiply_stage(const Acc (&As)[Cfg::BK][Cfg::BM + 1],
                                                    const Acc (&Bs)[Cfg::BK][Cfg::BN + 1],
                                                    int lane_m, int lane_n,
                                                    Acc (&acc)[Cfg::TM][Cfg::TN]) {
  constexpr int kLanes = Cfg::kLanes;
  JAXCONV_UNROLL
  for (int kk = 0; kk < Cfg::BK; ++kk) {
    Acc a[Cfg::TM], b[Cfg::TN];
    JAXCONV_UNROLL
    for (int i = 0; i < Cfg::TM; ++i) a[i] = As[kk][lane_m + kLanes * i];
    JAXCONV_UNROLL
    for (int j = 0; j < Cfg::TN; ++j) b[j] = Bs[kk][lane_n + kLanes * j];
    JAXCONV_UNROLL
    for (int i = 0; i < Cfg::TM; ++i) JAXCONV_UNROLL
    for (int j = 0; j < Cfg::TN; ++j) acc[i][j] += a[i] * b[j];
  }
}

template <typename T, typename Cfg, int kLayout, bool kWeightsAlongN>
__global__ void __launch_bounds__(256, 2)
    conv_pass_kernel(PassParams p, const T* __restrict__ in, const T* __restrict__ w,
                     const T* __restrict__ bias, T* __restrict__ out) {
  using Acc = typename Num<T>::acc;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, TM = Cfg::TM, TN = Cfg::TN;
  constexpr int kThreads = Cfg::kThreads, kLanes = Cfg::kLanes;
  constexpr bool kChannelsLast = kLayout == kNHWC;

  __shared__ Acc As[BK][BM + 1];  // A[m][k] stored k-major; +1 spreads a column over banks
  __shared__ Acc Bs[BK][BN + 1];
  // Per tile: each row's image offset (n*is.n, -1 past the grid), its in position before the
  // tap offset (u*step_h, v*step_w), and its out offset (-1 when outside `out`).
  __shared__ int64_t row_in[BM], row_ih[BM], row_iw[BM], row_out[BM];
  // Per k step: each k's channel offset (-1 past K or for a tap slot this phase lacks), its
  // tap offsets and its weight offset.
  __shared__ int64_t k_in[BK], k_dh[BK], k_dw[BK], k_w[BK];

  const int tid = int(threadIdx.x);
  // Lanes along the output's contiguous axis: positions in NCHW, channels in NHWC.
  const int lane_m = kChannelsLast ? tid / kLanes : tid % kLanes;
  const int lane_n = kChannelsLast ? tid % kLanes : tid / kLanes;
  // k digits: NCHW (ci, th, tw) radices (TH, TW); NHWC (th, tw, ci) radices (TW, Cin).
  const int64_t r1 = kChannelsLast ? p.TW : p.TH, r2 = kChannelsLast ? p.Cin : p.TW;
  const Digits3 k_step = split_index(BK, r1, r2);

  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const PassTileCoords t = pass_tile_coords(p, tile, BM, BN);
    const int64_t g = t.g, m0 = t.m0, n0 = t.n0;
    const PassAxis ah = t.ah, aw = t.aw;

    for (int r = tid; r < BM; r += kThreads) {
      const PassRow row = pass_row(p, ah, aw, m0 + r);
      row_in[r] = row.img;
      row_ih[r] = row.ih;
      row_iw[r] = row.iw;
      row_out[r] = row.out;
    }

    Acc acc[TM][TN];
    simt_zero<Cfg>(acc);

    // Threads tid < BK each follow one k of the step: k = k0 + tid.
    Digits3 kd = split_index(tid < BK ? tid : 0, r1, r2);
    for (int64_t k0 = 0; k0 < p.K; k0 += BK) {
      if (tid < BK) {
        const int64_t ci = kChannelsLast ? kd.c : kd.a;
        const int64_t th = kChannelsLast ? kd.a : kd.b;
        const int64_t tw = kChannelsLast ? kd.b : kd.c;
        const bool live = k0 + tid < p.K && th < ah.count && tw < aw.count;
        k_in[tid] = live ? (g * p.Cin + ci) * p.is.c : -1;
        k_dh[tid] = ah.off0 + th * ah.off_q;
        k_dw[tid] = aw.off0 + tw * aw.off_q;
        k_w[tid] = live ? ci * p.w_ci + (ah.cell0 + th * ah.cell_q) * p.w_kh +
                              (aw.cell0 + tw * aw.cell_q) * p.w_kw
                        : 0;
        kd = add_digits(kd, k_step, r1, r2);
      }
      __syncthreads();

      // A tile (BM x BK) from `in`: NCHW along m (a row of the input plane), NHWC along k
      // (a channel vector).
      JAXCONV_UNROLL
      for (int l = 0; l < BM * BK / kThreads; ++l) {
        const int e = tid + l * kThreads;
        const int r = kChannelsLast ? e / BK : e % BM;
        const int kk = kChannelsLast ? e % BK : e / BM;
        As[kk][r] = load_tap(in, row_in[r], k_in[kk], row_ih[r] + k_dh[kk], row_iw[r] + k_dw[kk],
                             p.Hin, p.Win, p.is);
      }
      // B tile (BK x BN) from the weights, along whichever axis is contiguous.
      JAXCONV_UNROLL
      for (int l = 0; l < BN * BK / kThreads; ++l) {
        const int e = tid + l * kThreads;
        const int c = kWeightsAlongN ? e % BN : e / BK;
        const int kk = kWeightsAlongN ? e / BN : e % BK;
        Acc val = Acc(0);
        if (k_in[kk] >= 0 && n0 + c < p.Cout)
          val = Num<T>::load(w[g * p.w_group + (n0 + c) * p.w_co + k_w[kk]]);
        Bs[kk][c] = val;
      }
      __syncthreads();

      simt_multiply_stage<Cfg>(As, Bs, lane_m, lane_n, acc);
      __syncthreads();
    }

    // Epilogue: bias, one rounding, store.
    JAXCONV_UNROLL
    for (int i = 0; i < TM; ++i) {
      const int64_t o = row_out[lane_m + kLanes * i];
      if (o < 0) continue;
      JAXCONV_UNROLL
      for (int j = 0; j < TN; ++j) {
        const int64_t c = n0 + lane_n + kLanes * j;
        if (c >= p.Cout) continue;
        const Acc b = bias ? Num<T>::load(bias[g * p.Cout + c]) : Acc(0);
        out[o + (g * p.Cout + c) * p.os.c] = Num<T>::store(acc[i][j] + b);
      }
    }
    __syncthreads();  // the next tile rewrites the row tables
  }
}

// ---------------------------------------------------------------------------------------------
// bwd_filter.

// Per group: rows m = co (Og), columns k (NCHW (ci, kh, kw), NHWC (kh, kw, ci): dw's own order
// within a group, so the epilogue writes runs), reduction over positions p = (n, oh, ow) of one
// split. With splits == 1 the tile is stored into dw; otherwise into partial[split] (float32 or
// double, laid out like dw) for sum_partials_kernel.
template <typename T, typename Cfg, int kLayout>
__global__ void __launch_bounds__(256, 2)
    conv_filter_kernel(FilterParams p, const T* __restrict__ x, const T* __restrict__ dy,
                       T* __restrict__ dw, typename Num<T>::acc* __restrict__ partial) {
  using Acc = typename Num<T>::acc;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, TM = Cfg::TM, TN = Cfg::TN;
  constexpr int kThreads = Cfg::kThreads, kLanes = Cfg::kLanes;
  constexpr bool kChannelsLast = kLayout == kNHWC;

  __shared__ Acc As[BK][BM + 1];  // dy[p][co]
  __shared__ Acc Bs[BK][BN + 1];  // im2col(x)[p][k]
  // Per tile, per column k: channel offset (-1 past Kg), tap offsets, offset within dw.
  __shared__ int64_t col_x[BN], col_dh[BN], col_dw[BN], col_w[BN];
  // Per step, per position p: image offset in x (-1 past the split), oh*s_h, ow*s_w, and the
  // offset of dy[n, 0, oh, ow].
  __shared__ int64_t pos_x[BK], pos_ih[BK], pos_iw[BK], pos_y[BK];

  const int tid = int(threadIdx.x);
  // Lanes along dw's contiguous axis: k in OIHW, co in HWIO.
  const int lane_m = kChannelsLast ? tid % kLanes : tid / kLanes;
  const int lane_n = kChannelsLast ? tid / kLanes : tid % kLanes;
  const Digits3 p_step = split_index(BK, p.OH, p.OW);

  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const FilterTileSpan t = filter_tile_span(p, tile, BM, BN);
    const int64_t g = t.g, m0 = t.m0, n0 = t.n0, split = t.split, p_begin = t.p_begin,
                  p_end = t.p_end;
    filter_columns<kChannelsLast>(p, g, n0, BN, tid, kThreads, col_x, col_dh, col_dw, col_w);

    Acc acc[TM][TN];
    simt_zero<Cfg>(acc);

    // Threads tid < BK each follow one position of the step: p = p0 + tid as (n, oh, ow).
    Digits3 pd = split_index(p_begin + (tid < BK ? tid : 0), p.OH, p.OW);
    for (int64_t p0 = p_begin; p0 < p_end; p0 += BK) {
      if (tid < BK) {
        const bool live = p0 + tid < p_end;
        pos_x[tid] = live ? pd.a * p.xs.n : -1;
        pos_ih[tid] = pd.b * p.stride_h;
        pos_iw[tid] = pd.c * p.stride_w;
        pos_y[tid] = live ? pd.a * p.ys.n + pd.b * p.ys.h + pd.c * p.ys.w : 0;
        pd = add_digits(pd, p_step, p.OH, p.OW);
      }
      __syncthreads();

      // dy tile: NCHW along positions (a row of a dy plane), NHWC along channels.
      JAXCONV_UNROLL
      for (int l = 0; l < BM * BK / kThreads; ++l) {
        const int e = tid + l * kThreads;
        const int r = kChannelsLast ? e % BM : e / BK;
        const int pp = kChannelsLast ? e / BM : e % BK;
        Acc val = Acc(0);
        if (pos_x[pp] >= 0 && m0 + r < p.Og)
          val = Num<T>::load(dy[pos_y[pp] + (g * p.Og + m0 + r) * p.ys.c]);
        As[pp][r] = val;
      }
      // im2col tile: NCHW along positions, NHWC along k (channel vectors).
      JAXCONV_UNROLL
      for (int l = 0; l < BN * BK / kThreads; ++l) {
        const int e = tid + l * kThreads;
        const int c = kChannelsLast ? e % BN : e / BK;
        const int pp = kChannelsLast ? e / BN : e % BK;
        Bs[pp][c] = load_tap(x, pos_x[pp], col_x[c], pos_ih[pp] + col_dh[c], pos_iw[pp] + col_dw[c],
                             p.H, p.W, p.xs);
      }
      __syncthreads();

      simt_multiply_stage<Cfg>(As, Bs, lane_m, lane_n, acc);
      __syncthreads();
    }

    Acc* part = p.splits > 1 ? partial + split * p.dw_elems : nullptr;
    JAXCONV_UNROLL
    for (int i = 0; i < TM; ++i) {
      const int64_t co = m0 + lane_m + kLanes * i;
      if (co >= p.Og) continue;
      JAXCONV_UNROLL
      for (int j = 0; j < TN; ++j) {
        const int c = lane_n + kLanes * j;
        if (col_x[c] < 0) continue;
        const int64_t off = (g * p.Og + co) * p.ws.n + col_w[c];
        if (part)
          part[off] = acc[i][j];
        else
          dw[off] = Num<T>::store(acc[i][j]);
      }
    }
    __syncthreads();  // the next tile rewrites the column tables
  }
}

// dw[i] = sum over s = 0, 1, ... of partial[s][i], always in that order.

}  // namespace jaxconv::cuda
