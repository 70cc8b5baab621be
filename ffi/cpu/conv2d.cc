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
// Splitting dx rows by phase r = (h + pt) mod s leaves, per phase, a stride-1 correlation of dy
// with the taps kh*d = r (mod s) only (likewise along w): s^2 small dense convolutions instead
// of one over a zero-inserted dy, so no multiply-by-zero is ever issued. With stride 1 there is
// one phase and dx is written in place.
//
// Depthwise convolutions (one input and one output channel per group) skip the GEMM: a direct
// kernel vectorized along the contiguous axis (channels in NHWC, the row in NCHW).
//
// Half types (float16, bfloat16) are widened to float32 while packing, accumulate in float32
// and are rounded once when stored; float64 runs the same code in double. Bias is added in the
// epilogue (or used to initialize the output tile that the GEMM then accumulates into).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "depthwise.h"
#include "winograd.h"

namespace jaxconv {
namespace {

// Per-thread scratch that grows but is never freed between calls: packing buffers are reused by
// every tile a thread processes.
template <typename A, int Slot>
A* scratch(size_t n) {
  thread_local std::vector<A> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// K-slice of one GEMM call: a packed B panel (kKC x NR) stays in L1, an A block in L2.
constexpr int64_t kKC = 256;

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Copies `len` elements src[i*stride] (widened to the accumulation type) into dst.
// Packing copies many short runs (a few channels, a few taps); below 32 elements they are done
// inline in 16-byte pieces, since a libc call per run costs more than the copy. (The empty asm
// keeps GCC from turning the tail loop back into a call.)
template <typename T, typename Acc>
inline void copy_widen(Acc* dst, const T* src, int64_t len, int64_t stride) {
  if constexpr (std::is_same_v<T, Acc>) {
    if (stride == 1) {
      if (len > 32) {
        std::memcpy(dst, src, sizeof(Acc) * len);
        return;
      }
      constexpr int64_t kPiece = 16 / sizeof(Acc);
      for (; len >= kPiece; len -= kPiece, dst += kPiece, src += kPiece) std::memcpy(dst, src, 16);
      for (; len > 0; --len) {
        asm volatile("");
        *dst++ = *src++;
      }
      return;
    }
  }
  for (int64_t i = 0; i < len; ++i) dst[i] = Num<T>::load(src[i * stride]);
}

template <typename Acc>
inline void zero(Acc* dst, int64_t len) {
  if (len > 32) {
    std::memset(dst, 0, sizeof(Acc) * len);
    return;
  }
  constexpr int64_t kPiece = 16 / sizeof(Acc);
  for (; len >= kPiece; len -= kPiece, dst += kPiece) std::memset(dst, 0, 16);
  for (; len > 0; --len) {
    asm volatile("");
    *dst++ = Acc(0);
  }
}

// A run of consecutive positions (n, u, v .. v + len - 1) of a pass grid; `at` is the index of
// its first position within the block being packed.
struct Run {
  int64_t at, n, u, v, len;
};

// Positions [q0, q1) of an N x U x V grid flattened as q = (n*U + u)*V + v, split into runs
// that stay within one grid row.
inline void grid_runs(int64_t q0, int64_t q1, int64_t U, int64_t V, std::vector<Run>* runs) {
  runs->clear();
  int64_t nu = q0 / V, v = q0 % V;
  for (int64_t q = q0; q < q1;) {
    int64_t len = std::min(V - v, q1 - q);
    runs->push_back({q - q0, nu / U, nu % U, v, len});
    q += len;
    ++nu;
    v = 0;
  }
}

// One convolution "pass" over activations `in` (N, G*Cin, Hin, Win) into `out`:
//
//   out[n, g*Cout + co, h0 + u*hs, w0 + v*ws] = bias + sum over (ci, th, tw) of
//       in[n, g*Cin + ci, u*step_h + off_h[th], v*step_w + off_w[tw]] * weight(g, co, ci, th, tw)
//
// for (u, v) in U x V; taps reading outside the input read zero. Forward: taps = the kernel,
// off = k*d - pad, step = stride, the grid is all of y. A bwd_data phase: taps = the kernel
// cells of that phase, step 1, the grid = the dx cells of that phase (hs = ws = stride).
struct Pass {
  int64_t N, G, Cin, Hin, Win, Cout, U, V;
  int64_t h0, hs, w0, ws;
  int64_t step_h, step_w;
  std::vector<int64_t> off_h, off_w;  // per tap along h / w
  std::vector<int64_t> kh_of, kw_of;  // the kernel cell a tap multiplies with
  Strides4 is, os;
  int64_t layout;
  bool dense;  // the grid is the whole output: out[n, c, u, v]

  int64_t TH() const { return int64_t(off_h.size()); }
  int64_t TW() const { return int64_t(off_w.size()); }
  int64_t K() const { return Cin * TH() * TW(); }
  // Valid grid columns of tap tw: 0 <= v*step_w + off_w[tw] < Win  <=>  v in [lo, hi).
  void v_range(int64_t tw, int64_t* lo, int64_t* hi) const {
    *lo = std::max<int64_t>(0, ceil_div(-off_w[tw], step_w));
    *hi = std::min<int64_t>(V, floor_div(Win - 1 - off_w[tw], step_w) + 1);
    if (*hi < *lo) *hi = *lo;
  }
};

template <typename T>
struct Conv {
  using Acc = typename Num<T>::acc;
  static constexpr int64_t NR = kPanelWidth<Acc>;
  static constexpr bool kSame = std::is_same_v<T, Acc>;
  const ConvGeometry& g;
  Strides4 xs, ys, ws;
  int64_t Cg, Og;

  explicit Conv(const ConvGeometry& geo)
      : g(geo), xs(geo.x_strides()), ys(geo.y_strides()), ws(geo.w_strides()),
        Cg(geo.in_per_group()), Og(geo.out_per_group()) {}

  bool nhwc() const { return g.p.layout == kNHWC; }

  // ------------------------------------------------------------------------------------------
  // Pass construction.

  Pass forward_pass() const {
    Pass ps;
    ps.N = g.N; ps.G = g.groups(); ps.Cin = Cg; ps.Hin = g.H; ps.Win = g.W; ps.Cout = Og;
    ps.U = g.OH; ps.V = g.OW; ps.h0 = 0; ps.hs = 1; ps.w0 = 0; ps.ws = 1;
    ps.step_h = g.p.stride_h; ps.step_w = g.p.stride_w;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      ps.off_h.push_back(kh * g.p.dilation_h - g.p.pad_top);
      ps.kh_of.push_back(kh);
    }
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      ps.off_w.push_back(kw * g.p.dilation_w - g.p.pad_left);
      ps.kw_of.push_back(kw);
    }
    ps.is = xs; ps.os = ys; ps.layout = g.p.layout; ps.dense = true;
    return ps;
  }

  // Phase (rh, rw) of bwd_data; see the file comment. Along h: dx row h = s*u' + r - pt for
  // integer u'; tap kh belongs to phase r when kh*d = r (mod s), and reads dy row
  // u' - (kh*d - r)/s. The grid starts at the first such row inside dx.
  Pass bwd_data_phase(int64_t rh, int64_t rw) const {
    Pass ps;
    ps.N = g.N; ps.G = g.groups(); ps.Cin = Og; ps.Hin = g.OH; ps.Win = g.OW; ps.Cout = Cg;
    ps.step_h = 1; ps.step_w = 1;
    auto axis = [](int64_t r, int64_t s, int64_t pad, int64_t d, int64_t k, int64_t size,
                   int64_t* first, int64_t* count, std::vector<int64_t>* off,
                   std::vector<int64_t>* cell) {
      int64_t u_lo = ceil_div(pad - r, s), u_hi = floor_div(size - 1 + pad - r, s);
      *first = s * u_lo + r - pad;
      *count = std::max<int64_t>(0, u_hi - u_lo + 1);
      for (int64_t t = 0; t < k; ++t) {
        if (((t * d - r) % s + s) % s != 0) continue;
        off->push_back(u_lo - (t * d - r) / s);
        cell->push_back(t);
      }
    };
    axis(rh, g.p.stride_h, g.p.pad_top, g.p.dilation_h, g.KH, g.H, &ps.h0, &ps.U, &ps.off_h,
         &ps.kh_of);
    axis(rw, g.p.stride_w, g.p.pad_left, g.p.dilation_w, g.KW, g.W, &ps.w0, &ps.V, &ps.off_w,
         &ps.kw_of);
    ps.hs = g.p.stride_h; ps.ws = g.p.stride_w;
    ps.is = ys; ps.os = xs; ps.layout = g.p.layout;
    ps.dense = ps.hs == 1 && ps.ws == 1 && ps.h0 == 0 && ps.w0 == 0 && ps.U == g.H &&
               ps.V == g.W;
    return ps;
  }

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
  void pack_pass_weights(const ParallelRunner& pr, const Pass& ps, const T* w, bool transposed,
                         std::vector<Acc>* out) const {
    const int64_t K = ps.K(), G = ps.G, Cout = ps.Cout;
    if (ps.layout == kNCHW) {
      out->resize(G * Cout * K);
      Acc* base = out->data();
      pr.run(G * Cout, [&](int64_t task) {
        int64_t grp = task / Cout, co = task % Cout;
        Acc* row = base + (grp * Cout + co) * K;
        for (int64_t ci = 0; ci < ps.Cin; ++ci)
          for (int64_t th = 0; th < ps.TH(); ++th)
            for (int64_t tw = 0; tw < ps.TW(); ++tw)
              row[k_index(ps, ci, th, tw)] = weight(w, ps, transposed, grp, co, ci, th, tw);
      });
    } else {
      const int64_t panels = (Cout + NR - 1) / NR;
      out->resize(G * panels * NR * K);
      Acc* base = out->data();
      pr.run(G * panels, [&](int64_t task) {
        int64_t grp = task / panels, p = task % panels;
        Acc* panel = base + (grp * panels + p) * K * NR;
        int64_t c0 = p * NR, nr = std::min(NR, Cout - c0);
        for (int64_t th = 0; th < ps.TH(); ++th)
          for (int64_t tw = 0; tw < ps.TW(); ++tw)
            for (int64_t ci = 0; ci < ps.Cin; ++ci) {
              Acc* dst = panel + k_index(ps, ci, th, tw) * NR;
              for (int64_t j = 0; j < nr; ++j)
                dst[j] = weight(w, ps, transposed, grp, c0 + j, ci, th, tw);
              for (int64_t j = nr; j < NR; ++j) dst[j] = Acc(0);
            }
      });
    }
  }

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
    int64_t a = std::min(std::max(vlo, r.v), r.v + r.len), b = std::max(std::min(vhi, r.v + r.len), a);
    zero(dst, a - r.v);
    const T* row = in_nc + ih * ps.is.h + (a * ps.step_w + ps.off_w[tw]) * ps.is.w;
    copy_widen(dst + (a - r.v), row, b - a, ps.step_w * ps.is.w);
    zero(dst + (b - r.v), r.v + r.len - b);
  }

  // NCHW: Col^T rows k in [k0, k0 + kc) for grid positions `runs` (the block's columns), into
  // B panels (panel stride kc*NR) for group grp.
  void pack_colT_panels(const Pass& ps, const T* in, int64_t grp, int64_t k0, int64_t kc,
                        const std::vector<Run>& runs, Acc* Bp) const {
    const int64_t taps = ps.TH() * ps.TW();
    const int64_t cols = runs.empty() ? 0 : runs.back().at + runs.back().len;
    const int64_t full = cols / NR, rest = cols % NR;
    // Each row k is gathered run by run into a contiguous line (long runs: few bounds checks),
    // then dealt out to the panels one NR-wide piece at a time.
    Acc* line = scratch<Acc, 2>(round_up(cols, NR));
    for (int64_t k = k0; k < k0 + kc; ++k) {
      int64_t ci = k / taps, th = (k % taps) / ps.TW(), tw = k % ps.TW();
      int64_t vlo, vhi;
      ps.v_range(tw, &vlo, &vhi);
      for (const Run& r : runs)
        gather_row_run(ps, in + r.n * ps.is.n + (grp * ps.Cin + ci) * ps.is.c, r, th, tw, vlo,
                       vhi, line + r.at);
      Acc* dst = Bp + (k - k0) * NR;
      for (int64_t p = 0; p < full; ++p) std::memcpy(dst + p * kc * NR, line + p * NR, NR * sizeof(Acc));
      if (rest) {
        zero(line + cols, NR - rest);  // padding columns of the last panel
        std::memcpy(dst + full * kc * NR, line + full * NR, NR * sizeof(Acc));
      }
    }
  }

  // NHWC: Col rows (grid positions q0 ..) restricted to k in [k0, k0 + kc), row-major with
  // leading dimension kc; k = (th, tw, ci) so each tap contributes one contiguous channel run.
  void pack_col_rows(const Pass& ps, const T* in, int64_t grp, int64_t q0, int64_t rows,
                     int64_t k0, int64_t kc, Acc* A) const {
    const int64_t Cin = ps.Cin, TW = ps.TW();
    // Taps along w one input column apart (dilation 1) with all channels in this group: the
    // taps (th, 0 .. TW-1) of a row are TW*Cin consecutive k and, inside the input, TW*Cin
    // consecutive elements.
    bool unit_taps = Cin == ps.is.w;
    for (int64_t t = 1; t < TW; ++t) unit_taps &= ps.off_w[t] == ps.off_w[t - 1] + 1;
    int64_t n = q0 / (ps.U * ps.V), u = (q0 / ps.V) % ps.U, v = q0 % ps.V;
    for (int64_t r = 0; r < rows; ++r) {
      Acc* dst = A + r * kc;
      const T* in_n = in + n * ps.is.n + grp * Cin;
      if (unit_taps && k0 == 0 && kc == ps.K()) {
        const int64_t iw0 = v * ps.step_w + ps.off_w[0];
        // Taps [tlo, thi) of the row land inside the input.
        const int64_t tlo = std::min(TW, std::max<int64_t>(0, -iw0));
        const int64_t thi = std::max(tlo, std::min(TW, ps.Win - iw0));
        for (int64_t th = 0; th < ps.TH(); ++th) {
          Acc* d = dst + th * TW * Cin;
          int64_t ih = u * ps.step_h + ps.off_h[th];
          if (ih < 0 || ih >= ps.Hin) {
            zero(d, TW * Cin);
            continue;
          }
          zero(d, tlo * Cin);
          copy_widen(d + tlo * Cin, in_n + ih * ps.is.h + (iw0 + tlo) * ps.is.w,
                     (thi - tlo) * Cin, 1);
          zero(d + thi * Cin, (TW - thi) * Cin);
        }
      } else {
        const int64_t t_lo = k0 / Cin;
        int64_t th = t_lo / TW, tw = t_lo % TW;
        for (int64_t t = t_lo; t * Cin < k0 + kc; ++t, (++tw == TW ? (tw = 0, ++th) : 0)) {
          int64_t c_lo = std::max<int64_t>(0, k0 - t * Cin), c_hi = std::min(Cin, k0 + kc - t * Cin);
          Acc* d = dst + t * Cin + c_lo - k0;
          int64_t ih = u * ps.step_h + ps.off_h[th], iw = v * ps.step_w + ps.off_w[tw];
          if (ih < 0 || ih >= ps.Hin || iw < 0 || iw >= ps.Win)
            zero(d, c_hi - c_lo);
          else
            copy_widen(d, in_n + ih * ps.is.h + iw * ps.is.w + c_lo, c_hi - c_lo, 1);
        }
      }
      if (++v == ps.V) {
        v = 0;
        if (++u == ps.U) {
          u = 0;
          ++n;
        }
      }
    }
  }

  // ------------------------------------------------------------------------------------------
  // Epilogues for tiles computed into scratch (half types, bwd_data phases, blocks that
  // straddle images): convert, add bias, scatter to the pass grid.

  T* out_cell(const Pass& ps, T* out, int64_t n, int64_t c, int64_t u, int64_t v) const {
    return out + n * ps.os.n + c * ps.os.c + (ps.h0 + u * ps.hs) * ps.os.h +
           (ps.w0 + v * ps.ws) * ps.os.w;
  }

  // NCHW tile C[co][col] (ldc) over the block's runs.
  void store_nchw(const Pass& ps, const Acc* C, int64_t ldc, const std::vector<Run>& runs,
                  int64_t grp, T* out, const T* bias) const {
    for (int64_t co = 0; co < ps.Cout; ++co) {
      Acc b = bias ? Num<T>::load(bias[grp * ps.Cout + co]) : Acc(0);
      for (const Run& r : runs) {
        T* dst = out_cell(ps, out, r.n, grp * ps.Cout + co, r.u, r.v);
        const Acc* src = C + co * ldc + r.at;
        for (int64_t i = 0; i < r.len; ++i) dst[i * ps.ws * ps.os.w] = Num<T>::store(src[i] + b);
      }
    }
  }

  // NHWC tile C[row][co] (ldc) for grid positions q0 .. q0 + rows.
  void store_nhwc(const Pass& ps, const Acc* C, int64_t ldc, int64_t q0, int64_t rows,
                  int64_t grp, T* out, const T* bias) const {
    int64_t n = q0 / (ps.U * ps.V), u = (q0 / ps.V) % ps.U, v = q0 % ps.V;
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = out_cell(ps, out, n, grp * ps.Cout, u, v);
      const Acc* src = C + r * ldc;
      for (int64_t co = 0; co < ps.Cout; ++co) {
        Acc b = bias ? Num<T>::load(bias[grp * ps.Cout + co]) : Acc(0);
        dst[co] = Num<T>::store(src[co] + b);
      }
      if (++v == ps.V) {
        v = 0;
        if (++u == ps.U) {
          u = 0;
          ++n;
        }
      }
    }
  }

  // ------------------------------------------------------------------------------------------
  // Running a pass.

  // NCHW: per task, a block of grid columns (positions) of one group; A = weights.
  void run_pass_nchw(const ParallelRunner& pr, const Pass& ps, const T* in, const Acc* A,
                     const T* bias, T* out) const {
    const int64_t J = ps.U * ps.V, Q = ps.N * J, K = ps.K(), Cout = ps.Cout;
    if (Q == 0) return;
    // Blocks of columns: whole images split evenly when an image is large, else blocks that
    // run across images; halved until there are enough tasks to share.
    int64_t width = 256;
    auto count = [&](int64_t wdt) {
      return J >= 128 ? ps.N * ((J + wdt - 1) / wdt) : (Q + wdt - 1) / wdt;
    };
    while (width > 64 && ps.G * count(width) < 4 * pr.num_threads()) width /= 2;
    const int64_t per_image = J >= 128 ? (J + width - 1) / width : 0;
    const int64_t blocks = count(width);
    const int64_t kc_max = K <= kKC + kKC / 2 ? K : kKC;
    pr.run(ps.G * blocks, [&](int64_t task) {
      const int64_t grp = task / blocks, b = task % blocks;
      int64_t q0, q1;
      if (per_image) {
        int64_t n = b / per_image, part = b % per_image;
        int64_t step = round_up((J + per_image - 1) / per_image, NR);
        q0 = n * J + std::min(J, part * step);
        q1 = n * J + std::min(J, (part + 1) * step);
      } else {
        q0 = b * width;
        q1 = std::min(Q, q0 + width);
      }
      const int64_t cols = q1 - q0;
      if (cols <= 0) return;
      thread_local std::vector<Run> runs;
      grid_runs(q0, q1, ps.U, ps.V, &runs);
      const bool direct = kSame && ps.dense && q0 / J == (q1 - 1) / J;
      Acc* C;
      int64_t ldc;
      bool acc = false;
      if (direct) {
        int64_t n = q0 / J;
        C = reinterpret_cast<Acc*>(out) + n * ps.os.n + grp * Cout * ps.os.c + (q0 - n * J);
        ldc = ps.os.c;
        if (bias) {
          for (int64_t co = 0; co < Cout; ++co)
            std::fill(C + co * ldc, C + co * ldc + cols, Num<T>::load(bias[grp * Cout + co]));
          acc = true;
        }
      } else {
        C = scratch<Acc, 1>(Cout * cols);
        ldc = cols;
      }
      const Acc* Ag = A + grp * Cout * K;
      Acc* Bp = scratch<Acc, 0>(round_up(cols, NR) * kc_max);
      if (K == 0) gemm_packed(Cout, cols, 0, Ag, K, Bp, 0, C, ldc, acc);
      for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
        const int64_t kc = std::min(kc_max, K - k0);
        pack_colT_panels(ps, in, grp, k0, kc, runs, Bp);
        gemm_packed(Cout, cols, kc, Ag + k0, K, Bp, kc * NR, C, ldc, acc || k0 > 0);
      }
      if (!direct) store_nchw(ps, C, ldc, runs, grp, out, bias);
    });
  }

  // NHWC: per task, a block of grid rows (positions, across images) of one group; B = weights.
  void run_pass_nhwc(const ParallelRunner& pr, const Pass& ps, const T* in, const Acc* Bw,
                     const T* bias, T* out) const {
    const int64_t Q = ps.N * ps.U * ps.V, K = ps.K(), Cout = ps.Cout;
    if (Q == 0) return;
    const int64_t panels = (Cout + NR - 1) / NR;
    int64_t rows_per = 96;
    while (rows_per > 12 && ps.G * ((Q + rows_per - 1) / rows_per) < 4 * pr.num_threads())
      rows_per /= 2;
    const int64_t blocks = (Q + rows_per - 1) / rows_per;
    const int64_t kc_max = K <= kKC + kKC / 2 ? K : kKC;
    // 1x1 taps at offset 0 with step 1 over a grid equal to the input: the im2col is the input.
    const bool in_place = kSame && ps.TH() == 1 && ps.TW() == 1 && ps.off_h[0] == 0 &&
                          ps.off_w[0] == 0 && ps.step_h == 1 && ps.step_w == 1 &&
                          ps.U == ps.Hin && ps.V == ps.Win;
    pr.run(ps.G * blocks, [&](int64_t task) {
      const int64_t grp = task / blocks, b = task % blocks;
      const int64_t q0 = b * rows_per, rows = std::min(Q, q0 + rows_per) - q0;
      const bool direct = kSame && ps.dense;
      Acc* C;
      int64_t ldc;
      bool acc = false;
      if (direct) {
        C = reinterpret_cast<Acc*>(out) + q0 * ps.os.w + grp * Cout;
        ldc = ps.os.w;
        if (bias) {
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t co = 0; co < Cout; ++co)
              C[r * ldc + co] = Num<T>::load(bias[grp * Cout + co]);
          acc = true;
        }
      } else {
        C = scratch<Acc, 1>(rows * Cout);
        ldc = Cout;
      }
      const Acc* Bg = Bw + grp * panels * NR * K;
      if (K == 0) gemm_packed(rows, Cout, 0, Bg, 0, Bg, 0, C, ldc, acc);
      for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
        const int64_t kc = std::min(kc_max, K - k0);
        const Acc* Ablk;
        int64_t lda;
        if (in_place) {
          Ablk = reinterpret_cast<const Acc*>(in) + q0 * ps.is.w + grp * ps.Cin + k0;
          lda = ps.is.w;
        } else {
          Acc* At = scratch<Acc, 0>(rows_per * kc_max);
          pack_col_rows(ps, in, grp, q0, rows, k0, kc, At);
          Ablk = At;
          lda = kc;
        }
        gemm_packed(rows, Cout, kc, Ablk, lda, Bg + k0 * NR, K * NR, C, ldc, acc || k0 > 0);
      }
      if (!direct) store_nhwc(ps, C, ldc, q0, rows, grp, out, bias);
    });
  }

  void run_pass(const ParallelRunner& pr, const Pass& ps, const T* in, const T* w,
                bool transposed, const T* bias, T* out) const {
    if (ps.N * ps.U * ps.V == 0) return;
    std::vector<Acc> wpack;
    const Acc* wmat;
    // Forward NCHW with float weights: OIHW rows are already the A operand.
    if (kSame && !transposed && ps.layout == kNCHW) {
      wmat = reinterpret_cast<const Acc*>(w);
    } else {
      pack_pass_weights(pr, ps, w, transposed, &wpack);
      wmat = wpack.data();
    }
    if (ps.layout == kNCHW)
      run_pass_nchw(pr, ps, in, wmat, bias, out);
    else
      run_pass_nhwc(pr, ps, in, wmat, bias, out);
  }

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
  void forward(const ParallelRunner& pr, const T* x, const T* w, const T* bias, T* y) const {
    if (use_depthwise(w)) return depthwise_forward<T>(pr, g, x, w, bias, y);
    if (winograd_forward<T>(pr, g, x, w, bias, y)) return;  // 3x3 stride 1 (winograd.cc)
    run_pass(pr, forward_pass(), x, w, false, bias, y);
  }

  // dx = conv_transpose(dy, w) + bias: one pass per stride phase, or the scatter form below
  // when dy is much smaller than dx.
  void backward_data(const ParallelRunner& pr, const T* dy, const T* w, const T* bias,
                     T* dx) const {
    if (use_depthwise(w)) return depthwise_backward_data<T>(pr, g, dy, w, bias, dx);
    if (winograd_backward_data<T>(pr, g, dy, w, bias, dx)) return;  // 3x3 stride 1 (winograd.cc)
    if (prefer_col2im()) {
      backward_data_col2im(pr, dy, w, bias, dx);
      return;
    }
    for (int64_t rh = 0; rh < g.p.stride_h; ++rh)
      for (int64_t rw = 0; rw < g.p.stride_w; ++rw)
        run_pass(pr, bwd_data_phase(rh, rw), dy, w, true, bias, dx);
  }

  // The phase passes read every dx cell's taps, including those that fall into dy's padding:
  // about H*W/(sh*sw) cells x all taps, against the forward's OH*OW x all taps. When the ratio
  // is large (a kernel covering most of a small image: LeNet's 5x5 layers, C5 has a 1x1 output)
  // the scatter form does exactly the forward's work instead.
  bool prefer_col2im() const {
    return 10 * g.H * g.W > 12 * g.p.stride_h * g.p.stride_w * g.OH * g.OW;
  }

  // Scatter form: dCol[pos, k] = sum_o dY[pos, o] * W[o, k] (a GEMM per block of dy positions),
  // then every dCol element is added to the dx cell the forward read it from (col2im). Tasks
  // own whole (image, group) slabs of dx, so no two tasks add into the same cell.
  void backward_data_col2im(const ParallelRunner& pr, const T* dy, const T* w, const T* bias,
                            T* dx) const {
    const Pass ps = forward_pass();
    const int64_t G = ps.G, Kg = ps.K(), J = g.OH * g.OW, taps = ps.TH() * ps.TW();
    const bool cl = !nhwc();
    const int64_t kpanels = (Kg + NR - 1) / NR;
    // NCHW: A = W^T rows [grp][k][o].  NHWC: B = W panels over k: [grp][k/NR][o][k%NR].
    std::vector<Acc> wp(cl ? G * Kg * Og : G * kpanels * Og * NR);
    pr.run(G * Og, [&](int64_t task) {
      const int64_t grp = task / Og, o = task % Og;
      for (int64_t ci = 0; ci < Cg; ++ci)
        for (int64_t th = 0; th < ps.TH(); ++th)
          for (int64_t tw = 0; tw < ps.TW(); ++tw) {
            const int64_t k = k_index(ps, ci, th, tw);
            const Acc v = weight(w, ps, false, grp, o, ci, th, tw);
            if (cl)
              wp[(grp * Kg + k) * Og + o] = v;
            else
              wp[((grp * kpanels + k / NR) * Og + o) * NR + k % NR] = v;
          }
      if (!cl)  // zero the padding columns of the last k panel
        for (int64_t k = Kg; k < kpanels * NR; ++k)
          wp[((grp * kpanels + k / NR) * Og + o) * NR + k % NR] = Acc(0);
    });
    const Strides4 bs = activation_strides(g.p.layout, Cg, g.H, g.W);  // slab buffer strides
    const int64_t slab = Cg * g.H * g.W;
    const int64_t oslice = Og <= kKC + kKC / 2 ? Og : kKC;
    pr.run(g.N * G, [&](int64_t task) {
      const int64_t n = task / G, grp = task % G;
      // Accumulate into dx itself (float types) or into a float slab (half types).
      Acc* acc;
      Strides4 as;
      if constexpr (kSame) {
        acc = dx + n * xs.n + grp * Cg * xs.c;
        as = xs;
      } else {
        acc = scratch<Acc, 3>(slab);
        as = bs;
      }
      for (int64_t c = 0; c < Cg; ++c) {
        const Acc b0 = (kSame && bias) ? Num<T>::load(bias[grp * Cg + c]) : Acc(0);
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t x = 0; x < g.W; ++x) acc[c * as.c + h * as.h + x * as.w] = b0;
      }
      if (cl) {
        const int64_t PB = 256, KB = 192;
        Acc* Bp = scratch<Acc, 0>(round_up(PB, NR) * Og);
        Acc* C = scratch<Acc, 1>(KB * PB);
        thread_local std::vector<Run> runs;
        for (int64_t p0 = 0; p0 < J; p0 += PB) {
          const int64_t pn = std::min(PB, J - p0), pw = round_up(pn, NR);
          // dY[n, grp, :, p0 .. p0+pn] as panels over positions: [p/NR][o][p%NR].
          for (int64_t o = 0; o < Og; ++o) {
            const T* src = dy + n * ys.n + (grp * Og + o) * ys.c + p0;
            for (int64_t p = 0; p < pw; ++p)
              Bp[((p / NR) * Og + o) * NR + p % NR] = p < pn ? Num<T>::load(src[p]) : Acc(0);
          }
          grid_runs(p0, p0 + pn, g.OH, g.OW, &runs);
          for (int64_t k0 = 0; k0 < Kg; k0 += KB) {
            const int64_t kn = std::min(KB, Kg - k0);
            for (int64_t o0 = 0; o0 < Og; o0 += oslice)
              gemm_packed(kn, pn, std::min(oslice, Og - o0), wp.data() + (grp * Kg + k0) * Og + o0,
                          Og, Bp + o0 * NR, Og * NR, C, pn, o0 > 0);
            for (int64_t k = k0; k < k0 + kn; ++k) {
              const int64_t ci = k / taps, th = (k % taps) / ps.TW(), tw = k % ps.TW();
              int64_t vlo, vhi;
              ps.v_range(tw, &vlo, &vhi);
              for (const Run& r : runs) {
                const int64_t ih = r.u * ps.step_h + ps.off_h[th];
                if (ih < 0 || ih >= g.H) continue;
                const int64_t a = std::max(vlo, r.v), b = std::min(vhi, r.v + r.len);
                Acc* drow = acc + ci * as.c + ih * as.h;
                const Acc* src = C + (k - k0) * pn + r.at - r.v;
                for (int64_t v = a; v < b; ++v) drow[(v * ps.step_w + ps.off_w[tw]) * as.w] += src[v];
              }
            }
          }
        }
      } else {
        const int64_t PB = 96, KB = 256;
        Acc* Ac = scratch<Acc, 0>(PB * Og);
        Acc* C = scratch<Acc, 1>(PB * KB);
        for (int64_t p0 = 0; p0 < J; p0 += PB) {
          const int64_t pn = std::min(PB, J - p0);
          const Acc* A;
          int64_t lda;
          if constexpr (kSame) {
            A = dy + (n * J + p0) * ys.w + grp * Og;
            lda = ys.w;
          } else {
            for (int64_t p = 0; p < pn; ++p)
              for (int64_t o = 0; o < Og; ++o)
                Ac[p * Og + o] = Num<T>::load(dy[(n * J + p0 + p) * ys.w + grp * Og + o]);
            A = Ac;
            lda = Og;
          }
          for (int64_t k0 = 0; k0 < Kg; k0 += KB) {
            const int64_t kn = std::min(KB, Kg - k0);
            for (int64_t o0 = 0; o0 < Og; o0 += oslice)
              gemm_packed(pn, kn, std::min(oslice, Og - o0), A + o0, lda,
                          wp.data() + ((grp * kpanels + k0 / NR) * Og + o0) * NR, Og * NR, C, kn,
                          o0 > 0);
            for (int64_t p = p0; p < p0 + pn; ++p) {
              const int64_t oh = p / g.OW, ow = p % g.OW;
              const Acc* crow = C + (p - p0) * kn;
              // Taps overlapping this k block, walked with (th, tw) counters (no divisions
              // in the per-position loop).
              const int64_t t_lo = k0 / Cg;
              int64_t th = t_lo / ps.TW(), tw = t_lo % ps.TW();
              for (int64_t t = t_lo; t * Cg < k0 + kn; ++t, (++tw == ps.TW() ? (tw = 0, ++th) : 0)) {
                const int64_t ih = oh * ps.step_h + ps.off_h[th];
                const int64_t iw = ow * ps.step_w + ps.off_w[tw];
                if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
                const int64_t c_lo = std::max<int64_t>(0, k0 - t * Cg);
                const int64_t c_hi = std::min(Cg, k0 + kn - t * Cg);
                Acc* d = acc + ih * as.h + iw * as.w;
                const Acc* src = crow + t * Cg - k0;
                for (int64_t c = c_lo; c < c_hi; ++c) d[c] += src[c];
              }
            }
          }
        }
      }
      if constexpr (!kSame) {
        for (int64_t c = 0; c < Cg; ++c) {
          const Acc b0 = bias ? Num<T>::load(bias[grp * Cg + c]) : Acc(0);
          for (int64_t h = 0; h < g.H; ++h)
            for (int64_t x = 0; x < g.W; ++x)
              dx[n * xs.n + (grp * Cg + c) * xs.c + h * xs.h + x * xs.w] =
                  Num<T>::store(acc[c * as.c + h * as.h + x * as.w] + b0);
        }
      }
    });
  }

  // dw = sum over images and positions of the im2col of x against dy (see the file comment).
  //
  // Positions (n, oh, ow), flattened, are cut into slices of at most kKC; dy is first packed
  // once per slice into the GEMM operand it plays (NCHW: B panels of dY^T; NHWC: A rows of
  // dY^T). Tasks then own a block of the im2col side (NCHW: rows k of dW^T; NHWC: columns k)
  // and a contiguous range of slices; when there are too few blocks to keep every thread busy
  // the slices are split into ranges summed into separate partial buffers, added at the end in
  // a fixed order, so results never depend on scheduling.
  void backward_filter(const ParallelRunner& pr, const T* x, const T* dy, T* dw) const {
    if (depthwise_applicable(g)) return depthwise_backward_filter<T>(pr, g, x, dy, dw);
    const Pass ps = forward_pass();
    const int64_t G = ps.G, Kg = ps.K(), J = ps.U * ps.V, Q = ps.N * J;
    const int64_t slices = (Q + kKC - 1) / kKC;
    const int64_t opanels = (Og + NR - 1) / NR;
    const bool cl = !nhwc();
    // Packed dy, per (group, slice): NCHW opanels*NR x kKC panels; NHWC Og x kKC rows.
    const int64_t dy_slice = cl ? opanels * NR * kKC : Og * kKC;
    std::vector<Acc> dyp(G * slices * dy_slice);
    pr.run(G * slices, [&](int64_t task) {
      const int64_t grp = task / slices, s = task % slices;
      const int64_t q0 = s * kKC, q1 = std::min(Q, q0 + kKC), pc = q1 - q0;
      Acc* dst = dyp.data() + task * dy_slice;
      if (cl) {
        // dY^T panels: [o / NR][pos][o % NR]; read along each dy plane (contiguous in pos).
        for (int64_t o = 0; o < opanels * NR; ++o) {
          Acc* d = dst + (o / NR) * pc * NR + o % NR;
          if (o >= Og) {
            for (int64_t q = 0; q < pc; ++q) d[q * NR] = Acc(0);
            continue;
          }
          for (int64_t q = q0; q < q1;) {
            int64_t n = q / J, j = q % J, len = std::min(J - j, q1 - q);
            const T* src = dy + n * ys.n + (grp * Og + o) * ys.c + j;
            for (int64_t i = 0; i < len; ++i) d[(q - q0 + i) * NR] = Num<T>::load(src[i]);
            q += len;
          }
        }
      } else {
        // dY^T rows: [o][pos]; positions of dense NHWC dy are rows of stride ys.w.
        for (int64_t q = q0; q < q1; ++q) {
          const T* src = dy + q * ys.w + grp * Og;
          for (int64_t o = 0; o < Og; ++o) dst[o * pc + (q - q0)] = Num<T>::load(src[o]);
        }
      }
    });
    // Blocks of the im2col side: NCHW rows of dW^T (multiples of 6), NHWC columns (panels).
    const int64_t block = cl ? 96 : 8 * NR;
    const int64_t blocks = (Kg + block - 1) / block;
    int64_t splits = std::max<int64_t>(1, (2 * pr.num_threads() + G * blocks - 1) / (G * blocks));
    splits = std::min(splits, slices);
    const int64_t part_size = Kg * Og;  // NCHW dW^T[k][o], NHWC dW^T[o][k]
    std::vector<Acc> partial(G * splits * part_size, Acc(0));
    pr.run(G * blocks * splits, [&](int64_t task) {
      const int64_t s = task % splits, b = (task / splits) % blocks, grp = task / (splits * blocks);
      const int64_t k0 = b * block, kn = std::min(Kg, k0 + block) - k0;
      Acc* part = partial.data() + (grp * splits + s) * part_size;
      Acc* im = scratch<Acc, 0>(round_up(block, NR) * kKC);
      thread_local std::vector<Run> runs;
      for (int64_t sl = slices * s / splits; sl < slices * (s + 1) / splits; ++sl) {
        const int64_t q0 = sl * kKC, q1 = std::min(Q, q0 + kKC), pc = q1 - q0;
        const Acc* dyop = dyp.data() + (grp * slices + sl) * dy_slice;
        if (cl) {
          // A = im2col rows k0 .. k0+kn over the slice's positions (row length pc).
          grid_runs(q0, q1, ps.U, ps.V, &runs);
          const int64_t taps = ps.TH() * ps.TW();
          for (int64_t k = k0; k < k0 + kn; ++k) {
            int64_t ci = k / taps, th = (k % taps) / ps.TW(), tw = k % ps.TW();
            int64_t vlo, vhi;
            ps.v_range(tw, &vlo, &vhi);
            for (const Run& r : runs)
              gather_row_run(ps, x + r.n * xs.n + (grp * Cg + ci) * xs.c, r, th, tw, vlo, vhi,
                             im + (k - k0) * pc + r.at);
          }
          gemm_packed(kn, Og, pc, im, pc, dyop, pc * NR, part + k0 * Og, Og, true);
        } else {
          // B = im2col columns k0 .. k0+kn as panels over the slice's positions.
          pack_col_panels_nhwc(ps, x, grp, q0, pc, k0, kn, im);
          gemm_packed(Og, kn, pc, dyop, pc, im, pc * NR, part + k0, Kg, true);
        }
      }
    });
    // Sum the partials in split order and write dw in its layout.
    const int64_t taps = ps.TH() * ps.TW();
    pr.run(G * Og, [&](int64_t task) {
      const int64_t grp = task / Og, o = task % Og;
      const Acc* base = partial.data() + grp * splits * part_size;
      for (int64_t k = 0; k < Kg; ++k) {
        int64_t idx = cl ? k * Og + o : o * Kg + k;
        Acc v = 0;
        for (int64_t s = 0; s < splits; ++s) v += base[s * part_size + idx];
        int64_t ci, kh, kw;
        if (cl) {
          ci = k / taps; kh = (k % taps) / g.KW; kw = k % g.KW;
        } else {
          ci = k % Cg; kh = (k / Cg) / g.KW; kw = (k / Cg) % g.KW;
        }
        dw[(grp * Og + o) * ws.n + ci * ws.c + kh * ws.h + kw * ws.w] = Num<T>::store(v);
      }
    });
  }

  // NHWC bwd_filter: im2col columns [k0, k0 + kn) (k = (kh, kw, ci)) for positions q0 .. q0+pc
  // as B panels [col / NR][pos][col % NR] (panel stride pc*NR), zero-padded to whole panels.
  void pack_col_panels_nhwc(const Pass& ps, const T* x, int64_t grp, int64_t q0, int64_t pc,
                            int64_t k0, int64_t kn, Acc* Bp) const {
    const int64_t Cin = ps.Cin, kpad = round_up(kn, NR);
    // The block's columns cut into pieces that stay within one panel and one tap; the same
    // cut serves every position.
    struct Piece {
      int64_t dst, th, tw, ci, len;  // dst: offset of the piece in a position's panel row
    };
    thread_local std::vector<Piece> pieces;
    pieces.clear();
    for (int64_t col = 0; col < kn;) {
      const int64_t k = k0 + col, lane = col % NR, t = k / Cin, ci = k % Cin;
      const int64_t len = std::min({NR - lane, Cin - ci, kn - col});
      pieces.push_back({(col / NR) * pc * NR + lane, t / ps.TW(), t % ps.TW(), ci, len});
      col += len;
    }
    int64_t n = q0 / (ps.U * ps.V), u = (q0 / ps.V) % ps.U, v = q0 % ps.V;
    for (int64_t r = 0; r < pc; ++r) {
      const T* in_n = x + n * ps.is.n + grp * Cin;
      Acc* row = Bp + r * NR;
      for (const Piece& pc_ : pieces) {
        const int64_t ih = u * ps.step_h + ps.off_h[pc_.th];
        const int64_t iw = v * ps.step_w + ps.off_w[pc_.tw];
        Acc* dst = row + pc_.dst;
        if (ih < 0 || ih >= ps.Hin || iw < 0 || iw >= ps.Win)
          zero(dst, pc_.len);
        else if (kSame && pc_.len == NR)  // a whole panel row: fixed-size copy, inlined
          std::memcpy(dst, in_n + ih * ps.is.h + iw * ps.is.w + pc_.ci, NR * sizeof(Acc));
        else
          copy_widen(dst, in_n + ih * ps.is.h + iw * ps.is.w + pc_.ci, pc_.len, 1);
      }
      if (kn < kpad) zero(row + (kn / NR) * pc * NR + kn % NR, kpad - kn);
      if (++v == ps.V) {
        v = 0;
        if (++u == ps.U) {
          u = 0;
          ++n;
        }
      }
    }
  }
};

ffi::Error Conv2dFwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                         ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                         ffi::Dictionary attrs) {
  static constexpr char kTarget[] = "jaxconv_conv2d_fwd";
  ConvGeometry g;
  JAXCONV_RETURN_IF_ERROR(decode_conv_call(attrs, x, w, *y, kTarget, &g));
  JAXCONV_RETURN_IF_ERROR(check_bias(bias, g.O, x.element_type(), kTarget));
  JAXCONV_RETURN_IF_ERROR(check_conv_algo_env(kTarget));
  if (g.N == 0) return ffi::Error::Success();
  ParallelRunner pr(&pool);
  return dispatch_float(x.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    Conv<T>(g).forward(pr, static_cast<const T*>(x.untyped_data()),
                       static_cast<const T*>(w.untyped_data()), bias_or_null<T>(bias),
                       static_cast<T*>(y->untyped_data()));
    return ffi::Error::Success();
  });
}

ffi::Error Conv2dBwdDataImpl(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer w,
                             ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> dx,
                             ffi::Dictionary attrs) {
  static constexpr char kTarget[] = "jaxconv_conv2d_bwd_data";
  ConvGeometry g;
  JAXCONV_RETURN_IF_ERROR(decode_conv_call(attrs, *dx, w, dy, kTarget, &g));
  JAXCONV_RETURN_IF_ERROR(check_bias(bias, g.C, dy.element_type(), kTarget));
  JAXCONV_RETURN_IF_ERROR(check_conv_algo_env(kTarget));
  if (g.N == 0) return ffi::Error::Success();
  ParallelRunner pr(&pool);
  return dispatch_float(dy.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    Conv<T>(g).backward_data(pr, static_cast<const T*>(dy.untyped_data()),
                             static_cast<const T*>(w.untyped_data()), bias_or_null<T>(bias),
                             static_cast<T*>(dx->untyped_data()));
    return ffi::Error::Success();
  });
}

ffi::Error Conv2dBwdFilterImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                               ffi::Result<ffi::AnyBuffer> dw, ffi::Dictionary attrs) {
  static constexpr char kTarget[] = "jaxconv_conv2d_bwd_filter";
  ConvGeometry g;
  JAXCONV_RETURN_IF_ERROR(decode_conv_call(attrs, x, *dw, dy, kTarget, &g));
  ParallelRunner pr(&pool);
  return dispatch_float(x.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    Conv<T>(g).backward_filter(pr, static_cast<const T*>(x.untyped_data()),
                               static_cast<const T*>(dy.untyped_data()),
                               static_cast<T*>(dw->untyped_data()));
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv2dFwdCpu, Conv2dFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Arg<ffi::AnyBuffer>()  // bias, (O,) or (0,)
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv2dBwdDataCpu, Conv2dBwdDataImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Arg<ffi::AnyBuffer>()  // bias, (C,) or (0,)
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv2dBwdFilterCpu, Conv2dBwdFilterImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Ret<ffi::AnyBuffer>()  // dw
                                  .Attrs());

}  // namespace jaxconv
