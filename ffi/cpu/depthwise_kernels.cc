// Depthwise convolution (one input and one output channel per group: groups = C = O), the three
// kernels computed directly instead of as degenerate GEMMs (a GEMM per channel would have a
// single row or column).
//
//   y[n, c, oh, ow]  = bias[c] + sum_{kh, kw} x[n, c, oh*s - pt + kh*d, ow*s - pl + kw*d] * w[c,
//   kh, kw] dx[n, c, h, w]   = bias[c] + sum of dy[n, c, oh, ow] * w[c, kh, kw] over the (oh, ow,
//   kh, kw)
//                      whose forward tap reads (h, w)
//   dw[c, kh, kw]    = sum_{n, oh, ow} dy[n, c, oh, ow] * x[n, c, oh*s - pt + kh*d, ...]
//
// NHWC vectorizes across channels (contiguous): a block of kCB channels of one output cell is
// accumulated in registers over the taps. NCHW vectorizes along a row: each input plane is
// first copied, zero-padded, into s "phase" rows per input row, so that the columns a tap reads
// for consecutive outputs (ow*s + kw*d) become consecutive elements of one phase row; every
// kernel is then a sequence of contiguous multiply-adds (or dot products, for dw).
//
// Compiled once per capability (kernel_table.h); depthwise.h calls the table chosen for this CPU.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "kernel_table.h"
#include "simd.h"

namespace jaxconv::JAXCONV_CPU_CAPABILITY {
namespace {

constexpr int64_t kCB = 32;  // NHWC channels per register block (4 AVX vectors of floats)

template <typename T>
using AccOf = typename Num<T>::acc;

// A full NHWC channel block as vectors of the accumulator type (simd.h): 4 of float, 8 of double.
template <typename Acc>
constexpr int64_t kBlockVecs = kCB / kLanes<Acc>;

// The taps of one output row u (or column) that land inside the input, and where they read:
// forward i = u*s - pad + t*d. These lists are tiny (<= KH entries), built per row.
struct TapList {
  int64_t n = 0;
  int64_t in[64], tap[64];
};

// Forward taps of output position o along one axis (input length `size`).
inline void forward_taps(int64_t o, int64_t s, int64_t pad, int64_t d, int64_t k, int64_t size,
                         TapList* out) {
  out->n = 0;
  const TapRange taps = window_taps(o, s, pad, d, k, size);
  for (int64_t t = taps.lo; t < taps.hi; ++t) {
    out->in[out->n] = o * s - pad + t * d;
    out->tap[out->n++] = t;
  }
}

// bwd_data taps of input position i: output positions o with o*s - pad + t*d = i.
inline void backward_taps(int64_t i, int64_t s, int64_t pad, int64_t d, int64_t k, int64_t out_size,
                          TapList* out) {
  out->n = 0;
  // Only the taps of i's stride phase divide exactly (geometry.h's phase_taps).
  const PhaseTaps taps = phase_taps(i, s, pad, d, k);
  for (int64_t q = 0; q < taps.count; ++q) {
    const int64_t t = taps.first + q * taps.step;
    const int64_t num = i + pad - t * d;
    if (num < 0) continue;
    const int64_t o = num / s;
    if (o < out_size) {
      out->in[out->n] = o;
      out->tap[out->n++] = t;
    }
  }
}

template <typename T>
struct DW {
  using Acc = AccOf<T>;
  using VA = V<Acc>;
  const ConvGeometry& g;
  Strides4 xs, ys;
  int64_t C, KH, KW, s_h, s_w, d_h, d_w, pt, pl;

  explicit DW(const ConvGeometry& geo)
      : g(geo),
        xs(geo.x_strides()),
        ys(geo.y_strides()),
        C(geo.C),
        KH(geo.KH),
        KW(geo.KW),
        s_h(geo.p.stride_h),
        s_w(geo.p.stride_w),
        d_h(geo.p.dilation_h),
        d_w(geo.p.dilation_w),
        pt(geo.p.pad_top),
        pl(geo.p.pad_left) {}

  // Weights as [kh][kw][c] (Acc), the order both layouts' inner loops want.
  std::vector<Acc> weights_tap_major(const T* w) const {
    std::vector<Acc> out(KH * KW * C);
    const Strides4 ws = g.w_strides();  // (o, i, kh, kw); i is always 0 here
    for (int64_t c = 0; c < C; ++c)
      for (int64_t kh = 0; kh < KH; ++kh)
        for (int64_t kw = 0; kw < KW; ++kw)
          out[(kh * KW + kw) * C + c] = Num<T>::load(w[c * ws.n + kh * ws.h + kw * ws.w]);
    return out;
  }

  // ---------------------------------------------------------------------------------------------
  // NHWC: out[n, u, v, c] = b[c] + sum over (rows, cols) tap pairs of in[n, ri, ci, c] * W[t][c].
  // `rows`/`cols` give, per output row / column, the input row / column and kernel tap of each
  // contributing tap. Used by forward (in = x) and bwd_data (in = dy, gather form).
  template <typename RowTaps, typename ColTaps>
  void nhwc_gather(const ParallelRunner& pr, const T* in, Strides4 is, int64_t U, int64_t V,
                   const Acc* W, const T* bias, T* out, Strides4 os, RowTaps row_taps,
                   ColTaps col_taps) const {
    std::vector<TapList> cols(V);
    for (int64_t v = 0; v < V; ++v) col_taps(v, &cols[v]);
    // Columns v and v+1 are computed together, sharing each weight load, when they read the same
    // taps at input columns a constant `pair_step` apart (all interior columns of a stride-1
    // layer, and of each stride phase): 1.5 loads per FMA instead of 2.
    std::vector<int64_t> pair_step(V, 0);  // 0: no pair starts at v
    for (int64_t v = 0; v + 1 < V; ++v) {
      const TapList &a = cols[v], &b = cols[v + 1];
      if (a.n == 0 || a.n != b.n) continue;
      const int64_t step = b.in[0] - a.in[0];
      bool same = step > 0;
      for (int64_t j = 0; same && j < a.n; ++j)
        same = a.tap[j] == b.tap[j] && b.in[j] - a.in[j] == step;
      if (same) pair_step[v] = step;
    }
    const int64_t cblocks = (C + kCB - 1) / kCB;
    // Two columns hold 2 * kBlockVecs accumulators: 8 for float, too many registers for double.
    constexpr bool kPairs = kBlockVecs<Acc> <= 4;
    pr.run(g.N * U, [&](int64_t task) {
      const int64_t n = task / U, u = task % U;
      TapList rows;
      row_taps(u, &rows);
      for (int64_t cb = 0; cb < cblocks; ++cb) {
        const int64_t c0 = cb * kCB, cn = std::min(kCB, C - c0);
        Acc b[kCB];
        for (int64_t c = 0; c < kCB; ++c)
          b[c] = (bias && c < cn) ? Num<T>::load(bias[c0 + c]) : Acc(0);
        for (int64_t v = 0; v < V; ++v) {
          const TapList& cl = cols[v];
          T* dst = out + n * os.n + u * os.h + v * os.w + c0;
          if (kPairs && cn == kCB && pair_step[v] != 0) {
            nhwc_gather_block<2>(in + n * is.n + c0, is, rows, cl, W + c0, b, dst,
                                 pair_step[v] * is.w, os.w);
            ++v;  // v+1 is done
          } else if (cn == kCB) {
            nhwc_gather_block<1>(in + n * is.n + c0, is, rows, cl, W + c0, b, dst, 0, 0);
          } else {
            Acc acc[kCB];
            for (int64_t c = 0; c < cn; ++c) acc[c] = b[c];
            for (int64_t i = 0; i < rows.n; ++i)
              for (int64_t j = 0; j < cl.n; ++j) {
                const T* src = in + n * is.n + rows.in[i] * is.h + cl.in[j] * is.w + c0;
                const Acc* wt = W + (rows.tap[i] * KW + cl.tap[j]) * C + c0;
                for (int64_t c = 0; c < cn; ++c) acc[c] += Num<T>::load(src[c]) * wt[c];
              }
            for (int64_t c = 0; c < cn; ++c) dst[c] = Num<T>::store(acc[c]);
          }
        }
      }
    });
  }

  // kCols (1 or 2) adjacent output cells of one full channel block, in registers over all their
  // taps; cell j reads its taps j*in_next elements after cell 0's and is stored j*out_next after
  // it. `in`, `W` and `dst` point at the block's first channel; `b` holds its kCB biases.
  template <int kCols>
  __attribute__((always_inline)) void nhwc_gather_block(const T* in, Strides4 is,
                                                        const TapList& rows, const TapList& cl,
                                                        const Acc* W, const Acc* b, T* dst,
                                                        int64_t in_next, int64_t out_next) const {
    constexpr int64_t kNV = kBlockVecs<Acc>, kL = kLanes<Acc>;
    VA acc[kCols][kNV];
#pragma GCC unroll 8
    for (int64_t k = 0; k < kNV; ++k)
      for (int j = 0; j < kCols; ++j) acc[j][k] = load(b + k * kL);
    for (int64_t i = 0; i < rows.n; ++i) {
      const T* src_row = in + rows.in[i] * is.h;
      const Acc* w_row = W + rows.tap[i] * KW * C;
      for (int64_t t = 0; t < cl.n; ++t) {
        const T* src = src_row + cl.in[t] * is.w;
        const Acc* wt = w_row + cl.tap[t] * C;
#pragma GCC unroll 8
        for (int64_t k = 0; k < kNV; ++k) {
          const VA wk = load(wt + k * kL);
#pragma GCC unroll 2
          for (int j = 0; j < kCols; ++j) acc[j][k] += load_widen(src + j * in_next + k * kL) * wk;
        }
      }
    }
#pragma GCC unroll 8
    for (int64_t k = 0; k < kNV; ++k)
#pragma GCC unroll 2
      for (int j = 0; j < kCols; ++j) store_narrow(dst + j * out_next + k * kL, acc[j][k]);
  }

  // NHWC dw: per task a block of channels and a contiguous range of images, partial sums added
  // in a fixed order afterwards. For each output row u, row tap kh and column tap kw, the
  // products dy[n, u, v, c] * x[n, u*s - pt + kh*d, v*s - pl + kw*d, c] are summed in registers
  // over the columns v where that tap lands inside x (geometry.h's tap_outputs), then added once
  // into the tap's partial sums.
  void nhwc_filter(const ParallelRunner& pr, const T* x, const T* dy, T* dw) const {
    const int64_t cblocks = (C + kCB - 1) / kCB, taps = KH * KW;
    int64_t splits = std::max<int64_t>(1, (4 * pr.num_threads() + cblocks - 1) / cblocks);
    splits = std::min(splits, std::max<int64_t>(g.N, 1));
    std::vector<Acc> partial(splits * taps * C, Acc(0));
    std::vector<OutputRange> tap_cols(KW);
    for (int64_t kw = 0; kw < KW; ++kw) tap_cols[kw] = tap_outputs(kw, s_w, pl, d_w, g.W, g.OW);
    pr.run(cblocks * splits, [&](int64_t task) {
      const int64_t cb = task / splits, sp = task % splits;
      const int64_t c0 = cb * kCB, cn = std::min(kCB, C - c0);
      Acc* part = partial.data() + sp * taps * C;
      for (int64_t n = g.N * sp / splits; n < g.N * (sp + 1) / splits; ++n)
        for (int64_t u = 0; u < g.OH; ++u) {
          TapList rows;
          forward_taps(u, s_h, pt, d_h, KH, g.H, &rows);
          const T* gy_row = dy + n * ys.n + u * ys.h + c0;
          for (int64_t i = 0; i < rows.n; ++i) {
            const T* x_row = x + n * xs.n + rows.in[i] * xs.h + c0;
            for (int64_t kw = 0; kw < KW; ++kw) {
              const OutputRange vs = tap_cols[kw];
              const int64_t col0 = kw * d_w - pl;  // x column of output column v: v*s + col0
              Acc* acc = part + (rows.tap[i] * KW + kw) * C + c0;
              if (cn == kCB) {
                constexpr int64_t kNV = kBlockVecs<Acc>, kL = kLanes<Acc>;
                VA sum[kNV] = {};
                for (int64_t v = vs.lo; v < vs.hi; ++v) {
                  const T* gy = gy_row + v * ys.w;
                  const T* src = x_row + (v * s_w + col0) * xs.w;
#pragma GCC unroll 8
                  for (int64_t k = 0; k < kNV; ++k)
                    sum[k] += load_widen(gy + k * kL) * load_widen(src + k * kL);
                }
#pragma GCC unroll 8
                for (int64_t k = 0; k < kNV; ++k) store(acc + k * kL, load(acc + k * kL) + sum[k]);
              } else {
                for (int64_t v = vs.lo; v < vs.hi; ++v) {
                  const T* gy = gy_row + v * ys.w;
                  const T* src = x_row + (v * s_w + col0) * xs.w;
                  for (int64_t c = 0; c < cn; ++c)
                    acc[c] += Num<T>::load(gy[c]) * Num<T>::load(src[c]);
                }
              }
            }
          }
        }
    });
    const Strides4 ws = g.w_strides();
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t c = 0; c < C; ++c) {
        Acc v = 0;
        for (int64_t sp = 0; sp < splits; ++sp) v += partial[(sp * taps + t) * C + c];
        dw[c * ws.n + (t / KW) * ws.h + (t % KW) * ws.w] = Num<T>::store(v);
      }
  }

  // ---------------------------------------------------------------------------------------------
  // NCHW. A plane of H rows is held as phase rows: P[h][r][j] = plane[h][j*s + r - pad_w]
  // (zero outside), phase length L, so the input column ow*s + kw*d - pad of output column ow
  // is P[h][(kw*d) % s][ow + (kw*d) / s].

  int64_t phase_len() const {
    // Columns up to (OW - 1)*s + (KW - 1)*d of the padded row, and all W input columns.
    int64_t span = std::max((g.OW - 1) * s_w + (KW - 1) * d_w + 1, pl + g.W);
    return (span + s_w - 1) / s_w;
  }

  // Input columns w feeding phase r: padded column j*s + r = w + pl, i.e. w = j*s + r - pl for
  // j in [first_j(r), end_j(r)) (inside [0, W)).
  int64_t first_j(int64_t r) const { return std::max<int64_t>(0, ceil_div(pl - r, s_w)); }
  int64_t end_j(int64_t r, int64_t L) const {
    return std::min<int64_t>(L, floor_div(g.W - 1 + pl - r, s_w) + 1);
  }

  void split_plane(const T* plane, Strides4 st, int64_t H, int64_t L, Acc* P) const {
    for (int64_t h = 0; h < H; ++h) {
      const T* row = plane + h * st.h;
      for (int64_t r = 0; r < s_w; ++r) {
        Acc* ph = P + (h * s_w + r) * L;
        const int64_t j0 = first_j(r), j1 = std::max(j0, end_j(r, L));
        std::fill(ph, ph + j0, Acc(0));
        const T* src = row + (j0 * s_w + r - pl) * st.w;
        for (int64_t j = j0; j < j1; ++j) ph[j] = Num<T>::load(src[(j - j0) * s_w * st.w]);
        std::fill(ph + j1, ph + L, Acc(0));
      }
    }
  }

  // y (forward) for one (n, c) plane.
  void nchw_forward_plane(const T* x, const Acc* wc, Acc b, T* y, Acc* P, Acc* row) const {
    const int64_t L = phase_len();
    split_plane(x, xs, g.H, L, P);
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      for (int64_t ow = 0; ow < g.OW; ++ow) row[ow] = b;
      for (int64_t kh = 0; kh < KH; ++kh) {
        int64_t ih = oh * s_h - pt + kh * d_h;
        if (ih < 0 || ih >= g.H) continue;
        for (int64_t kw = 0; kw < KW; ++kw) {
          const Acc wv = wc[kh * KW + kw];
          const Acc* src = P + (ih * s_w + (kw * d_w) % s_w) * L + (kw * d_w) / s_w;
          for (int64_t ow = 0; ow < g.OW; ++ow) row[ow] += wv * src[ow];
        }
      }
      T* dst = y + oh * ys.h;
      for (int64_t ow = 0; ow < g.OW; ++ow) dst[ow] = Num<T>::store(row[ow]);
    }
  }

  // dx (bwd_data) for one (n, c) plane: scatter dy rows into the phase rows of dx (the adjoint
  // of the forward's reads), then undo the phase split.
  void nchw_backward_data_plane(const T* dy, const Acc* wc, Acc b, T* dx, Acc* P) const {
    const int64_t L = phase_len();
    std::fill(P, P + g.H * s_w * L, Acc(0));
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const T* gy = dy + oh * ys.h;
      for (int64_t kh = 0; kh < KH; ++kh) {
        int64_t ih = oh * s_h - pt + kh * d_h;
        if (ih < 0 || ih >= g.H) continue;
        for (int64_t kw = 0; kw < KW; ++kw) {
          const Acc wv = wc[kh * KW + kw];
          Acc* dst = P + (ih * s_w + (kw * d_w) % s_w) * L + (kw * d_w) / s_w;
          for (int64_t ow = 0; ow < g.OW; ++ow) dst[ow] += wv * Num<T>::load(gy[ow]);
        }
      }
    }
    for (int64_t h = 0; h < g.H; ++h) {
      T* row = dx + h * xs.h;
      for (int64_t r = 0; r < s_w; ++r) {
        const Acc* ph = P + (h * s_w + r) * L;
        const int64_t j0 = first_j(r), j1 = std::max(j0, end_j(r, L));
        T* dst = row + (j0 * s_w + r - pl) * xs.w;
        for (int64_t j = j0; j < j1; ++j) dst[(j - j0) * s_w * xs.w] = Num<T>::store(ph[j] + b);
      }
    }
  }

  // dw contributions of one (n, c) plane: dot products of dy rows with phase rows of x.
  void nchw_filter_plane(const T* x, const T* dy, Acc* dwc, Acc* P, Acc* gy) const {
    const int64_t L = phase_len();
    split_plane(x, xs, g.H, L, P);
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      for (int64_t ow = 0; ow < g.OW; ++ow) gy[ow] = Num<T>::load(dy[oh * ys.h + ow]);
      for (int64_t kh = 0; kh < KH; ++kh) {
        int64_t ih = oh * s_h - pt + kh * d_h;
        if (ih < 0 || ih >= g.H) continue;
        for (int64_t kw = 0; kw < KW; ++kw) {
          const Acc* src = P + (ih * s_w + (kw * d_w) % s_w) * L + (kw * d_w) / s_w;
          // 8 partial sums so the loop vectorizes without reassociating a single sum.
          Acc part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          int64_t ow = 0;
          for (; ow + 8 <= g.OW; ow += 8)
#pragma GCC unroll 8
            for (int64_t i = 0; i < 8; ++i) part[i] += gy[ow + i] * src[ow + i];
          Acc sum = 0;
          for (; ow < g.OW; ++ow) sum += gy[ow] * src[ow];
          for (int64_t i = 0; i < 8; ++i) sum += part[i];
          dwc[kh * KW + kw] += sum;
        }
      }
    }
  }

  // ---------------------------------------------------------------------------------------------

  void forward(const ParallelRunner& pr, const T* x, const T* w, const T* bias, T* y) const {
    std::vector<Acc> W = weights_tap_major(w);
    if (g.p.layout == kNHWC) {
      auto rows = [&](int64_t u, TapList* t) { forward_taps(u, s_h, pt, d_h, KH, g.H, t); };
      auto cols = [&](int64_t v, TapList* t) { forward_taps(v, s_w, pl, d_w, KW, g.W, t); };
      nhwc_gather(pr, x, xs, g.OH, g.OW, W.data(), bias, y, ys, rows, cols);
      return;
    }
    const int64_t L = phase_len();
    pr.run(g.N * C, [&](int64_t task) {
      const int64_t n = task / C, c = task % C;
      thread_local std::vector<Acc> buf;
      buf.resize(g.H * s_w * L + g.OW);
      thread_local std::vector<Acc> wc;
      wc.resize(KH * KW);
      for (int64_t t = 0; t < KH * KW; ++t) wc[t] = W[t * C + c];
      nchw_forward_plane(x + n * xs.n + c * xs.c, wc.data(), bias ? Num<T>::load(bias[c]) : Acc(0),
                         y + n * ys.n + c * ys.c, buf.data(), buf.data() + g.H * s_w * L);
    });
  }

  void backward_data(const ParallelRunner& pr, const T* dy, const T* w, const T* bias,
                     T* dx) const {
    std::vector<Acc> W = weights_tap_major(w);
    if (g.p.layout == kNHWC) {
      auto rows = [&](int64_t h, TapList* t) { backward_taps(h, s_h, pt, d_h, KH, g.OH, t); };
      auto cols = [&](int64_t x, TapList* t) { backward_taps(x, s_w, pl, d_w, KW, g.OW, t); };
      nhwc_gather(pr, dy, ys, g.H, g.W, W.data(), bias, dx, xs, rows, cols);
      return;
    }
    const int64_t L = phase_len();
    pr.run(g.N * C, [&](int64_t task) {
      const int64_t n = task / C, c = task % C;
      thread_local std::vector<Acc> buf;
      buf.resize(g.H * s_w * L);
      thread_local std::vector<Acc> wc;
      wc.resize(KH * KW);
      for (int64_t t = 0; t < KH * KW; ++t) wc[t] = W[t * C + c];
      nchw_backward_data_plane(dy + n * ys.n + c * ys.c, wc.data(),
                               bias ? Num<T>::load(bias[c]) : Acc(0), dx + n * xs.n + c * xs.c,
                               buf.data());
    });
  }

  void backward_filter(const ParallelRunner& pr, const T* x, const T* dy, T* dw) const {
    if (g.p.layout == kNHWC) {
      nhwc_filter(pr, x, dy, dw);
      return;
    }
    const int64_t L = phase_len(), taps = KH * KW;
    // Tasks: (channel, range of images); ranges summed in a fixed order.
    int64_t splits = std::max<int64_t>(1, (4 * pr.num_threads() + C - 1) / C);
    splits = std::min(splits, std::max<int64_t>(g.N, 1));
    std::vector<Acc> partial(splits * C * taps, Acc(0));
    pr.run(C * splits, [&](int64_t task) {
      const int64_t c = task / splits, sp = task % splits;
      thread_local std::vector<Acc> buf;
      buf.resize(g.H * s_w * L + g.OW);
      Acc* dwc = partial.data() + (sp * C + c) * taps;
      for (int64_t n = g.N * sp / splits; n < g.N * (sp + 1) / splits; ++n)
        nchw_filter_plane(x + n * xs.n + c * xs.c, dy + n * ys.n + c * ys.c, dwc, buf.data(),
                          buf.data() + g.H * s_w * L);
    });
    const Strides4 ws = g.w_strides();
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < taps; ++t) {
        Acc v = 0;
        for (int64_t sp = 0; sp < splits; ++sp) v += partial[(sp * C + c) * taps + t];
        dw[c * ws.n + (t / KW) * ws.h + (t % KW) * ws.w] = Num<T>::store(v);
      }
  }
};

template <typename T>
void forward(const ParallelRunner& pr, const ConvGeometry& g, const T* x, const T* w, const T* bias,
             T* y) {
  DW<T>(g).forward(pr, x, w, bias, y);
}

template <typename T>
void backward_data(const ParallelRunner& pr, const ConvGeometry& g, const T* dy, const T* w,
                   const T* bias, T* dx) {
  DW<T>(g).backward_data(pr, dy, w, bias, dx);
}

template <typename T>
void backward_filter(const ParallelRunner& pr, const ConvGeometry& g, const T* x, const T* dy,
                     T* dw) {
  DW<T>(g).backward_filter(pr, x, dy, dw);
}

template <typename T>
DepthwiseKernels<T> depthwise_kernels() {
  return {forward<T>, backward_data<T>, backward_filter<T>};
}

}  // namespace

void add_depthwise_kernels(KernelTable* table) {
  table->depthwise_f32 = depthwise_kernels<float>();
  table->depthwise_f64 = depthwise_kernels<double>();
  table->depthwise_f16 = depthwise_kernels<f16_t>();
  table->depthwise_bf16 = depthwise_kernels<bf16_t>();
}

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY
