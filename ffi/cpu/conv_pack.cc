// Packing the GEMM operands of a convolution pass straight from the tensors: the pass model
// (which taps a pass reads, conv.h), the weights as A rows or B panels, and the im2col slices
// (never materialized whole) as B panels (NCHW) or A rows (NHWC).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv.h"

namespace jaxconv {

// ------------------------------------------------------------------------------------------
// Pass construction.

template <typename T>
Pass Conv<T>::forward_pass() const {
  Pass ps;
  ps.N = g.N;
  ps.G = g.groups();
  ps.Cin = Cg;
  ps.Hin = g.H;
  ps.Win = g.W;
  ps.Cout = Og;
  ps.U = g.OH;
  ps.V = g.OW;
  ps.h0 = 0;
  ps.h_spacing = 1;
  ps.w0 = 0;
  ps.w_spacing = 1;
  ps.step_h = g.p.stride_h;
  ps.step_w = g.p.stride_w;
  for (int64_t kh = 0; kh < g.KH; ++kh) {
    ps.off_h.push_back(kh * g.p.dilation_h - g.p.pad_top);
    ps.kh_of.push_back(kh);
  }
  for (int64_t kw = 0; kw < g.KW; ++kw) {
    ps.off_w.push_back(kw * g.p.dilation_w - g.p.pad_left);
    ps.kw_of.push_back(kw);
  }
  ps.is = xs;
  ps.os = ys;
  ps.layout = g.p.layout;
  ps.dense = true;
  return ps;
}

// Phase (rh, rw) of bwd_data: the dx cells (rh + s_h*u, rw + s_w*v), each axis from
// geometry.h's bwd_data_phase_axis (shared with the CUDA passes); see the file comment.
template <typename T>
Pass Conv<T>::bwd_data_phase(int64_t rh, int64_t rw) const {
  Pass ps;
  ps.N = g.N;
  ps.G = g.groups();
  ps.Cin = Og;
  ps.Hin = g.OH;
  ps.Win = g.OW;
  ps.Cout = Cg;
  ps.step_h = 1;
  ps.step_w = 1;
  // Grid row u of the phase is dx row out0 + s*u; tap slot q reads dy row u + in0 + q*in_q and
  // multiplies kernel cell first + q*step.
  auto axis = [](int64_t r, int64_t s, int64_t pad, int64_t d, int64_t k, int64_t size,
                 int64_t* first, int64_t* count, std::vector<int64_t>* off,
                 std::vector<int64_t>* cell) {
    const BwdDataPhaseAxis a = bwd_data_phase_axis(r, s, pad, d, k);
    *first = a.out0;
    *count = bwd_data_phase_rows(r, s, size);
    for (int64_t q = 0; q < a.count; ++q) {
      off->push_back(a.in0 + q * a.in_q);
      cell->push_back(a.first + q * a.step);
    }
  };
  axis(rh, g.p.stride_h, g.p.pad_top, g.p.dilation_h, g.KH, g.H, &ps.h0, &ps.U, &ps.off_h,
       &ps.kh_of);
  axis(rw, g.p.stride_w, g.p.pad_left, g.p.dilation_w, g.KW, g.W, &ps.w0, &ps.V, &ps.off_w,
       &ps.kw_of);
  ps.h_spacing = g.p.stride_h;
  ps.w_spacing = g.p.stride_w;
  ps.is = ys;
  ps.os = xs;
  ps.layout = g.p.layout;
  ps.dense = ps.h_spacing == 1 && ps.w_spacing == 1 && ps.h0 == 0 && ps.w0 == 0 && ps.U == g.H &&
             ps.V == g.W;
  return ps;
}

// The pass's weights as the GEMM wants them, for every group:
//   NCHW: A[grp][co][k] (rows of the output channels)                 size G*Cout*K
//   NHWC: B panels[grp]: panel co/NR holds [k][co % NR]              size G*ceil(Cout/NR)*NR*K
// in the calling thread's kWeights scratch: grow-only, so a call neither allocates nor
// page-faults a fresh buffer (1x1 2048 -> 512 has 4 MB of float32 weights), and written whole,
// so nothing needs zeroing first.
template <typename T>
const typename Conv<T>::Acc* Conv<T>::pack_pass_weights(const ParallelRunner& pr, const Pass& ps,
                                                        const T* w, bool transposed) const {
  const int64_t K = ps.K(), G = ps.G, Cout = ps.Cout;
  if (ps.layout == kNCHW && !transposed) {
    // Forward NCHW: OIHW rows are already the A operand (half types: widened as one
    // contiguous copy; pack_pass_weights' strided weight() per element took ~10% of a
    // bfloat16 1x1 512 -> 2048 @7 forward under perf).
    if constexpr (kSame) return reinterpret_cast<const Acc*>(w);
    const int64_t n = G * Cout * K;
    constexpr int64_t kChunk = 1 << 15;
    Acc* const dst = scratch<Acc, kWeights>(n);
    pr.run((n + kChunk - 1) / kChunk, [&](int64_t c) {
      const int64_t lo = c * kChunk;
      copy_widen(dst + lo, w + lo, std::min(kChunk, n - lo), 1);
    });
    return dst;
  }
  if (ps.layout == kNCHW) {  // transposed: bwd_data (the forward returned above)
    Acc* base = scratch<Acc, kWeights>(G * Cout * K);
    // A task fills kRows consecutive rows, co innermost: row co reads
    // w[ci][co] down a column of OIHW, and neighbouring co share that column's cache lines
    // (with one row per task, the pack took 19% of a 1x1 512 -> 2048 @7 bwd_data's samples
    // under perf, the GEMM 27%; this form: 9% against 28%).
    constexpr int64_t kRows = 16;
    const int64_t blocks = (Cout + kRows - 1) / kRows;
    pr.run(G * blocks, [&](int64_t task) {
      const int64_t grp = task / blocks, co0 = task % blocks * kRows;
      const int64_t rows = std::min(kRows, Cout - co0);
      Acc* row0 = base + (grp * Cout + co0) * K;
      // weight(), transposed: w[(grp*Og + ci)*ws.n + co*ws.c + tap] (its per-element index
      // arithmetic cost as much as the copy).
      const int64_t co_step = ws.c, ci_step = ws.n;
      const T* wg = w + grp * Og * ws.n + co0 * co_step;
      // Gathered kCols k at a time into a tile, then stored row by row: the rows are K apart,
      // often a multiple of 4 KiB, and 16 interleaved single-float store streams that far apart
      // share one L1 set.
      constexpr int64_t kCols = 64;
      Acc tile[kRows][kCols];
      int64_t ci = 0, th = 0, tw = 0;  // k = (ci*TH + th)*TW + tw, walked with counters
      for (int64_t k0 = 0; k0 < K; k0 += kCols) {
        const int64_t kn = std::min(kCols, K - k0);
        for (int64_t k = k0; k < k0 + kn; ++k) {
          const T* src = wg + ci * ci_step + ps.kh_of[th] * ws.h + ps.kw_of[tw] * ws.w;
          for (int64_t r = 0; r < rows; ++r) tile[r][k - k0] = Num<T>::load(src[r * co_step]);
          if (++tw == ps.TW()) {
            tw = 0;
            if (++th == ps.TH()) th = 0, ++ci;
          }
        }
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(row0 + r * K + k0, tile[r], kn * sizeof(Acc));
      }
    });
    return base;
  }
  const int64_t panels = (Cout + NR - 1) / NR;
  Acc* base = scratch<Acc, kWeights>(G * panels * NR * K);
  if (!transposed) {
    pack_forward_panels(pr, ps, w, base);
    return base;
  }
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
  return base;
}

// Forward weights as B panels, k in the pass's order (k_index): NHWC k = (kh, kw, ci), whose
// HWIO offset is k*O + o; NCHW k = (ci, kh, kw), whose OIHW offset is o*K + k.
template <typename T>
void Conv<T>::pack_forward_panels(const ParallelRunner& pr, const Pass& ps, const T* w,
                                  Acc* out) const {
  const int64_t K = ps.K(), Cout = ps.Cout, panels = (Cout + NR - 1) / NR;
  // NHWC: per task a block of kBlock reduction rows of one group, each row read once along its
  // output channels and dealt out NR at a time, so both sides move in long runs (per panel
  // kBlock*NR consecutive values). By panels instead, every copy read NR values 4*O bytes
  // from the last (4 MB of 2048 -> 512 weights: one page per row) and took 4% of a 1x1
  // 512 -> 2048 @7 forward under perf.
  constexpr int64_t kBlock = 32;
  const int64_t kblocks = (K + kBlock - 1) / kBlock;
  auto nhwc_rows = [&](int64_t task) {
    const int64_t grp = task / kblocks, k0 = (task % kblocks) * kBlock;
    const int64_t k1 = std::min(K, k0 + kBlock);
    Acc* dst_g = out + grp * panels * K * NR;
    for (int64_t k = k0; k < k1; ++k) {
      const T* src = w + k * ws.c + grp * Cout;
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t c0 = p * NR, nr = std::min(NR, Cout - c0);
        Acc* dst = dst_g + p * K * NR + k * NR;
        copy_widen(dst, src + c0, nr, 1);
        zero(dst + nr, NR - nr);
      }
    }
  };
  // NCHW: per task one panel, output channel j's row (K consecutive values) into column j.
  auto nchw_panel = [&](int64_t task) {
    const int64_t grp = task / panels, c0 = (task % panels) * NR;
    const int64_t nr = std::min(NR, Cout - c0);
    Acc* dst = out + task * K * NR;
    if (nr < NR)
      for (int64_t k = 0; k < K; ++k) zero(dst + k * NR + nr, NR - nr);
    for (int64_t j = 0; j < nr; ++j) {
      const T* src = w + (grp * Cout + c0 + j) * ws.n;
      for (int64_t k = 0; k < K; ++k) dst[k * NR + j] = Num<T>::load(src[k]);
    }
  };
  const bool nhwc = ps.layout == kNHWC;
  const int64_t tasks = ps.G * (nhwc ? kblocks : panels);
  auto run = [&](const auto& fn) {
    // Small weights (LeNet's 16 x 150) in one go: a pool dispatch would cost more than the copy.
    if (ps.G * panels * K * NR < (int64_t(1) << 15)) {
      for (int64_t t = 0; t < tasks; ++t) fn(t);
    } else {
      pr.run(tasks, fn);
    }
  };
  if (nhwc)
    run(nhwc_rows);
  else
    run(nchw_panel);
}

// NCHW: Col^T rows k in [k0, k0 + kc) for grid positions `runs` (the block's columns), into
// B panels (panel stride kc*NR) for group grp.
template <typename T>
void Conv<T>::pack_colT_panels(const Pass& ps, const T* in, int64_t grp, int64_t k0, int64_t kc,
                               const std::vector<Run>& runs, Acc* Bp) const {
  const int64_t taps = ps.TH() * ps.TW();
  const int64_t cols = runs.empty() ? 0 : runs.back().at + runs.back().len;
  const int64_t full = cols / NR, rest = cols % NR;
  // Each row k is gathered run by run into a contiguous line (long runs: few bounds checks),
  // then dealt out to the panels one NR-wide piece at a time.
  Acc* line = scratch<Acc, kGatherLine>(round_up(cols, NR));
  for (int64_t k = k0; k < k0 + kc; ++k) {
    int64_t ci = k / taps, th = (k % taps) / ps.TW(), tw = k % ps.TW();
    int64_t vlo, vhi;
    ps.v_range(tw, &vlo, &vhi);
    for (const Run& r : runs)
      gather_row_run(ps, in + r.n * ps.is.n + (grp * ps.Cin + ci) * ps.is.c, r, th, tw, vlo, vhi,
                     line + r.at);
    Acc* dst = Bp + (k - k0) * NR;
    for (int64_t p = 0; p < full; ++p)
      std::memcpy(dst + p * kc * NR, line + p * NR, NR * sizeof(Acc));
    if (rest) {
      zero(line + cols, NR - rest);  // padding columns of the last panel
      std::memcpy(dst + full * kc * NR, line + full * NR, NR * sizeof(Acc));
    }
  }
}

// NHWC: Col rows (grid positions q0 ..) restricted to k in [k0, k0 + kc), row-major with
// leading dimension kc; k = (th, tw, ci) so each tap contributes one contiguous channel run.
template <typename T>
void Conv<T>::pack_col_rows(const Pass& ps, const T* in, int64_t grp, int64_t q0, int64_t rows,
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
        copy_widen(d + tlo * Cin, in_n + ih * ps.is.h + (iw0 + tlo) * ps.is.w, (thi - tlo) * Cin,
                   1);
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
    ps.next_position(&n, &u, &v);
  }
}

// NHWC bwd_filter: im2col columns [k0, k0 + kn) (k = (kh, kw, ci)) for positions q0 .. q0+pc
// as B panels [col / NR][pos][col % NR] (panel stride pc*NR), zero-padded to whole panels.
template <typename T>
void Conv<T>::pack_col_panels_nhwc(const Pass& ps, const T* x, int64_t grp, int64_t q0, int64_t pc,
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
    ps.next_position(&n, &u, &v);
  }
}

#define JAXCONV_INSTANTIATE(T)                                                                     \
  template Pass Conv<T>::forward_pass() const;                                                     \
  template Pass Conv<T>::bwd_data_phase(int64_t rh, int64_t rw) const;                             \
  template const typename Conv<T>::Acc* Conv<T>::pack_pass_weights(                                \
      const ParallelRunner& pr, const Pass& ps, const T* w, bool transposed) const;                \
  template void Conv<T>::pack_forward_panels(const ParallelRunner& pr, const Pass& ps, const T* w, \
                                             Acc* out) const;                                      \
  template void Conv<T>::pack_colT_panels(const Pass& ps, const T* in, int64_t grp, int64_t k0,    \
                                          int64_t kc, const std::vector<Run>& runs, Acc* Bp)       \
      const;                                                                                       \
  template void Conv<T>::pack_col_rows(const Pass& ps, const T* in, int64_t grp, int64_t q0,       \
                                       int64_t rows, int64_t k0, int64_t kc, Acc* A) const;        \
  template void Conv<T>::pack_col_panels_nhwc(const Pass& ps, const T* x, int64_t grp, int64_t q0, \
                                              int64_t pc, int64_t k0, int64_t kn, Acc* Bp) const;
JAXCONV_FOR_EACH_STORAGE_TYPE(JAXCONV_INSTANTIATE)
#undef JAXCONV_INSTANTIATE

}  // namespace jaxconv
