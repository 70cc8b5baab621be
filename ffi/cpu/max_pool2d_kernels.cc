// Max-pooling kernels (see max_pool2d.cc for the semantics). The selection rule is written
// branch-free, element-wise over a block of lanes, so the compiler vectorizes it:
//   keep the best m over candidate v  <=>  v <= m  or  m is NaN
// (so v wins when v > m or v is NaN and m is not), and the first in-bounds tap of a window
// initializes (m, index) unconditionally.
//
// A lane's running maximum is a chain of dependent compare+blend steps, one per tap. One such
// chain per register leaves the vector units idle most of the time, so the kernels scan up to
// kChains registers side by side (consecutive output blocks in NCHW, channel blocks in NHWC).
//
// The kernels are compiled once per capability (kernel_table.h) and chosen at load time. Forward
// vectorizes registers of consecutive outputs of a row (NCHW) or of channels of a cell (NHWC), up
// to four side by side; windows that cross the left/right border take a scalar scan.
//
// The forward exists twice, PoolK<T, kIndices>: with indices (the gradient's residual) and
// values-only (the primal of a max_pool2d without gradient). kIndices is a template parameter,
// so the values-only scan has no index selects, index stores or branches on a null pointer: the
// index output pointer is null there and is never offset (idx_at) nor written.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "kernel_table.h"

// The kernels pass GCC vectors between inlined helpers; GCC's note about the ABI for passing
// them does not apply to anything that crosses a call boundary here.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace jaxconv::JAXCONV_CPU_CAPABILITY {
namespace {

// One 256-bit register of lanes as GCC vectors: values (8 floats or 4 doubles) and the signed
// integer vectors of the same width that comparisons return and that carry the indices.
//
// Stride 2 (NCHW): two registers (a, b) hold 2*kLanes consecutive input columns; the even
// columns (one tap for the block's kLanes outputs) and the odd ones (the next tap, at dilation
// 1) are taken by shuffles that stay within 128-bit halves, one instruction each (vshufps,
// vunpcklpd). Lane i then holds output kPos[i] of the block; kPos is its own inverse, so the
// same shuffle puts values and indices back in order once per block, at the store.
template <typename S>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  static I even() { return I{0, 2, 8, 10, 4, 6, 12, 14}; }
  static I odd() { return I{1, 3, 9, 11, 5, 7, 13, 15}; }
  static I pos() { return I{0, 1, 4, 5, 2, 3, 6, 7}; }
};
template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
  static I even() { return I{0, 4, 2, 6}; }
  static I odd() { return I{1, 5, 3, 7}; }
  static I pos() { return I{0, 2, 1, 3}; }
};

template <typename T, bool kIndices>
struct PoolK {
  using Acc = typename Num<T>::acc;
  static constexpr int64_t kLanes = 32 / sizeof(Acc);  // outputs (NCHW) or channels (NHWC)
  static constexpr int kChains = 4;                    // registers scanned side by side
  const PoolGeometry& g;
  Strides4 xs, ys;
  int64_t KH, KW, sh, sw, dil_h, dil_w, pt, pl;

  explicit PoolK(const PoolGeometry& geo)
      : g(geo),
        xs(geo.x_strides()),
        ys(geo.y_strides()),
        KH(geo.p.kernel_h),
        KW(geo.p.kernel_w),
        sh(geo.p.stride_h),
        sw(geo.p.stride_w),
        dil_h(geo.p.dilation_h),
        dil_w(geo.p.dilation_w),
        pt(geo.p.pad_top),
        pl(geo.p.pad_left) {}

  using V = typename Lanes<Acc>::V;
  using I = typename Lanes<Acc>::I;
  using IS = std::remove_reference_t<decltype(I{}[0])>;  // index lane type

  [[gnu::always_inline]] static inline V load_acc(const Acc* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  [[gnu::always_inline]] static inline V load_t(const T* p) {
    if constexpr (std::is_same_v<T, Acc>) {
      return load_acc(reinterpret_cast<const Acc*>(p));
    } else {
      Acc tmp[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) tmp[i] = Num<T>::load(p[i]);
      return load_acc(tmp);
    }
  }
  // The selection rule, for a register of lanes (V, I: compare, compare, or, two blends) and
  // for one lane (Acc, int32_t: it compiles to conditional moves, where a branch would be
  // mispredicted about every other tap on random data).
  // Values-only (kIndices false): the index select is compiled out, so the index registers are
  // dead and the compiler drops them.
  template <typename X, typename J>
  [[gnu::always_inline]] static inline void update(X v, J at, X* m, J* a) {
    const auto keep = (v <= *m) | (*m != *m);
    *m = keep ? *m : v;
    if constexpr (kIndices) *a = keep ? *a : at;
  }
  [[gnu::always_inline]] static inline void store_lanes(V m, I a, T* y, int32_t* idx) {
    if constexpr (std::is_same_v<T, Acc>) {
      std::memcpy(y, &m, sizeof(V));
    } else {
      for (int64_t i = 0; i < kLanes; ++i) y[i] = Num<T>::store(m[i]);
    }
    if constexpr (!kIndices) {
      return;
    } else if constexpr (sizeof(IS) == sizeof(int32_t)) {
      std::memcpy(idx, &a, sizeof(I));
    } else {
      for (int64_t i = 0; i < kLanes; ++i) idx[i] = int32_t(a[i]);
    }
  }

  // The index output `off` elements past p; null in the values-only forward, whose index
  // pointer is null (offsetting a null pointer is undefined).
  [[gnu::always_inline]] static inline int32_t* idx_at(int32_t* p, int64_t off) {
    if constexpr (kIndices)
      return p + off;
    else
      return nullptr;
  }

  // In-bounds taps of window position o along an axis (window_taps, without its divisions for
  // the undilated case).
  static inline TapRange taps(int64_t o, int64_t s, int64_t pad, int64_t d, int64_t k,
                              int64_t size) {
    if (d != 1) return window_taps(o, s, pad, d, k, size);
    const int64_t i0 = o * s - pad;
    const int64_t lo = std::min(k, std::max<int64_t>(0, -i0));
    return {lo, std::max(lo, std::min(k, size - i0))};
  }

  // Walks the in-bounds taps of output cell (oh, ow) in row-major order: first(ih, iw) for
  // the first, which starts the scan, then rest(ih, iw) for each of the others.
  template <typename First, typename Rest>
  void scan_taps(int64_t oh, int64_t ow, TapRange th, TapRange tw, First&& first,
                 Rest&& rest) const {
    const int64_t ih0 = oh * sh - pt, iw0 = ow * sw - pl;
    first(ih0 + th.lo * dil_h, iw0 + tw.lo * dil_w);
    for (int64_t kh = th.lo; kh < th.hi; ++kh)
      for (int64_t kw = kh == th.lo ? tw.lo + 1 : tw.lo; kw < tw.hi; ++kw)
        rest(ih0 + kh * dil_h, iw0 + kw * dil_w);
  }

  // Scalar window scan for one output cell of one plane (border cells, small planes); `plane`
  // points at the cell's channel, st gives the strides. *arg is written only with kIndices.
  void scan_cell(const T* plane, Strides4 st, int64_t oh, int64_t ow, Acc* best,
                 int32_t* arg) const {
    const TapRange th = taps(oh, sh, pt, dil_h, KH, g.H);
    const TapRange tw = taps(ow, sw, pl, dil_w, KW, g.W);
    if (th.lo >= th.hi || tw.lo >= tw.hi) {  // only padding (dilation): -inf, index -1
      *best = -std::numeric_limits<Acc>::infinity();
      if constexpr (kIndices) *arg = -1;
      return;
    }
    Acc m;
    int32_t a;
    auto value = [&](int64_t ih, int64_t iw) { return Num<T>::load(plane[ih * st.h + iw * st.w]); };
    scan_taps(
        oh, ow, th, tw,
        [&](int64_t ih, int64_t iw) {
          m = value(ih, iw);
          a = int32_t(ih * g.W + iw);
        },
        [&](int64_t ih, int64_t iw) { update(value(ih, iw), int32_t(ih * g.W + iw), &m, &a); });
    *best = m;
    if constexpr (kIndices) *arg = a;
  }

  // Calls fn(std::integral_constant<int, n>) for the n = min(kChains, count / unit) registers
  // that a run of `count` lanes can fill (count >= unit).
  template <typename F>
  static void with_chains(int64_t count, int64_t unit, F&& fn) {
    switch (std::min<int64_t>(kChains, count / unit)) {
      case 4: return fn(std::integral_constant<int, 4>{});
      case 3: return fn(std::integral_constant<int, 3>{});
      case 2: return fn(std::integral_constant<int, 2>{});
      default: return fn(std::integral_constant<int, 1>{});
    }
  }

  // Runs body(start) over [lo, hi) in steps of `width` (hi - lo >= width); the last step is
  // moved back to end at hi: it overlaps the one before and recomputes the same values, which
  // spares a scalar remainder.
  template <typename F>
  static void steps_ending_at(int64_t lo, int64_t hi, int64_t width, F&& body) {
    for (int64_t start = lo; start < hi; start += width) body(std::min(start, hi - width));
  }

  // ---- NCHW -----------------------------------------------------------------------------
  //
  // Interior columns (windows inside the input horizontally) go kLanes outputs per register.
  // The input column of tap kw for output ow is ow*sw + kw*dil_w - pl, so consecutive outputs read
  //   kStride1:       a contiguous run,
  //   kStride2:       the even columns of two registers (see Lanes),
  //   kStride2Pairs:  the same, and the odd columns are tap kw + 1 (dilation 1),
  //   kPhaseRows:     larger strides and the half types: a contiguous run of a phase row
  //                   P[h][r][j] = x[h][j*sw + r] built per plane, tap kw reading phase
  //                   r = off mod sw at j = ow + off div sw, off = kw*dil_w - pl.
  // Border columns go through scan_cell.
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
      return load_acc(ps.P + (ih * sw + ps.tap_r[kw]) * ps.L + ow + ps.tap_q[kw]);
    } else {
      const Acc* row = reinterpret_cast<const Acc*>(ps.x) + ih * xs.h;
      const int64_t col = ow * sw + kw * dil_w - pl;
      if constexpr (mode == Cols::kStride1) {
        return load_acc(row + col);
      } else {
        // Columns col .. col + 2*kLanes - 1; near the row's end the second register would
        // reach past it (by columns no lane uses), so there both come from a copy.
        V a, b;
        if (col + 2 * kLanes <= g.W) {
          a = load_acc(row + col);
          b = load_acc(row + col + kLanes);
        } else {
          Acc tmp[2 * kLanes] = {};
          std::memcpy(tmp, row + col, sizeof(Acc) * (g.W - col));
          a = load_acc(tmp);
          b = load_acc(tmp + kLanes);
        }
        if constexpr (mode == Cols::kStride2Pairs)
          *next = __builtin_shuffle(a, b, Lanes<Acc>::odd());
        return __builtin_shuffle(a, b, Lanes<Acc>::even());
      }
    }
  }

  // NB registers of consecutive outputs ow .. ow + NB*kLanes - 1 of output row oh, whose
  // windows are in-bounds horizontally and have the in-bounds rows th, stored at y[0 ..] and
  // idx[0 ..] (the row's outputs from ow on, or a scratch block). While scanning, the
  // index registers hold the tap's offset kh*dil_h*W + kw*dil_w from the window's origin (the same
  // for every lane and register, so one broadcast per tap); the origin is added at the store.
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
        if (kPairs && KW > 1) update(next, off + IS(1), &m[b], &a[b]);
      }
    }
    // The other taps in row-major order; with pairs, a last tap of odd KW goes alone.
    auto tap = [&](int64_t kh, int64_t kw, auto with_next) {
      const I off = I{} + IS(kh * dil_h * g.W + kw * dil_w);
      const int64_t ih = ih0 + kh * dil_h;
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        update(tap_lanes<mode>(ps, ih, kw, ow + b * kLanes, &next), off, &m[b], &a[b]);
        if constexpr (decltype(with_next)::value) update(next, off + IS(1), &m[b], &a[b]);
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
      store_lanes(mv, iv, y + b * kLanes, idx_at(idx, b * kLanes));
    }
  }

  template <Cols mode>
  void interior_row(const PlaneScan& ps, int64_t oh, int64_t ow_lo, int64_t ow_hi, TapRange th,
                    T* yrow, int32_t* irow) const {
    with_chains(ow_hi - ow_lo, kLanes, [&](auto chains) {
      constexpr int NB = decltype(chains)::value;
      steps_ending_at(ow_lo, ow_hi, NB * kLanes, [&](int64_t ow) {
        interior_blocks<mode, NB>(ps, oh, ow, th, yrow + ow, idx_at(irow, ow));
      });
    });
  }

  void forward_plane_nchw(const T* x, T* y, int32_t* idx, Acc* P) const {
    const int64_t L = (g.W + sw - 1) / sw;
    int64_t ow_lo = ceil_div(pl, sw);                                    // ow*sw - pl >= 0
    int64_t ow_hi = floor_div(g.W - 1 + pl - (KW - 1) * dil_w, sw) + 1;  // last tap < W
    ow_lo = std::min(std::max<int64_t>(ow_lo, 0), g.OW);
    ow_hi = std::max(std::min(ow_hi, g.OW), ow_lo);
    if (KW > 64) ow_hi = ow_lo;  // no vector blocks: all scalar
    // Fewer interior outputs than a register (small planes: LeNet's 10x10 -> 5x5) go as one
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
      int32_t* irow = idx_at(idx, oh * ys.h);
      auto scan_cells = [&](int64_t from, int64_t to) {
        for (int64_t ow = from; ow < to; ++ow) {
          Acc m;
          scan_cell(x, xs, oh, ow, &m, idx_at(irow, ow));
          yrow[ow] = Num<T>::store(m);
        }
      };
      scan_cells(0, ow_lo);  // border columns
      scan_cells(ow_hi, g.OW);
      if (ow_hi == ow_lo) continue;
      const TapRange th = taps(oh, sh, pt, dil_h, KH, g.H);
      if (th.lo >= th.hi) {  // a window of padding rows only (dilation): -inf, index -1
        for (int64_t ow = ow_lo; ow < ow_hi; ++ow) {
          yrow[ow] = Num<T>::store(-std::numeric_limits<Acc>::infinity());
          if constexpr (kIndices) irow[ow] = -1;
        }
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

  // ---- NHWC -----------------------------------------------------------------------------
  //
  // One output row of one image. Per output cell, NB registers of consecutive channels scan
  // the window's in-bounds taps together; every lane of a tap has the same flat index. Fewer
  // than kLanes channels go through the scalar rule.
  template <int NB>
  void channel_blocks(const T* x, int64_t oh, int64_t ow, int64_t c0, TapRange th, TapRange tw,
                      T* yc, int32_t* ic) const {
    V m[NB];
    I a[NB];
    auto src = [&](int64_t ih, int64_t iw) { return x + ih * xs.h + iw * xs.w + c0; };
    scan_taps(
        oh, ow, th, tw,
        [&](int64_t ih, int64_t iw) {
#pragma GCC unroll 4
          for (int b = 0; b < NB; ++b) {
            m[b] = load_t(src(ih, iw) + b * kLanes);
            a[b] = I{} + IS(ih * g.W + iw);
          }
        },
        [&](int64_t ih, int64_t iw) {
          const I at = I{} + IS(ih * g.W + iw);
#pragma GCC unroll 4
          for (int b = 0; b < NB; ++b) update(load_t(src(ih, iw) + b * kLanes), at, &m[b], &a[b]);
        });
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b)
      store_lanes(m[b], a[b], yc + c0 + b * kLanes, idx_at(ic, c0 + b * kLanes));
  }

  // Fewer channels than a register: the scalar rule, the channels of a tap side by side.
  void channels_scalar(const T* x, int64_t oh, int64_t ow, TapRange th, TapRange tw, T* yc,
                       int32_t* ic) const {
    Acc m[kLanes];
    int32_t a[kLanes];
    scan_taps(
        oh, ow, th, tw,
        [&](int64_t ih, int64_t iw) {
          for (int64_t c = 0; c < g.C; ++c) {
            m[c] = Num<T>::load(x[ih * xs.h + iw * xs.w + c]);
            a[c] = int32_t(ih * g.W + iw);
          }
        },
        [&](int64_t ih, int64_t iw) {
          const T* src = x + ih * xs.h + iw * xs.w;
          for (int64_t c = 0; c < g.C; ++c)
            update(Num<T>::load(src[c]), int32_t(ih * g.W + iw), &m[c], &a[c]);
        });
    for (int64_t c = 0; c < g.C; ++c) {
      yc[c] = Num<T>::store(m[c]);
      if constexpr (kIndices) ic[c] = a[c];
    }
  }

  void forward_row_nhwc(const T* x, T* y, int32_t* idx, int64_t oh) const {
    const TapRange th = taps(oh, sh, pt, dil_h, KH, g.H);
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      const TapRange tw = taps(ow, sw, pl, dil_w, KW, g.W);
      T* yc = y + oh * ys.h + ow * ys.w;
      int32_t* ic = idx_at(idx, oh * ys.h + ow * ys.w);
      if (th.lo >= th.hi || tw.lo >= tw.hi) {
        for (int64_t c = 0; c < g.C; ++c) {
          yc[c] = Num<T>::store(-std::numeric_limits<Acc>::infinity());
          if constexpr (kIndices) ic[c] = -1;
        }
        continue;
      }
      if (g.C < kLanes) {
        channels_scalar(x, oh, ow, th, tw, yc, ic);
        continue;
      }
      with_chains(g.C, kLanes, [&](auto chains) {
        constexpr int NB = decltype(chains)::value;
        steps_ending_at(0, g.C, NB * kLanes,
                        [&](int64_t c0) { channel_blocks<NB>(x, oh, ow, c0, th, tw, yc, ic); });
      });
    }
  }

  void forward(const ParallelRunner& pr, const T* x, T* y, int32_t* idx) const {
    if (g.N == 0 || g.C == 0) return;
    if (g.p.layout == kNHWC) {
      pr.run(g.N * g.OH, [&](int64_t task) {
        const int64_t n = task / g.OH, oh = task % g.OH;
        forward_row_nhwc(x + n * xs.n, y + n * ys.n, idx_at(idx, n * ys.n), oh);
      });
      return;
    }
    const int64_t L = (g.W + sw - 1) / sw;
    pr.run(g.N * g.C, [&](int64_t task) {
      const int64_t n = task / g.C, c = task % g.C;
      thread_local std::vector<Acc> P;
      P.resize(g.H * sw * L + kLanes);
      forward_plane_nchw(x + n * xs.n + c * xs.c, y + n * ys.n + c * ys.c,
                         idx_at(idx, n * ys.n + c * ys.c), P.data());
    });
  }

  // dx[n, c, idx] += dy[n, c, oh, ow]. Tasks own (image, channel block) slabs of dx and walk
  // their outputs in a fixed order, so results are deterministic. Float types add straight into
  // dx; half types into a float32 slab that is rounded once.
  void backward(const ParallelRunner& pr, const T* dy, const int32_t* idx, T* dx) const {
    if (g.N == 0 || g.C == 0) return;
    constexpr bool same = std::is_same_v<T, Acc>;
    const int64_t plane = g.H * g.W, out_plane = g.OH * g.OW;
    const bool nhwc = g.p.layout == kNHWC;
    const int64_t CB = nhwc ? std::min<int64_t>(g.C, 64) : 1;
    const int64_t cblocks = (g.C + CB - 1) / CB;
    pr.run(g.N * cblocks, [&](int64_t task) {
      const int64_t n = task / cblocks, c0 = (task % cblocks) * CB, cb = std::min(CB, g.C - c0);
      // acc addressed as acc[i * as_i + c * as_c]: i the flat input cell, c the channel offset.
      Acc* acc;
      int64_t as_i, as_c;
      if constexpr (same) {
        acc = dx + n * xs.n + c0 * xs.c;
        as_i = nhwc ? g.C : 1;
        as_c = xs.c;
      } else {
        thread_local std::vector<Acc> buf;
        buf.resize(plane * cb);
        acc = buf.data();
        as_i = cb;
        as_c = 1;
      }
      if (nhwc || !same) {
        for (int64_t i = 0; i < plane; ++i)
          for (int64_t c = 0; c < cb; ++c) acc[i * as_i + c * as_c] = Acc(0);
      } else {
        std::memset(acc, 0, sizeof(Acc) * plane);
      }
      const T* gy = dy + n * ys.n + c0 * ys.c;
      const int32_t* id = idx + n * ys.n + c0 * ys.c;
      if (nhwc) {
        for (int64_t o = 0; o < out_plane; ++o)
          for (int64_t c = 0; c < cb; ++c) {
            const int32_t i = id[o * g.C + c];
            // Indices come from our forward; anything outside the plane (the -1 of an empty
            // window) receives nothing.
            if (uint32_t(i) < uint32_t(plane))
              acc[i * as_i + c * as_c] += Num<T>::load(gy[o * g.C + c]);
          }
      } else {
        for (int64_t o = 0; o < out_plane; ++o) {
          const int32_t i = id[o];
          if (uint32_t(i) < uint32_t(plane)) acc[i * as_i] += Num<T>::load(gy[o]);
        }
      }
      if constexpr (!same) {
        for (int64_t i = 0; i < plane; ++i)
          for (int64_t c = 0; c < cb; ++c)
            dx[n * xs.n + (c0 + c) * xs.c + i * (nhwc ? g.C : 1)] =
                Num<T>::store(acc[i * as_i + c]);
      }
    });
  }
};

template <typename T>
void forward(const ParallelRunner& pr, const PoolGeometry& g, const T* x, T* y, int32_t* idx) {
  PoolK<T, true>(g).forward(pr, x, y, idx);
}

template <typename T>
void forward_values(const ParallelRunner& pr, const PoolGeometry& g, const T* x, T* y) {
  PoolK<T, false>(g).forward(pr, x, y, nullptr);
}

template <typename T>
void backward(const ParallelRunner& pr, const PoolGeometry& g, const T* dy, const int32_t* idx,
              T* dx) {
  PoolK<T, true>(g).backward(pr, dy, idx, dx);
}

template <typename T>
PoolKernels<T> pool_kernels() {
  return {forward<T>, forward_values<T>, backward<T>};
}

}  // namespace

void add_pool_kernels(KernelTable* table) {
  table->pool_f32 = pool_kernels<float>();
  table->pool_f64 = pool_kernels<double>();
  table->pool_f16 = pool_kernels<f16_t>();
  table->pool_bf16 = pool_kernels<bf16_t>();
}

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY
