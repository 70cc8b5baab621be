// Max pooling on NHWC images, forward and backward (max_pool2d.cc has the semantics,
// max_pool2d_scan.h the shared selection rule and window walk).
//
// Forward, per output row of one image: per output cell, up to kChains vectors of consecutive
// channels scan the window's in-bounds taps together; every lane of a tap has the same flat
// index. Fewer than kLanes channels go through the scalar rule, the channels of a tap side by
// side.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "max_pool2d_scan.h"

namespace jaxconv::JAXCONV_CPU_CAPABILITY::max_pool {

template <typename T, bool kIndices>
struct Nhwc : Window {
  using O = Ops<T, kIndices>;
  using Acc = typename O::Acc;
  using V = typename O::V;
  using I = typename O::I;
  using IS = typename O::IS;
  static constexpr int64_t kLanes = O::kLanes;
  using Window::Window;

  // NB vectors of channels c0 .. c0 + NB*kLanes - 1 of cell (oh, ow), whose window has the
  // in-bounds taps th x tw; yc and ic point at the cell's channel 0.
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
            m[b] = O::load_t(src(ih, iw) + b * kLanes);
            a[b] = I{} + IS(ih * g.W + iw);
          }
        },
        [&](int64_t ih, int64_t iw) {
          const I at = I{} + IS(ih * g.W + iw);
#pragma GCC unroll 4
          for (int b = 0; b < NB; ++b)
            O::update(O::load_t(src(ih, iw) + b * kLanes), at, &m[b], &a[b]);
        });
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b)
      O::store_lanes(m[b], a[b], yc + c0 + b * kLanes, O::idx_at(ic, c0 + b * kLanes));
  }

  // Fewer channels than a vector: the scalar rule, the channels of a tap side by side.
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
            O::update(Num<T>::load(src[c]), int32_t(ih * g.W + iw), &m[c], &a[c]);
        });
    for (int64_t c = 0; c < g.C; ++c) {
      yc[c] = Num<T>::store(m[c]);
      if constexpr (kIndices) ic[c] = a[c];
    }
  }

  // Output row oh of one image (x, y, idx at the image).
  void forward_row(const T* x, T* y, int32_t* idx, int64_t oh) const {
    const TapRange th = row_taps(oh);
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      const TapRange tw = col_taps(ow);
      T* yc = y + oh * ys.h + ow * ys.w;
      int32_t* ic = O::idx_at(idx, oh * ys.h + ow * ys.w);
      if (th.lo >= th.hi || tw.lo >= tw.hi) {  // a window of padding only (dilation)
        for (int64_t c = 0; c < g.C; ++c) O::store_empty(yc + c, O::idx_at(ic, c));
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

  // A task per (image, output row).
  void forward(const ParallelRunner& pr, const T* x, T* y, int32_t* idx) const {
    pr.run(g.N * g.OH, [&](int64_t task) {
      const int64_t n = task / g.OH, oh = task % g.OH;
      forward_row(x + n * xs.n, y + n * ys.n, O::idx_at(idx, n * ys.n), oh);
    });
  }

  // dx[n, idx, c] += dy[n, oh, ow, c]. A task per (image, block of up to 64 channels) of dx
  // walks the image's outputs in order, so results are deterministic. Float types add straight
  // into dx; half types into a float32 slab (cells x block channels) that is rounded once.
  void backward(const ParallelRunner& pr, const T* dy, const int32_t* idx, T* dx) const {
    const int64_t plane = g.H * g.W, out_plane = g.OH * g.OW;
    const int64_t CB = std::min<int64_t>(g.C, 64);
    const int64_t cblocks = (g.C + CB - 1) / CB;
    pr.run(g.N * cblocks, [&](int64_t task) {
      const int64_t n = task / cblocks, c0 = (task % cblocks) * CB, cb = std::min(CB, g.C - c0);
      T* dxb = dx + n * xs.n + c0;
      // acc[i * cell + c]: i the flat input cell, c the channel within the block.
      Acc* acc;
      int64_t cell;
      if constexpr (std::is_same_v<T, Acc>) {
        acc = dxb;
        cell = g.C;
      } else {
        thread_local std::vector<Acc> buf;
        buf.resize(plane * cb);
        acc = buf.data();
        cell = cb;
      }
      for (int64_t i = 0; i < plane; ++i)
        for (int64_t c = 0; c < cb; ++c) acc[i * cell + c] = Acc(0);
      const T* gy = dy + n * ys.n + c0;
      const int32_t* id = idx + n * ys.n + c0;
      for (int64_t o = 0; o < out_plane; ++o)
        for (int64_t c = 0; c < cb; ++c) {
          const int32_t i = id[o * g.C + c];
          // Indices come from our forward; anything outside the plane (the -1 of an empty
          // window) receives nothing.
          if (uint32_t(i) < uint32_t(plane)) acc[i * cell + c] += Num<T>::load(gy[o * g.C + c]);
        }
      if constexpr (!std::is_same_v<T, Acc>) {
        for (int64_t i = 0; i < plane; ++i)
          for (int64_t c = 0; c < cb; ++c) dxb[i * g.C + c] = Num<T>::store(acc[i * cell + c]);
      }
    });
  }
};

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY::max_pool
