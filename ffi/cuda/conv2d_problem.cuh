// The convolution problem as the CUDA implicit GEMMs see it (level 1 of the conv headers; see
// conv2d_kernels.cuh for the levels): the pass and bwd_filter parameters built from a
// ConvGeometry, each tile's view of them (pass axes, tile coordinates, bwd_filter tile spans and
// columns), and the options a launch runs under. No kernels: the SIMT kernels
// (conv2d_simt.cuh) and the tensor-core kernels (conv2d_mma.cuh) both read these.
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
// bwd_filter is its own kernel (conv2d_simt.cuh, tensor cores in conv2d_mma.cuh): per group,
// dW[co, k] = sum over positions p = (n, oh, ow) of dy[p, co] * im2col(x)[p, k], split over p
// into `splits` partial sums that a second kernel adds in a fixed order (deterministic, no
// atomics; split_reduce.cuh).
//
// k is ordered as the layout stores it: NCHW k = (ci, th, tw), NHWC k = (th, tw, ci), so that
// consecutive k read consecutive memory where the layout allows (runs along a row in NCHW,
// channel vectors in NHWC). Threads load tiles along the contiguous axis of each operand, and
// the output tile is written along the contiguous axis of the output.
//
// All offsets are int64. Half types are widened to float32 when a tile is staged in shared
// memory, accumulate in float32, and are rounded once when stored; float64 stays double.
#pragma once

#include <cstdint>

#include "kernel_common.cuh"

namespace jaxconv::cuda {

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

// Phase rho of bwd_data: dx position s*u + rho reads dy position u + in0 + q*in_q through tap
// slot q, which multiplies kernel cell first + q*step (geometry.h's bwd_data_phase_axis, shared
// with the CPU pass).
JAXCONV_HD PassAxis transposed_axis(int64_t rho, int64_t stride, int64_t pad, int64_t dilation,
                                    int64_t k) {
  const BwdDataPhaseAxis a = bwd_data_phase_axis(rho, stride, pad, dilation, k);
  return {1, a.in0, a.in_q, a.first, a.step, a.count, a.out0, a.out_step};
}

// The tile of a pass launch, in the order the grid walks them:
//   tile = (((phase_h * phases_w + phase_w) * G + g) * n_tiles + nt) * m_tiles + mt,
// rows [m0, m0 + BM) and output channels [n0, n0 + BN) of group g in stride phase
// (rho_h, rho_w) (0, 0 for forward), and that phase's axes.
struct PassTileCoords {
  int64_t g, m0, n0;
  PassAxis ah, aw;
};
JAXCONV_HD PassTileCoords pass_tile_coords(const PassParams& p, int64_t tile, int64_t BM,
                                           int64_t BN) {
  const int64_t mt = tile % p.m_tiles;
  tile /= p.m_tiles;
  const int64_t nt = tile % p.n_tiles;
  tile /= p.n_tiles;
  const int64_t g = tile % p.G;
  tile /= p.G;
  const int64_t rho_w = tile % p.phases_w, rho_h = tile / p.phases_w;
  const PassAxis ah = p.transposed ? transposed_axis(rho_h, p.stride_h, p.pad_top, p.dil_h, p.KH)
                                   : forward_axis(p.stride_h, p.pad_top, p.dil_h, p.KH);
  const PassAxis aw = p.transposed ? transposed_axis(rho_w, p.stride_w, p.pad_left, p.dil_w, p.KW)
                                   : forward_axis(p.stride_w, p.pad_left, p.dil_w, p.KW);
  return {g, mt * BM, nt * BN, ah, aw};
}

// Row m = (n, u, v) of a pass tile with axes (ah, aw): the image offset of `in` (n*is.n; -1
// past M), the in position before the tap offset (u*step_h, v*step_w), and the out offset of
// out[n, 0, out0 + u*out_step, ...] (-1 past M or outside `out`: bwd_data's last grid rows).
struct PassRow {
  int64_t img, ih, iw, out;
};
JAXCONV_HD PassRow pass_row(const PassParams& p, const PassAxis& ah, const PassAxis& aw,
                            int64_t m) {
  if (m >= p.M) return {-1, 0, 0, -1};
  const int64_t v = m % p.V, u = (m / p.V) % p.U, n = m / (p.U * p.V);
  const int64_t oh = ah.out0 + u * ah.out_step, ow = aw.out0 + v * aw.out_step;
  const int64_t o = oh < p.Hout && ow < p.Wout ? n * p.os.n + oh * p.os.h + ow * p.os.w : -1;
  return {n * p.is.n, u * ah.step, v * aw.step, o};
}

// in[img + chan + ih*s.h + iw*s.w] widened to the accumulation type, or zero where the row or
// the k column is dead (img or chan < 0) or the tap falls outside the H x W image: the gather
// of the pass's A tile and of bwd_filter's im2col tile alike.
template <typename T>
__device__ __forceinline__ typename Num<T>::acc load_tap(const T* in, int64_t img, int64_t chan,
                                                         int64_t ih, int64_t iw, int64_t H,
                                                         int64_t W, const Strides4& s) {
  if (img < 0 || chan < 0 || ih < 0 || ih >= H || iw < 0 || iw >= W) return typename Num<T>::acc(0);
  return Num<T>::load(in[img + chan + ih * s.h + iw * s.w]);
}

// The fields forward and bwd_data share: batch, groups, kernel, stride, dilation, padding,
// layout and the weight's spatial strides; `transposed` picks which side is read.
inline PassParams pass_common(const ConvGeometry& g, bool transposed) {
  PassParams p{};
  const Strides4 ws = g.w_strides();
  p.N = g.N;
  p.G = g.groups();
  p.Cin = transposed ? g.out_per_group() : g.in_per_group();
  p.Cout = transposed ? g.in_per_group() : g.out_per_group();
  p.Hin = transposed ? g.OH : g.H;
  p.Win = transposed ? g.OW : g.W;
  p.Hout = transposed ? g.H : g.OH;
  p.Wout = transposed ? g.W : g.OW;
  p.is = transposed ? g.y_strides() : g.x_strides();
  p.os = transposed ? g.x_strides() : g.y_strides();
  // forward: weight(co, ci) = w[g*Og + co, ci]; bwd_data: w[g*Og + ci, co].
  p.w_group = (transposed ? p.Cin : p.Cout) * ws.n;
  p.w_co = transposed ? ws.c : ws.n;
  p.w_ci = transposed ? ws.n : ws.c;
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
  p.transposed = transposed ? 1 : 0;
  p.layout = g.p.layout;
  return p;
}

inline PassParams forward_pass(const ConvGeometry& g) {
  PassParams p = pass_common(g, false);
  p.phases_h = 1;
  p.phases_w = 1;
  p.TH = g.KH;
  p.TW = g.KW;
  p.U = g.OH;
  p.V = g.OW;
  p.K = p.Cin * p.TH * p.TW;
  p.M = p.N * p.U * p.V;
  return p;
}

// bwd_data: the pass reads dy (channels = the conv's outputs) and writes dx. Phases along an
// axis: min(s, size) of them (a phase rho >= size has no dx row), each with ceil(size / s) grid
// rows (rows past dx are computed and dropped); ceil(k / step) tap slots per phase.
inline PassParams bwd_data_pass(const ConvGeometry& g) {
  PassParams p = pass_common(g, true);
  p.phases_h = bwd_data_phases(g.p.stride_h, g.H);
  p.phases_w = bwd_data_phases(g.p.stride_w, g.W);
  p.TH = bwd_data_tap_slots(g.p.stride_h, g.p.dilation_h, g.KH);
  p.TW = bwd_data_tap_slots(g.p.stride_w, g.p.dilation_w, g.KW);
  p.U = ceil_div_pos(g.H, g.p.stride_h);
  p.V = ceil_div_pos(g.W, g.p.stride_w);
  p.K = p.Cin * p.TH * p.TW;
  p.M = p.N * p.U * p.V;
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
// How the conv kernels may run on the current device: tensor cores present (sm_80+, mma.sync),
// and float32 operands allowed to be rounded to TF32 (the conv's allow_tf32 attribute).
struct PassOptions {
  bool tensor_cores = false;
  bool allow_tf32 = false;
};

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

}  // namespace jaxconv::cuda
