// CUDA convolution kernels: forward, bwd_data (= transposed convolution) and bwd_filter, all
// as shared-memory tiled implicit GEMMs. Host-side planning (which tile, how many splits) and
// the launches live here too, so that the host emulation in tests runs exactly the same code.
//
// Forward and bwd_data share one kernel, a "pass" (as ffi/cpu/conv_pack.h's struct Pass models
// them on the CPU):
//
//   out[n, g*Cout + co, out0 + u*out_step, ...] = bias[g*Cout + co] + sum over k = (ci, th, tw) of
//       in[n, g*Cin + ci, u*step_h + off_h(th), v*step_w + off_w(tw)] * weight(g, co, ci, th, tw)
//
// as a GEMM per group: rows m = (n, u, v) (output positions), columns co, reduction k; taps that
// read outside `in` read zero.
//   forward:  in = x, out = y; off(t) = t*dilation - pad, step = stride; weight = w[g*Og + co, ci].
//   bwd_data: in = dy, out = dx, gathered per stride phase (geometry.h phase_taps): the dx rows
//             h = s*u + rho of phase rho read dy row u + off(q) through the taps
//             kh = first + q*step only, so no tap that would multiply a zero is ever issued;
//             weight = w[g*Og + ci, co] (the pass's input channels are the conv's outputs).
// bwd_filter is its own kernel (SIMT here, tensor cores in conv2d_mma.cuh): per group,
// dW[co, k] = sum over positions p = (n, oh, ow) of dy[p, co] * im2col(x)[p, k], split over p
// into `splits` partial sums that a second kernel adds in a fixed order (deterministic, no
// atomics).
//
// k is ordered as the layout stores it: NCHW k = (ci, th, tw), NHWC k = (th, tw, ci), so that
// consecutive k read consecutive memory where the layout allows (runs along a row in NCHW,
// channel vectors in NHWC). Threads load tiles along the contiguous axis of each operand, and
// the output tile is written along the contiguous axis of the output.
//
// All offsets are int64. Half types are widened to float32 when a tile is staged in shared
// memory, accumulate in float32, and are rounded once when stored; float64 stays double.
#pragma once

#include <string>

#include "kernel_common.cuh"

#if defined(__CUDACC__)
#define JAXCONV_UNROLL _Pragma("unroll")
#else
#define JAXCONV_UNROLL
#endif

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

enum class PassTile { kWide, kTall };
enum class FilterTileKind { kWide, kSmall };

// The SIMT pass tile, by the number of output channels per group (the GEMM's N); a 64-wide
// tile would mostly compute padding below 16 channels. choose_pass_kernel below decides first
// whether the pass runs on tensor cores at all.
inline PassTile choose_pass_tile(int64_t cout_per_group) {
  return cout_per_group <= 16 ? PassTile::kTall : PassTile::kWide;
}

inline FilterTileKind choose_filter_tile(int64_t out_per_group, int64_t k_per_group) {
  return (out_per_group <= 16 && k_per_group <= 16) ? FilterTileKind::kSmall
                                                    : FilterTileKind::kWide;
}

// ---------------------------------------------------------------------------------------------
// Forward / bwd_data pass.

struct PassParams {
  int64_t N, G, Cin, Cout;       // channels per group on the read and written side
  int64_t Hin, Win, Hout, Wout;  // spatial dims of `in` and `out`
  Strides4 is, os;               // element strides of in / out, addressed (n, c, h, w)
  // Weight of (pass out channel co, pass in channel ci, kernel cell kh, kw) in group g:
  //   w[g*w_group + co*w_co + ci*w_ci + kh*w_kh + kw*w_kw]
  int64_t w_group, w_co, w_ci, w_kh, w_kw;
  int64_t KH, KW, stride_h, stride_w, dil_h, dil_w, pad_top, pad_left;
  int64_t transposed;          // 1: bwd_data phases (per-tile axes from phase_taps)
  int64_t phases_h, phases_w;  // stride phases (1 x 1 for forward)
  int64_t TH, TW;              // tap slots per axis (the most taps any phase has)
  int64_t U, V;                // grid of one phase: m = (n, u, v)
  int64_t K, M;                // Cin*TH*TW, N*U*V
  int64_t m_tiles, n_tiles, tiles;
  int64_t layout;
};

// One axis of a pass as seen from a tile: in position = u*step + off0 + q*off_q for tap slot q
// (valid for q < count), which multiplies kernel cell cell0 + q*cell_q, and writes out position
// out0 + u*out_step.
struct PassAxis {
  int64_t step, off0, off_q, cell0, cell_q, count, out0, out_step;
};

JAXCONV_HD PassAxis forward_axis(int64_t stride, int64_t pad, int64_t dilation, int64_t k) {
  return {stride, -pad, dilation, 0, 1, k, 0, 1};
}

// Phase rho of bwd_data: dx position s*u + rho reads dy position u + (rho + pad - kh*d)/s
// through the taps kh = first + q*step (phase_taps); (rho + pad - first*d) is a multiple of s,
// and consecutive taps move the read position by -step*d/s = -d/gcd(s, d).
JAXCONV_HD PassAxis transposed_axis(int64_t rho, int64_t stride, int64_t pad, int64_t dilation,
                                    int64_t k) {
  PhaseTaps t = phase_taps(rho, stride, pad, dilation, k);
  if (t.count == 0) return {1, 0, 0, 0, 0, 0, rho, stride};
  int64_t gcd = stride / t.step;
  return {1,
          (rho + pad - t.first * dilation) / stride,
          -(dilation / gcd),
          t.first,
          t.step,
          t.count,
          rho,
          stride};
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
    // tile = (((phase_h * phases_w + phase_w) * G + g) * n_tiles + nt) * m_tiles + mt
    int64_t rest = tile;
    const int64_t mt = rest % p.m_tiles;
    rest /= p.m_tiles;
    const int64_t nt = rest % p.n_tiles;
    rest /= p.n_tiles;
    const int64_t g = rest % p.G;
    rest /= p.G;
    const int64_t rho_w = rest % p.phases_w, rho_h = rest / p.phases_w;
    const PassAxis ah = p.transposed ? transposed_axis(rho_h, p.stride_h, p.pad_top, p.dil_h, p.KH)
                                     : forward_axis(p.stride_h, p.pad_top, p.dil_h, p.KH);
    const PassAxis aw = p.transposed ? transposed_axis(rho_w, p.stride_w, p.pad_left, p.dil_w, p.KW)
                                     : forward_axis(p.stride_w, p.pad_left, p.dil_w, p.KW);
    const int64_t m0 = mt * BM, n0 = nt * BN;

    for (int r = tid; r < BM; r += kThreads) {
      const int64_t m = m0 + r;
      int64_t img = -1, ih = 0, iw = 0, o = -1;
      if (m < p.M) {
        const int64_t v = m % p.V, u = (m / p.V) % p.U, n = m / (p.U * p.V);
        const int64_t oh = ah.out0 + u * ah.out_step, ow = aw.out0 + v * aw.out_step;
        img = n * p.is.n;
        ih = u * ah.step;
        iw = v * aw.step;
        if (oh < p.Hout && ow < p.Wout) o = n * p.os.n + oh * p.os.h + ow * p.os.w;
      }
      row_in[r] = img;
      row_ih[r] = ih;
      row_iw[r] = iw;
      row_out[r] = o;
    }

    Acc acc[TM][TN];
    JAXCONV_UNROLL
    for (int i = 0; i < TM; ++i) JAXCONV_UNROLL
    for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);

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
        Acc val = Acc(0);
        const int64_t img = row_in[r], chan = k_in[kk];
        if (img >= 0 && chan >= 0) {
          const int64_t ih = row_ih[r] + k_dh[kk], iw = row_iw[r] + k_dw[kk];
          if (ih >= 0 && ih < p.Hin && iw >= 0 && iw < p.Win)
            val = Num<T>::load(in[img + chan + ih * p.is.h + iw * p.is.w]);
        }
        As[kk][r] = val;
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

      JAXCONV_UNROLL
      for (int kk = 0; kk < BK; ++kk) {
        Acc a[TM], b[TN];
        JAXCONV_UNROLL
        for (int i = 0; i < TM; ++i) a[i] = As[kk][lane_m + kLanes * i];
        JAXCONV_UNROLL
        for (int j = 0; j < TN; ++j) b[j] = Bs[kk][lane_n + kLanes * j];
        JAXCONV_UNROLL
        for (int i = 0; i < TM; ++i) JAXCONV_UNROLL
        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
      }
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

inline PassParams forward_pass(const ConvGeometry& g) {
  PassParams p{};
  const Strides4 ws = g.w_strides();
  p.N = g.N;
  p.G = g.groups();
  p.Cin = g.in_per_group();
  p.Cout = g.out_per_group();
  p.Hin = g.H;
  p.Win = g.W;
  p.Hout = g.OH;
  p.Wout = g.OW;
  p.is = g.x_strides();
  p.os = g.y_strides();
  p.w_group = p.Cout * ws.n;
  p.w_co = ws.n;
  p.w_ci = ws.c;
  p.w_kh = ws.h;
  p.w_kw = ws.w;
  p.KH = g.KH;
  p.KW = g.KW;
  p.stride_h = g.p.stride_h;
  p.stride_w = g.p.stride_w;
  p.dil_h = g.p.dilation_h;
  p.dil_w = g.p.dilation_w;
  p.pad_top = g.p.pad_top;
  p.pad_left = g.p.pad_left;
  p.transposed = 0;
  p.phases_h = 1;
  p.phases_w = 1;
  p.TH = g.KH;
  p.TW = g.KW;
  p.U = g.OH;
  p.V = g.OW;
  p.K = p.Cin * p.TH * p.TW;
  p.M = p.N * p.U * p.V;
  p.layout = g.p.layout;
  return p;
}

// bwd_data: the pass reads dy (channels = the conv's outputs) and writes dx. Phases along an
// axis: min(s, size) of them (a phase rho >= size has no dx row), each with ceil(size / s) grid
// rows (rows past dx are computed and dropped); ceil(k / step) tap slots per phase.
inline PassParams bwd_data_pass(const ConvGeometry& g) {
  PassParams p{};
  const Strides4 ws = g.w_strides();
  p.N = g.N;
  p.G = g.groups();
  p.Cin = g.out_per_group();
  p.Cout = g.in_per_group();
  p.Hin = g.OH;
  p.Win = g.OW;
  p.Hout = g.H;
  p.Wout = g.W;
  p.is = g.y_strides();
  p.os = g.x_strides();
  p.w_group = p.Cin * ws.n;
  p.w_co = ws.c;
  p.w_ci = ws.n;
  p.w_kh = ws.h;
  p.w_kw = ws.w;
  p.KH = g.KH;
  p.KW = g.KW;
  p.stride_h = g.p.stride_h;
  p.stride_w = g.p.stride_w;
  p.dil_h = g.p.dilation_h;
  p.dil_w = g.p.dilation_w;
  p.pad_top = g.p.pad_top;
  p.pad_left = g.p.pad_left;
  p.transposed = 1;
  p.phases_h = g.p.stride_h < g.H ? g.p.stride_h : g.H;
  p.phases_w = g.p.stride_w < g.W ? g.p.stride_w : g.W;
  // Every phase's taps are spaced step = s / gcd(s, d) apart (phase_taps), so no phase has
  // more than ceil(k / step).
  const int64_t step_h = phase_taps(0, g.p.stride_h, 0, g.p.dilation_h, g.KH).step;
  const int64_t step_w = phase_taps(0, g.p.stride_w, 0, g.p.dilation_w, g.KW).step;
  p.TH = ceil_div_pos(g.KH, step_h);
  p.TW = ceil_div_pos(g.KW, step_w);
  p.U = ceil_div_pos(g.H, g.p.stride_h);
  p.V = ceil_div_pos(g.W, g.p.stride_w);
  p.K = p.Cin * p.TH * p.TW;
  p.M = p.N * p.U * p.V;
  p.layout = g.p.layout;
  return p;
}

// bwd_filter's problem, per group: dW[co, k] over positions p (kernels below and in
// conv2d_mma.cuh), and its split plan (plan_filter).
struct FilterParams {
  int64_t N, G, Cg, Og, H, W, OH, OW, KH, KW;
  int64_t stride_h, stride_w, dil_h, dil_w, pad_top, pad_left;
  Strides4 xs, ys, ws;
  int64_t Kg, P;                            // Cg*KH*KW (columns), N*OH*OW (reduction)
  int64_t dw_elems;                         // elements of dw (and of each partial)
  int64_t m_tiles, n_tiles, splits, chunk;  // chunk: positions per split, a multiple of BK
  int64_t tiles;                            // G * m_tiles * n_tiles * splits
  int64_t layout;
};

// One tile of a bwd_filter launch (SIMT and tensor-core kernels alike):
//   tile = ((g * n_tiles + nt) * m_tiles + mt) * splits + split,
// dW rows [m0, m0 + BM) and columns [n0, n0 + BN) of group g, summed over the positions
// [p_begin, p_end) of split `split`.
struct FilterTileSpan {
  int64_t g, m0, n0, split, p_begin, p_end;
};
__device__ __forceinline__ FilterTileSpan filter_tile_span(const FilterParams& p, int64_t tile,
                                                           int64_t BM, int64_t BN) {
  const int64_t split = tile % p.splits;
  tile /= p.splits;
  const int64_t mt = tile % p.m_tiles;
  tile /= p.m_tiles;
  const int64_t nt = tile % p.n_tiles;
  const int64_t p_begin = split * p.chunk;
  return {tile / p.n_tiles, mt * BM,
          nt * BN,          split,
          p_begin,          p_begin + p.chunk < p.P ? p_begin + p.chunk : p.P};
}

// Per column c of a bwd_filter tile (dW column k = n0 + c, digits (ci, kh, kw) in OIHW order,
// (kh, kw, ci) in HWIO): x's channel offset (-1 past Kg), the tap's row and column offsets
// kh * dilation_h - pad_top and kw * dilation_w - pad_left, and the offset within dW. The block's
// threads fill the columns tid, tid + threads, ...; the caller synchronizes.
template <bool kChannelsLast, typename Index>
__device__ __forceinline__ void filter_columns(const FilterParams& p, int64_t g, int64_t n0, int BN,
                                               int tid, int threads, Index* col_x, Index* col_dh,
                                               Index* col_dw, Index* col_w) {
  const int64_t r1 = kChannelsLast ? p.KW : p.KH, r2 = kChannelsLast ? p.Cg : p.KW;
  for (int c = tid; c < BN; c += threads) {
    const int64_t k = n0 + c;
    int64_t chan = -1, dh = 0, dwo = 0, wo = 0;
    if (k < p.Kg) {
      const Digits3 d = split_index(k, r1, r2);
      const int64_t ci = kChannelsLast ? d.c : d.a;
      const int64_t kh = kChannelsLast ? d.a : d.b;
      const int64_t kw = kChannelsLast ? d.b : d.c;
      chan = (g * p.Cg + ci) * p.xs.c;
      dh = kh * p.dil_h - p.pad_top;
      dwo = kw * p.dil_w - p.pad_left;
      wo = ci * p.ws.c + kh * p.ws.h + kw * p.ws.w;
    }
    col_x[c] = Index(chan);
    col_dh[c] = Index(dh);
    col_dw[c] = Index(dwo);
    col_w[c] = Index(wo);
  }
}

}  // namespace jaxconv::cuda

// The tensor-core kernels read PassParams, FilterParams and the axis helpers above.
#include "conv2d_mma.cuh"

namespace jaxconv::cuda {

// How the conv kernels may run on the current device: tensor cores present (sm_80+, mma.sync),
// and float32 operands allowed to be rounded to TF32 (the conv's allow_tf32 attribute).
struct PassOptions {
  bool tensor_cores = false;
  bool allow_tf32 = false;
};

enum class PassKernel { kSimtWide, kSimtTall, kMmaLarge, kMmaSmall };
enum class FilterKernel { kSimtWide, kSimtSmall, kMmaLarge, kMmaSmall };

// Output tiles of 128 x 128 below which the large tensor-core tile would leave SMs idle: about
// two waves of one block per SM on an H100 (132 SMs).
constexpr int64_t kMmaLargeMinTiles = 256;

// Whether a GEMM of T runs on tensor cores: sm_80+, a 16-bit type or float32 with TF32 allowed,
// and at least 16 values per group on both the output-channel side (`rows`) and the other
// (`cols`); below that (depthwise, tiny heads) a 16 x 8 x 16 mma would mostly multiply padding.
template <typename T>
bool mma_applies(const PassOptions& opts, int64_t rows, int64_t cols) {
  const bool mma_type = sizeof(T) == 2 || (sizeof(T) == 4 && opts.allow_tf32);
  return opts.tensor_cores && mma_type && rows >= 16 && cols >= 16;
}

// The one place that picks the kernels and tiles of all three directions, by shape class.
//
// Pass (forward, bwd_data per stride phase), a GEMM of M = N*U*V rows by Cout columns over
// K = Cin*TH*TW:
//   - tensor cores where mma_applies(Cout, K);
//   - the 128 x 128 tile where it still yields kMmaLargeMinTiles blocks, else 64 x 64;
//   - float64, and float32 without TF32, stay on the SIMT kernel (tall tile for <= 16
//     output channels per group).
template <typename T>
PassKernel choose_pass_kernel(const PassParams& p, const PassOptions& opts) {
  if (mma_applies<T>(opts, p.Cout, p.K)) {
    const int64_t large_tiles =
        p.phases_h * p.phases_w * p.G * ceil_div_pos(p.M, 128) * ceil_div_pos(p.Cout, 128);
    return large_tiles >= kMmaLargeMinTiles && p.Cout > 64 ? PassKernel::kMmaLarge
                                                           : PassKernel::kMmaSmall;
  }
  return choose_pass_tile(p.Cout) == PassTile::kTall ? PassKernel::kSimtTall
                                                     : PassKernel::kSimtWide;
}

// bwd_filter, a GEMM of Og rows by Kg = Cg*KH*KW columns per group over the P = N*OH*OW
// positions, split over P by plan_filter to fill the GPU (so the tile count alone does not
// decide the tile):
//   - tensor cores where mma_applies(Og, Kg); the 128 x 128 tile when both sides exceed 64
//     (a 64-wide side would leave half of it padding), else 64 x 64;
//   - otherwise SIMT, the 16 x 16 tile for a dW of at most 16 x 16 per group.
template <typename T>
FilterKernel choose_filter_kernel(const FilterParams& p, const PassOptions& opts) {
  if (mma_applies<T>(opts, p.Og, p.Kg))
    return p.Og > 64 && p.Kg > 64 ? FilterKernel::kMmaLarge : FilterKernel::kMmaSmall;
  return choose_filter_tile(p.Og, p.Kg) == FilterTileKind::kSmall ? FilterKernel::kSimtSmall
                                                                  : FilterKernel::kSimtWide;
}

// Whether the tensor-core kernels form their offsets in int32 (a separate instantiation;
// int64 otherwise): every operand has fewer than 2^31 elements. The kernels form an offset only
// for an element inside its tensor, so each one is then below 2^31.
constexpr int64_t kIndex32Elements = int64_t(1) << 31;
inline bool mma_index32(const PassParams& p) {
  return p.N * p.is.n < kIndex32Elements && p.N * p.os.n < kIndex32Elements &&
         p.G * p.w_group < kIndex32Elements;
}
inline bool mma_index32(const FilterParams& p) {
  return p.N * p.xs.n < kIndex32Elements && p.N * p.ys.n < kIndex32Elements &&
         p.dw_elems < kIndex32Elements;
}

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
    JAXCONV_UNROLL
    for (int i = 0; i < TM; ++i) JAXCONV_UNROLL
    for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);

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
        Acc val = Acc(0);
        const int64_t img = pos_x[pp], chan = col_x[c];
        if (img >= 0 && chan >= 0) {
          const int64_t ih = pos_ih[pp] + col_dh[c], iw = pos_iw[pp] + col_dw[c];
          if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W)
            val = Num<T>::load(x[img + chan + ih * p.xs.h + iw * p.xs.w]);
        }
        Bs[pp][c] = val;
      }
      __syncthreads();

      JAXCONV_UNROLL
      for (int kk = 0; kk < BK; ++kk) {
        Acc a[TM], b[TN];
        JAXCONV_UNROLL
        for (int i = 0; i < TM; ++i) a[i] = As[kk][lane_m + kLanes * i];
        JAXCONV_UNROLL
        for (int j = 0; j < TN; ++j) b[j] = Bs[kk][lane_n + kLanes * j];
        JAXCONV_UNROLL
        for (int i = 0; i < TM; ++i) JAXCONV_UNROLL
        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
      }
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
template <typename T>
__global__ void __launch_bounds__(256)
    sum_partials_kernel(const typename Num<T>::acc* __restrict__ partial, int64_t splits,
                        int64_t elems, T* __restrict__ dw) {
  using Acc = typename Num<T>::acc;
  const int64_t stride = int64_t(gridDim.x) * 256;
  for (int64_t i = int64_t(blockIdx.x) * 256 + threadIdx.x; i < elems; i += stride) {
    Acc s = Acc(0);
    for (int64_t k = 0; k < splits; ++k) s += partial[k * elems + i];
    dw[i] = Num<T>::store(s);
  }
}

inline FilterParams filter_params(const ConvGeometry& g) {
  FilterParams p{};
  p.N = g.N;
  p.G = g.groups();
  p.Cg = g.in_per_group();
  p.Og = g.out_per_group();
  p.H = g.H;
  p.W = g.W;
  p.OH = g.OH;
  p.OW = g.OW;
  p.KH = g.KH;
  p.KW = g.KW;
  p.stride_h = g.p.stride_h;
  p.stride_w = g.p.stride_w;
  p.dil_h = g.p.dilation_h;
  p.dil_w = g.p.dilation_w;
  p.pad_top = g.p.pad_top;
  p.pad_left = g.p.pad_left;
  p.xs = g.x_strides();
  p.ys = g.y_strides();
  p.ws = g.w_strides();
  p.Kg = g.gemm_k();
  p.P = g.N * g.OH * g.OW;
  p.dw_elems = g.O * p.Kg;
  p.layout = g.p.layout;
  return p;
}

// ---- bwd_filter's split plan: a function of the problem's shape only -----------------------
// The reduction over positions p is cut into `splits` contiguous chunks whose partial sums are
// added in split order by sum_partials_kernel, so the plan fixes the summation order. It must
// therefore not depend on the GPU (SM count, MIG slice) nor on how much memory is free: the
// same shape, dtype and layout give the same bits on every GPU that runs the same build.
// kFilterSplitTargetBlocks stands in for "about 4 blocks per SM" on a typical large GPU (132
// SMs: an H100 SXM); smaller GPUs simply run the blocks in more waves. When the workspace for
// the partial sums cannot be had, the handler fails with an error instead of changing order.
constexpr int64_t kFilterSplitTargetBlocks = 4 * 132;
// Workspace cap for the partial sums of bwd_filter (bounds the splits of very large filters).
constexpr int64_t kMaxFilterWorkspaceBytes = int64_t(256) << 20;

// The handler's error when XLA's scratch allocator cannot give the workspace (here so that the
// emulation tests check the same text).
inline std::string filter_workspace_error(const char* target, int64_t bytes, int64_t splits) {
  return std::string(target) + ": could not allocate " + std::to_string(bytes) +
         " bytes of device scratch for the partial sums of its " + std::to_string(splits) +
         "-way split reduction. The split is fixed by the problem's shape so that results are "
         "reproducible, hence no fallback to another summation order; free device memory "
         "(smaller batch, fewer live arrays) or give XLA's allocator more "
         "(XLA_PYTHON_CLIENT_MEM_FRACTION)";
}

// Splits the reduction so that tiles * splits reaches kFilterSplitTargetBlocks, while each
// split keeps at least 4 steps of work and the partials fit the workspace cap. Tile bm x bn,
// bk positions per step. Fills m/n tiles, splits, chunk, tiles.
inline void plan_filter(FilterParams* p, int64_t acc_bytes, int64_t bm, int64_t bn, int64_t bk) {
  p->m_tiles = ceil_div_pos(p->Og, bm);
  p->n_tiles = ceil_div_pos(p->Kg, bn);
  const int64_t base = p->G * p->m_tiles * p->n_tiles;
  const int64_t steps = ceil_div_pos(p->P, bk);
  int64_t splits = ceil_div_pos(kFilterSplitTargetBlocks, base);
  if (splits > 64) splits = 64;
  if (splits > steps / 4) splits = steps / 4;
  const int64_t fit = kMaxFilterWorkspaceBytes / (p->dw_elems * acc_bytes);
  if (splits > fit) splits = fit;
  if (splits < 1) splits = 1;
  p->chunk = ceil_div_pos(steps, splits) * bk;
  p->splits = ceil_div_pos(p->P, p->chunk);  // no empty split
  if (p->splits < 1) p->splits = 1;
  p->tiles = base * p->splits;
}

// Host side of bwd_filter, in two calls so that the caller can allocate the workspace between
// them: workspace_bytes() says how many bytes of partial sums the plan needs (0: none), run()
// launches. The kernel comes from choose_filter_kernel (or is forced, for tests), and the plan
// from its tile, so both are functions of the shape, dtype, layout and PassOptions only.
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
