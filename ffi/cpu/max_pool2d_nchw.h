// Max pooling on NCHW planes, forward and backward (max_pool2d.cc has the semantics,
// max_pool2d_scan.h the shared selection rule and window walk).
//
// Forward, per (image, channel) plane: interior columns (windows inside the input horizontally)
// go kLanes outputs per vector, up to kChains vectors side by side. The input column of tap kw for
// output ow is ow*sw + kw*dil_w - pl, so consecutive outputs read
//   kStride1:       a contiguous run,
//   kStride2:       the even columns of two vectors (see Lanes),
//   kStride2Pairs:  the same, and the odd columns are tap kw + 1 (dilation 1),
//   kPhaseRows:     larger strides and the half types: a contiguous run of a phase row
//                   P[h][r][j] = x[h][j*sw + r] built per plane, tap kw reading phase
//                   r = off mod sw at j = ow + off div sw, off = kw*dil_w - pl.
// Border columns go through the scalar scan_cell.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "max_pool2d_scan.h"

namespace jaxconv::JAXCONV_CPU_CAPABILITY::max_pool {

template <typename T, bool kIndices>
struct Nchw : Window {
  using O = Ops<T, kIndices>;
  using Acc = typename O::Acc;
  using V = typename O::V;
  using I = typename O::I;
  using IS = typename O::IS;
  static constexpr int64_t kLanes = O::kLanes;
  using Window::Window;

  enum class Cols { kStride1, kStride2, kStride2Pairs, kPhaseRows };

  struct PlaneScan {
    const T* x;
    const Acc* P;  // phase rows, L per (h, r)
    int64_t L;
    const int64_t* tap_r;
    const int64_t* tap_q;
  };

  // The block's kLanes inputs of tap (ih, kw) at output column ow; kStride2Pairs also returns
  // tap kw + 1's in *next.
  template <Cols mode>
  [[gnu::always_inline]] inline V tap_lanes(const PlaneScan& ps, int64_t ih, int64_t kw, int64_t ow,
                                            V* next) const {
    if constexpr (mode == Cols::kPhaseRows) {
      return O::load_acc(ps.P + (ih * sw + ps.tap_r[kw]) * ps.L + ow + ps.tap_q[kw]);
    } else {
      const Acc* row = reinterpret_cast<const Acc*>(ps.x) + ih * xs.h;
      const int64_t col = ow * sw + kw * dil_w - pl;
      if constexpr (mode == Cols::kStride1) {
        return O::load_acc(row + col);
      } else {
        // Columns col .. col + 2*kLanes - 1; near the row's end the second vector would
        // reach past it (by columns no lane uses), so there both come from a copy.
        V a, b;
        if (col + 2 * kLanes <= g.W) {
          a = O::load_acc(row + col);
          b = O::load_acc(row + col + kLanes);
        } else {
          Acc tmp[2 * kLanes] = {};
          std::memcpy(tmp, row + col, sizeof(Acc) * (g.W - col));
          a = O::load_acc(tmp);
          b = O::load_acc(tmp + kLanes);
        }
        if constexpr (mode == Cols::kStride2Pairs)
          *next = __builtin_shuffle(a, b, Lanes<Acc>::odd());
        return __builtin_shuffle(a, b, Lanes<Acc>::even());
      }
    }
  }

  // NB vectors of consecutive outputs ow .. ow + NB*kLanes - 1 of output row oh, whose
  // windows are in-bounds horizontally and have the in-bounds rows th, stored at y[0 ..] and
  // idx[0 ..] (the row's outputs from ow on, or a scratch block). While scanning, the
  // index vectors hold the tap's offset kh*dil_h*W + kw*dil_w from the window's origin (the same
  // for every lane and vector, so one broadcast per tap); the origin is added at the store.
  template <Cols mode, int NB>
  void interior_blocks(const PlaneScan& ps, int64_t oh, int64_t ow, TapRange th, T* y,
                       int32_t* idx) const {
    constexpr bool kPairs = mode == Cols::kStride2Pairs;
    constexpr bool kShuffled = kPairs || mode == Cols::kStride2;
    V m[NB];
    I a[NB];
    V next;
    const int64_t ih0 = oh * sh - pt;
    // The first in-bounds tap (row th.lo, column 0) starts every lane's scan.
    {
      const int64_t ih = ih0 + th.lo * dil_h;
      const I off = I{} + IS(th.lo * dil_h * g.W);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        m[b] = tap_lanes<mode>(ps, ih, 0, ow + b * kLanes, &next);
        a[b] = off;
        if (kPairs && KW > 1) O::update(next, off + IS(1), &m[b], &a[b]);
      }
    }
    // The other taps in row-major order; with pairs, a last tap of odd KW goes alone.
    auto tap = [&](int64_t kh, int64_t kw, auto with_next) {
      const I off = I{} + IS(kh * dil_h * g.W + kw * dil_w);
      const int64_t ih = ih0 + kh * dil_h;
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        O::update(tap_lanes<mode>(ps, ih, kw, ow + b * kLanes, &next), off, &m[b], &a[b]);
        if constexpr (decltype(with_next)::value) O::update(next, off + IS(1), &m[b], &a[b]);
      }
    };
    constexpr int64_t kStep = kPairs ? 2 : 1;
    for (int64_t kh = th.lo; kh < th.hi; ++kh) {
      int64_t kw = kh == th.lo ? kStep : 0;
      for (; kw + kStep <= KW; kw += kStep) tap(kh, kw, std::bool_constant<kPairs>{});
      if (kw < KW) tap(kh, kw, std::false_type{});
    }
    // Origin of each lane's window: row ih0, column (ow + position)*sw - pl.
    I lane_pos;
    if constexpr (kShuffled) {
      lane_pos = Lanes<Acc>::pos();
    } else {
      for (int64_t i = 0; i < kLanes; ++i) lane_pos[i] = IS(i);
    }
    const I origin = lane_pos * IS(sw) + IS(ih0 * g.W + ow * sw - pl);
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      V mv = m[b];
      I iv = a[b] + origin + IS(b * kLanes * sw);
      if constexpr (kShuffled) {
        mv = __builtin_shuffle(mv, Lanes<Acc>::pos());
        iv = __builtin_shuffle(iv, Lanes<Acc>::pos());
      }
      O::store_lanes(mv, iv, y + b * kLanes, O::idx_at(idx, b * kLanes));
    }
  }

  template <Cols mode>
  void interior_row(const PlaneScan& ps, int64_t oh, int64_t ow_lo, int64_t ow_hi, TapRange th,
                    T* yrow, int32_t* irow) const {
    with_chains(ow_hi - ow_lo, kLanes, [&](auto chains) {
      constexpr int NB = decltype(chains)::value;
      steps_ending_at(ow_lo, ow_hi, NB * kLanes, [&](int64_t ow) {
        interior_blocks<mode, NB>(ps, oh, ow, th, yrow + ow, O::idx_at(irow, ow));
      });
    });
  }

  // One (image, channel) plane; P is the phase-row scratch (H*sw*L + kLanes elements).
  void forward_plane(const T* x, T* y, int32_t* idx, Acc* P) const {
    const int64_t L = (g.W + sw - 1) / sw;
    int64_t ow_lo = ceil_div(pl, sw);                                    // ow*sw - pl >= 0
    int64_t ow_hi = floor_div(g.W - 1 + pl - (KW - 1) * dil_w, sw) + 1;  // last tap < W
    ow_lo = std::min(std::max<int64_t>(ow_lo, 0), g.OW);
    ow_hi = std::max(std::min(ow_hi, g.OW), ow_lo);
    if (KW > 64) ow_hi = ow_lo;  // no vector blocks: all scalar
    // Fewer interior outputs than a vector (small planes: LeNet's 10x10 -> 5x5) go as one
    // block of kLanes through the phase rows, whose buffer has kLanes elements of slack past
    // its end: the lanes past ow_hi read whatever follows and are not stored.
    const bool partial = ow_hi - ow_lo < kLanes;
    Cols mode = Cols::kPhaseRows;
    if constexpr (std::is_same_v<T, Acc>) {
      if (!partial && sw == 1) mode = Cols::kStride1;
      if (!partial && sw == 2) mode = dil_w == 1 ? Cols::kStride2Pairs : Cols::kStride2;
    }
    int64_t tap_r[64], tap_q[64];
    if (ow_hi > ow_lo && mode == Cols::kPhaseRows) {
      for (int64_t kw = 0; kw < KW; ++kw) {
        const int64_t off = kw * dil_w - pl;
        tap_q[kw] = floor_div(off, sw);
        tap_r[kw] = off - tap_q[kw] * sw;
      }
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t r = 0; r < sw; ++r) {
          Acc* ph = P + (h * sw + r) * L;
          const T* row = x + h * xs.h + r;
          for (int64_t j = 0; j * sw + r < g.W; ++j) ph[j] = Num<T>::load(row[j * sw]);
        }
    }
    const PlaneScan ps{x, P, L, tap_r, tap_q};
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      T* yrow = y + oh * ys.h;
      int32_t* irow = O::idx_at(idx, oh * ys.h);
      auto scan_cells = [&](int64_t from, int64_t to) {
        for (int64_t ow = from; ow < to; ++ow)
          scan_cell<T, kIndices>(x, xs, oh, ow, yrow + ow, O::idx_at(irow, ow));
      };
      scan_cells(0, ow_lo);  // border columns
      scan_cells(ow_hi, g.OW);
      if (ow_hi == ow_lo) continue;
      const TapRange th = row_taps(oh);
      if (th.lo >= th.hi) {  // a window of padding rows only (dilation)
        for (int64_t ow = ow_lo; ow < ow_hi; ++ow) O::store_empty(yrow + ow, O::idx_at(irow, ow));
        continue;
      }
      if constexpr (std::is_same_v<T, Acc>) {
        switch (mode) {
          case Cols::kStride1:
            interior_row<Cols::kStride1>(ps, oh, ow_lo, ow_hi, th, yrow, irow);
            continue;
          case Cols::kStride2:
            interior_row<Cols::kStride2>(ps, oh, ow_lo, ow_hi, th, yrow, irow);
            continue;
          case Cols::kStride2Pairs:
            interior_row<Cols::kStride2Pairs>(ps, oh, ow_lo, ow_hi, th, yrow, irow);
            continue;
          case Cols::kPhaseRows: break;
        }
      }
      if (partial) {
        T y_block[kLanes];
        int32_t idx_block[kLanes];
        interior_blocks<Cols::kPhaseRows, 1>(ps, oh, ow_lo, th, y_block, idx_block);
        for (int64_t ow = ow_lo; ow < ow_hi; ++ow) {
          yrow[ow] = y_block[ow - ow_lo];
          if constexpr (kIndices) irow[ow] = idx_block[ow - ow_lo];
        }
        continue;
      }
      interior_row<Cols::kPhaseRows>(ps, oh, ow_lo, ow_hi, th, yrow, irow);
    }
  }

  // A task per (image, channel) plane.
  void forward(const ParallelRunner& pr, const T* x, T* y, int32_t* idx) const {
    const int64_t L = (g.W + sw - 1) / sw;
    pr.run(g.N * g.C, [&](int64_t task) {
      const int64_t n = task / g.C, c = task % g.C;
      thread_local std::vector<Acc> P;
      P.resize(g.H * sw * L + kLanes);
      forward_plane(x + n * xs.n + c * xs.c, y + n * ys.n + c * ys.c,
                    O::idx_at(idx, n * ys.n + c * ys.c), P.data());
    });
  }

  // dx[n, c, idx] += dy[n, c, oh, ow]. A task per (image, channel) plane of dx walks the plane's
  // outputs in order, so results are deterministic. Float types add straight into dx; half types
  // into a float32 plane that is rounded once.
  void backward(const ParallelRunner& pr, const T* dy, const int32_t* idx, T* dx) const {
    const int64_t plane = g.H * g.W, out_plane = g.OH * g.OW;
    pr.run(g.N * g.C, [&](int64_t task) {
      const int64_t n = task / g.C, c = task % g.C;
      T* dxp = dx + n * xs.n + c * xs.c;
      Acc* acc;
      if constexpr (std::is_same_v<T, Acc>) {
        acc = dxp;
        std::memset(acc, 0, sizeof(Acc) * plane);
      } else {
        thread_local std::vector<Acc> buf;
        buf.assign(plane, Acc(0));
        acc = buf.data();
      }
      const T* gy = dy + n * ys.n + c * ys.c;
      const int32_t* id = idx + n * ys.n + c * ys.c;
      for (int64_t o = 0; o < out_plane; ++o) {
        const int32_t i = id[o];
        // Indices come from our forward; anything outside the plane (the -1 of an empty
        // window) receives nothing.
        if (uint32_t(i) < uint32_t(plane)) acc[i] += Num<T>::load(gy[o]);
      }
      if constexpr (!std::is_same_v<T, Acc>) {
        for (int64_t i = 0; i < plane; ++i) dxp[i] = Num<T>::store(acc[i]);
      }
    });
  }
};

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY::max_pool
