// What the two layouts' max-pooling kernels share (max_pool2d_nchw.h, max_pool2d_nhwc.h): the
// vector of lanes, the selection rule, a window's in-bounds taps and the scalar scan of one
// output cell. Included only by max_pool2d_kernels.cc, which is compiled once per capability
// (kernel_table.h), so everything here lives in that capability's namespace.
//
// The selection rule is written branch-free, element-wise over a block of lanes, so the compiler
// vectorizes it:
//   keep the best m over candidate v  <=>  v <= m  or  m is NaN
// (so v wins when v > m or v is NaN and m is not), and the first in-bounds tap of a window
// initializes (m, index) unconditionally. The rule is exact (no arithmetic), so every vector
// width and every grouping of lanes gives the same values and indices bit for bit.
//
// The forward exists twice per layout, kIndices true and false: with indices (the gradient's
// residual) and values-only (the primal of a max_pool2d without gradient). kIndices is a
// template parameter, so the values-only scan has no index selects, index stores or branches on
// a null pointer: the index output pointer is null there and is never offset (idx_at) nor
// written.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu_common.h"

namespace jaxconv::JAXCONV_CPU_CAPABILITY::max_pool {

// Bytes per vector of lanes: one 256-bit register (two SSE registers in the baseline objects).
inline constexpr int kVectorBytes = 32;

// One vector of lanes as GCC vectors: values (floats or doubles) and the signed integer vectors
// of the same width that comparisons return and that carry the indices.
//
// Stride 2 (NCHW): two vectors (a, b) hold 2*kLanes consecutive input columns; the even
// columns (one tap for the block's kLanes outputs) and the odd ones (the next tap, at dilation
// 1) are taken by shuffles that stay within 128-bit halves, one instruction each (vshufps,
// vunpcklpd). Lane i then holds output pos()[i] of the block; pos() is its own inverse, so the
// same shuffle puts values and indices back in order once per block, at the store.
template <typename S>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(kVectorBytes)));
  typedef int32_t I __attribute__((vector_size(kVectorBytes)));
  static I even() { return I{0, 2, 8, 10, 4, 6, 12, 14}; }
  static I odd() { return I{1, 3, 9, 11, 5, 7, 13, 15}; }
  static I pos() { return I{0, 1, 4, 5, 2, 3, 6, 7}; }
};
template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(kVectorBytes)));
  typedef int64_t I __attribute__((vector_size(kVectorBytes)));
  static I even() { return I{0, 4, 2, 6}; }
  static I odd() { return I{1, 5, 3, 7}; }
  static I pos() { return I{0, 2, 1, 3}; }
};

// Loads, stores and the selection rule for storage type T (accumulation type Acc = Num<T>::acc).
template <typename T, bool kIndices>
struct Ops {
  using Acc = typename Num<T>::acc;
  using V = typename Lanes<Acc>::V;
  using I = typename Lanes<Acc>::I;
  using IS = std::remove_reference_t<decltype(I{}[0])>;  // index lane type
  static constexpr int64_t kLanes = kVectorBytes / sizeof(Acc);

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
  // The selection rule, for a vector of lanes (V, I: compare, compare, or, two blends) and for
  // one lane (Acc, int32_t: it compiles to conditional moves, where a branch would be
  // mispredicted about every other tap on random data). Values-only (kIndices false): the index
  // select is compiled out, so the index registers are dead and the compiler drops them.
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
  // A cell whose window holds padding only (possible with dilation): -inf, index -1.
  static void store_empty(T* y, int32_t* idx) {
    *y = Num<T>::store(-std::numeric_limits<Acc>::infinity());
    if constexpr (kIndices) *idx = -1;
  }
};

// The pool geometry both layouts read, unpacked once, and the window walk they share.
struct Window {
  static constexpr int kChains = 4;  // vectors scanned side by side (see max_pool2d_kernels.cc)
  const PoolGeometry& g;
  Strides4 xs, ys;
  int64_t KH, KW, sh, sw, dil_h, dil_w, pt, pl;

  explicit Window(const PoolGeometry& geo)
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

  // In-bounds taps of window position o along an axis (window_taps, without its divisions for
  // the undilated case).
  static TapRange taps(int64_t o, int64_t s, int64_t pad, int64_t d, int64_t k, int64_t size) {
    if (d != 1) return window_taps(o, s, pad, d, k, size);
    const int64_t i0 = o * s - pad;
    const int64_t lo = std::min(k, std::max<int64_t>(0, -i0));
    return {lo, std::max(lo, std::min(k, size - i0))};
  }
  TapRange row_taps(int64_t oh) const { return taps(oh, sh, pt, dil_h, KH, g.H); }
  TapRange col_taps(int64_t ow) const { return taps(ow, sw, pl, dil_w, KW, g.W); }

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

  // Scalar window scan for one output cell (oh, ow) of one plane (NCHW border cells); `plane`
  // points at the cell's channel, st gives the strides. Stores y and, with kIndices, *idx.
  template <typename T, bool kIndices>
  void scan_cell(const T* plane, Strides4 st, int64_t oh, int64_t ow, T* y, int32_t* idx) const {
    using O = Ops<T, kIndices>;
    using Acc = typename O::Acc;
    const TapRange th = row_taps(oh), tw = col_taps(ow);
    if (th.lo >= th.hi || tw.lo >= tw.hi) return O::store_empty(y, idx);
    Acc m;
    int32_t a;
    auto value = [&](int64_t ih, int64_t iw) { return Num<T>::load(plane[ih * st.h + iw * st.w]); };
    scan_taps(
        oh, ow, th, tw,
        [&](int64_t ih, int64_t iw) {
          m = value(ih, iw);
          a = int32_t(ih * g.W + iw);
        },
        [&](int64_t ih, int64_t iw) { O::update(value(ih, iw), int32_t(ih * g.W + iw), &m, &a); });
    *y = Num<T>::store(m);
    if constexpr (kIndices) *idx = a;
  }

  // Calls fn(std::integral_constant<int, n>) for the n = min(kChains, count / unit) vectors
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
};

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY::max_pool
