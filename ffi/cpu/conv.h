// CPU convolution: forward, bwd_data (= transposed convolution) and bwd_filter, side by side.
//
// All three are implicit GEMMs on the packed-B engine of gemm.cc (C (+)= A * Bpacked, A read in
// place, B packed in panels of NR columns). Which operand plays A and which is packed depends on
// the layout, so that the big operand is read along its contiguous axis and the output tile is
// written straight into the result where possible:
//
//   forward NCHW:  y[n][co, pos]   = W[co, k]      * Col^T[k, pos]     A = weights (in place)
//   forward NHWC:  y[pos, co]      = Col[pos, k]   * W[k, co]          A = im2col rows of x
//                                                                      (x itself for 1x1)
//   bwd_filter NCHW: dW^T[k, o]    = Col^T[k, pos] * dY^T[pos, o]      summed over (n, pos)
//   bwd_filter NHWC: dW^T[o, k]    = dY^T[o, pos]  * Col[pos, k]
//
// with k = (ci, kh, kw) in NCHW and k = (kh, kw, ci) in NHWC, so that im2col copies contiguous
// runs: rows of an input plane in NCHW, channel vectors in NHWC. The im2col is never
// materialized whole: each task packs the K-slice (<= kKC) it is about to multiply, straight
// into the operand's format, from the tensor.
//
// bwd_data is the same engine as forward ("a pass"): dx[h] = sum over taps kh of
// dy[(h + pt - kh*d) / s] * w[kh], where only taps with (h + pt - kh*d) divisible by s count.
// Splitting dx rows by phase r = h mod s leaves, per phase, a stride-1 correlation of dy
// with the taps kh*d = r + pt (mod s) only (likewise along w): s^2 small dense convolutions instead
// of one over a zero-inserted dy, so no multiply-by-zero is ever issued. With stride 1 there is
// one phase and dx is written in place.
//
// Depthwise convolutions (one input and one output channel per group) skip the GEMM: a direct
// kernel vectorized along the contiguous axis (channels in NHWC, the row in NCHW).
//
// Half types (float16, bfloat16) are widened to float32 while packing, accumulate in float32
// and are rounded once when stored; float64 runs the same code in double. Bias is added in the
// epilogue (or used to initialize the output tile that the GEMM then accumulates into).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "conv_algo.h"
#include "conv_pack.h"
#include "cpu_common.h"
#include "depthwise.h"

namespace jaxconv {

// The storage types every CPU kernel is instantiated for.
#define JAXCONV_FOR_EACH_STORAGE_TYPE(X) X(float) X(double) X(f16_t) X(bf16_t)

// The convolution of one geometry, for storage type T. Its members are defined by job:
// conv_pack.cc (pass construction, operand packing), conv_epilogue.cc, conv_fwd.cc (running a
// pass, forward), conv_bwd_data.cc, conv_bwd_filter.cc.
template <typename T>
struct Conv {
  using Acc = typename Num<T>::acc;
  static constexpr int64_t NR = kPanelWidth<Acc>;
  static constexpr bool kSame = std::is_same_v<T, Acc>;
  static constexpr bool kDouble = std::is_same_v<T, double>;
  const ConvGeometry& g;
  Strides4 xs, ys, ws;
  int64_t Cg, Og;

  explicit Conv(const ConvGeometry& geo)
      : g(geo),
        xs(geo.x_strides()),
        ys(geo.y_strides()),
        ws(geo.w_strides()),
        Cg(geo.in_per_group()),
        Og(geo.out_per_group()) {}

  bool nhwc() const { return g.p.layout == kNHWC; }

  // ------------------------------------------------------------------------------------------
  // Pass construction.

  Pass forward_pass() const;

  // Phase (rh, rw) of bwd_data; see the file comment. Along h: dx rows h = rh + s*u, which
  // read dy row (h + pt - kh*d)/s through the taps kh whose division is exact (geometry.h's
  // bwd_data_phase_axis, shared with the CUDA passes). Phase rh >= H is empty.
  Pass bwd_data_phase(int64_t rh, int64_t rw) const;

  // Weight of pass output channel co, pass input channel ci, tap (th, tw), group grp.
  // forward: w[grp*Og + co, ci, kh, kw]; bwd_data: w[grp*Og + ci, co, kh, kw].
  Acc weight(const T* w, const Pass& ps, bool transposed, int64_t grp, int64_t co, int64_t ci,
             int64_t th, int64_t tw) const {
    int64_t o = transposed ? ci : co, c = transposed ? co : ci;
    return Num<T>::load(
        w[(grp * Og + o) * ws.n + c * ws.c + ps.kh_of[th] * ws.h + ps.kw_of[tw] * ws.w]);
  }

  // Index of (ci, th, tw) in a pass's reduction: NCHW (ci, th, tw), NHWC (th, tw, ci).
  static int64_t k_index(const Pass& ps, int64_t ci, int64_t th, int64_t tw) {
    return ps.layout == kNHWC ? (th * ps.TW() + tw) * ps.Cin + ci
                              : (ci * ps.TH() + th) * ps.TW() + tw;
  }

  // The pass's weights as the GEMM wants them, for every group:
  //   NCHW: A[grp][co][k] (rows of the output channels)                 size G*Cout*K
  //   NHWC: B panels[grp]: panel co/NR holds [k][co % NR]              size G*ceil(Cout/NR)*NR*K
  // Returns the packed weights (scratch<Acc, kWeights> of the calling thread, or w itself where
  // it already is the operand: forward NCHW, T == Acc).
  const Acc* pack_pass_weights(const ParallelRunner& pr, const Pass& ps, const T* w,
                               bool transposed) const;

  // Forward weights as B panels (the NHWC layout above) in either layout, from the
  // contiguous runs the weight layouts have: HWIO's output channels of one reduction index k
  // (k*O apart), OIHW's reduction row of one output channel (K long, transposed into the
  // panel's column). Size G*ceil(Cout/NR)*NR*K, written whole (tail columns zero).
  void pack_forward_panels(const ParallelRunner& pr, const Pass& ps, const T* w, Acc* out) const;

  // ------------------------------------------------------------------------------------------
  // Packing straight from the activations.

  // Row run r of input channel plane `plane` (already offset to image n, channel) through tap
  // (th, tw), into len consecutive elements at dst (NCHW: a row of the input plane).
  void gather_row_run(const Pass& ps, const T* in_nc, const Run& r, int64_t th, int64_t tw,
                      int64_t vlo, int64_t vhi, Acc* dst) const {
    int64_t ih = r.u * ps.step_h + ps.off_h[th];
    if (ih < 0 || ih >= ps.Hin) {
      zero(dst, r.len);
      return;
    }
    int64_t a = std::min(std::max(vlo, r.v), r.v + r.len),
            b = std::max(std::min(vhi, r.v + r.len), a);
    zero(dst, a - r.v);
    const T* row = in_nc + ih * ps.is.h + (a * ps.step_w + ps.off_w[tw]) * ps.is.w;
    copy_widen(dst + (a - r.v), row, b - a, ps.step_w * ps.is.w);
    zero(dst + (b - r.v), r.v + r.len - b);
  }

  // NCHW: Col^T rows k in [k0, k0 + kc) for grid positions `runs` (the block's columns), into
  // B panels (panel stride kc*NR) for group grp.
  void pack_colT_panels(const Pass& ps, const T* in, int64_t grp, int64_t k0, int64_t kc,
                        const std::vector<Run>& runs, Acc* Bp) const;

  // NHWC: Col rows (grid positions q0 ..) restricted to k in [k0, k0 + kc), row-major with
  // leading dimension kc; k = (th, tw, ci) so each tap contributes one contiguous channel run.
  void pack_col_rows(const Pass& ps, const T* in, int64_t grp, int64_t q0, int64_t rows, int64_t k0,
                     int64_t kc, Acc* A) const;

  // ------------------------------------------------------------------------------------------
  // Epilogues for tiles computed into scratch (half types, bwd_data phases, blocks that
  // straddle images): convert, add bias, scatter to the pass grid.

  T* out_cell(const Pass& ps, T* out, int64_t n, int64_t c, int64_t u, int64_t v) const {
    return out + n * ps.os.n + c * ps.os.c + (ps.h0 + u * ps.h_spacing) * ps.os.h +
           (ps.w0 + v * ps.w_spacing) * ps.os.w;
  }

  // NCHW tile C[co][col] (ldc) over the block's runs.
  void store_nchw(const Pass& ps, const Acc* C, int64_t ldc, const std::vector<Run>& runs,
                  int64_t grp, T* out, const T* bias) const;

  // NCHW output from a tile C[row][co] (ldc) for grid positions q0 .. q0 + rows (the indirect
  // pass's tiles).
  void store_rows_nchw(const Pass& ps, const Acc* C, int64_t ldc, int64_t q0, int64_t rows,
                       int64_t grp, T* out, const T* bias) const;

  // NHWC tile C[row][co] (ldc) for grid positions q0 .. q0 + rows.
  void store_nhwc(const Pass& ps, const Acc* C, int64_t ldc, int64_t q0, int64_t rows, int64_t grp,
                  T* out, const T* bias) const;

  // ------------------------------------------------------------------------------------------
  // Running a pass.

  // NCHW: per task, a block of grid columns (positions) of one group; A = weights.
  void run_pass_nchw(const ParallelRunner& pr, const Pass& ps, const T* in, const Acc* A,
                     const T* bias, T* out) const;

  // NHWC: per task, a block of grid rows (positions, across images) of one group; B = weights.
  void run_pass_nhwc(const ParallelRunner& pr, const Pass& ps, const T* in, const Acc* Bw,
                     const T* bias, T* out) const;

  // The forward pass with A read straight from the activations (gemm_indirect; float32 and
  // float64): rows are output positions, B = pack_forward_panels' weights. Taken when every tap
  // of every position lands inside the input (no padding to read as zeros) and, in NCHW, when
  // packing the im2col would cost more than the GEMM (indirect_pass). NCHW computes its tiles
  // [position][channel] into scratch and stores them transposed (in place for 1x1 output
  // planes, where y[n][co] is the tile's layout).
  bool indirect_pass(const Pass& ps, bool transposed) const;
  void run_pass_indirect(const ParallelRunner& pr, const Pass& ps, const T* in, const Acc* Bw,
                         const T* bias, T* out) const;

  void run_pass(const ParallelRunner& pr, const Pass& ps, const T* in, const T* w, bool transposed,
                const T* bias, T* out) const;

  // ------------------------------------------------------------------------------------------
  // The three kernels.

  // The direct depthwise kernels skip taps that fall into the padding, where the GEMM passes
  // multiply the padded zeros like lax does. The two differ only for a non-finite weight
  // (inf * 0 = NaN), so such weights take the GEMM passes.
  bool use_depthwise(const T* w) const {
    if (!depthwise_applicable(g)) return false;
    const int64_t count = g.O * Cg * g.KH * g.KW;
    for (int64_t i = 0; i < count; ++i)
      if (!std::isfinite(double(Num<T>::load(w[i])))) return false;
    return true;
  }

  // y = conv(x, w) + bias
  void forward(const ParallelRunner& pr, const T* x, const T* w, const T* bias, T* y) const;

  // dx = conv_transpose(dy, w) + bias: one pass per stride phase, or the scatter form below
  // when dy is much smaller than dx.
  void backward_data(const ParallelRunner& pr, const T* dy, const T* w, const T* bias, T* dx) const;

  // The phase passes read every dx cell's taps, including those that fall into dy's padding:
  // about H*W/(sh*sw) cells x all taps, against the forward's OH*OW x all taps. When the ratio
  // is large (a kernel covering most of a small image: LeNet's 5x5 layers, C5 has a 1x1 output)
  // the scatter form does exactly the forward's work instead.
  //
  // It is also the better form when dx has few channels per group and dy many (an input layer:
  // the ResNet stem is 3 -> 64, 7x7/2). Per dy position and tap the phases pack Og values of
  // dy into their im2col and run a GEMM whose output width is Cg (3 of a 16-wide panel); the
  // scatter form runs a GEMM of width Cg*KH*KW with reduction Og (dy read in place in NHWC) and
  // adds only Cg values per position and tap into dx.
  bool prefer_col2im() const {
    if (g.KH * g.KW > 1 && Cg < kFewChannels && 2 * Cg <= Og) return true;
    return 10 * g.H * g.W > 12 * g.p.stride_h * g.p.stride_w * g.OH * g.OW;
  }

  // Channels per group below which a GEMM over channels alone is too narrow for the 16-wide
  // micro-kernel panels (and per-tap copies of that many channels too short to pay off).
  static constexpr int64_t kFewChannels = 16;

  // Scatter form: dCol[pos, k] = sum_o dY[pos, o] * W[o, k] (a GEMM per block of dy positions),
  // then every dCol element is added to the dx cell the forward read it from (col2im). Tasks
  // own whole (image, group) slabs of dx, so no two tasks add into the same cell.
  void backward_data_col2im(const ParallelRunner& pr, const T* dy, const T* w, const T* bias,
                            T* dx) const;

  // dw = sum over images and positions of the im2col of x against dy (see the file comment).
  //
  // Positions (n, oh, ow), flattened, are cut into equal slices of at most kKC; dy is first packed
  // once per slice into the GEMM operand it plays (NCHW: B panels of dY^T; NHWC: A rows of
  // dY^T). Tasks then own a block of the im2col side (NCHW: rows k of dW^T; NHWC: columns k)
  // and a contiguous range of slices; when there are too few blocks to keep every thread busy
  // the slices are split into ranges summed into separate partial buffers, added at the end in
  // a fixed order, so results never depend on scheduling.
  void backward_filter(const ParallelRunner& pr, const T* x, const T* dy, T* dw) const;

  // NHWC bwd_filter: im2col columns [k0, k0 + kn) (k = (kh, kw, ci)) for positions q0 .. q0+pc
  // as B panels [col / NR][pos][col % NR] (panel stride pc*NR), zero-padded to whole panels.
  void pack_col_panels_nhwc(const Pass& ps, const T* x, int64_t grp, int64_t q0, int64_t pc,
                            int64_t k0, int64_t kn, Acc* Bp) const;
};

}  // namespace jaxconv
