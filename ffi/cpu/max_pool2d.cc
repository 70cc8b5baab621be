// CPU max pooling: forward (values and int32 indices in one pass) and backward, side by side.
//
// Forward, per output (oh, ow) and channel: scan the window's in-bounds taps (window_taps in
// geometry.h; padded cells are never candidates) in row-major order and keep the FIRST maximum.
// A NaN beats every number and the first NaN is kept, so NaN propagates with its index. The index
// is the flat offset h * W + w into the input plane, as in PyTorch. A window with no in-bounds tap
// (possible only with dilation) yields -inf and index -1.
//
// Backward: dx[n, c, idx] += dy[n, c, oh, ow] for every output cell. Each task owns whole
// (n, channel-block) planes and walks its outputs in a fixed order into a float32 accumulator,
// so the result is deterministic and half types accumulate in float32.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_common.h"

namespace jaxconv {
namespace {

// Candidate v replaces the current best m (m invalid when !found): strictly greater, or the
// first NaN.
inline bool takes_over(float v, float m, bool found) {
  return !found || v > m || (std::isnan(v) && !std::isnan(m));
}
inline bool takes_over(double v, double m, bool found) {
  return !found || v > m || (std::isnan(v) && !std::isnan(m));
}

// Channels handled together by one task: in NHWC a block of adjacent channels shares each
// window scan and reads contiguous memory; in NCHW each plane is its own task.
int64_t channel_block(const PoolGeometry& g) {
  return g.p.layout == kNHWC ? std::min<int64_t>(std::max<int64_t>(g.C, 1), 64) : 1;
}

template <typename T>
struct Pool {
  using Acc = typename Num<T>::acc;
  const PoolGeometry& g;
  Strides4 xs, ys;
  explicit Pool(const PoolGeometry& geo) : g(geo), xs(geo.x_strides()), ys(geo.y_strides()) {}

  void forward(const ParallelRunner& pr, const T* x, T* y, int32_t* idx) const {
    const int64_t CB = channel_block(g), cblocks = (g.C + CB - 1) / CB;
    pr.run(g.N * cblocks, [&](int64_t task) {
      int64_t n = task / cblocks, c0 = (task % cblocks) * CB, c1 = std::min(g.C, c0 + CB);
      Acc best[64];
      int32_t arg[64];
      bool found[64];
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        TapRange th = window_taps(oh, g.p.stride_h, g.p.pad_top, g.p.dilation_h, g.p.kernel_h, g.H);
        int64_t ih0 = oh * g.p.stride_h - g.p.pad_top;
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          TapRange tw =
              window_taps(ow, g.p.stride_w, g.p.pad_left, g.p.dilation_w, g.p.kernel_w, g.W);
          int64_t iw0 = ow * g.p.stride_w - g.p.pad_left;
          for (int64_t c = c0; c < c1; ++c) found[c - c0] = false;
          for (int64_t kh = th.lo; kh < th.hi; ++kh) {
            int64_t ih = ih0 + kh * g.p.dilation_h;
            for (int64_t kw = tw.lo; kw < tw.hi; ++kw) {
              int64_t iw = iw0 + kw * g.p.dilation_w;
              const T* src = x + n * xs.n + ih * xs.h + iw * xs.w;
              for (int64_t c = c0; c < c1; ++c) {
                Acc v = Num<T>::load(src[c * xs.c]);
                int64_t j = c - c0;
                if (takes_over(v, best[j], found[j])) {
                  best[j] = v;
                  arg[j] = int32_t(ih * g.W + iw);
                  found[j] = true;
                }
              }
            }
          }
          int64_t out = n * ys.n + oh * ys.h + ow * ys.w;
          for (int64_t c = c0; c < c1; ++c) {
            int64_t j = c - c0;
            y[out + c * ys.c] =
                Num<T>::store(found[j] ? best[j] : -std::numeric_limits<Acc>::infinity());
            idx[out + c * ys.c] = found[j] ? arg[j] : -1;
          }
        }
      }
    });
  }

  void backward(const ParallelRunner& pr, const T* dy, const int32_t* idx, T* dx) const {
    const int64_t CB = channel_block(g), cblocks = (g.C + CB - 1) / CB;
    const int64_t plane = g.H * g.W;
    pr.run(g.N * cblocks, [&](int64_t task) {
      int64_t n = task / cblocks, c0 = (task % cblocks) * CB, c1 = std::min(g.C, c0 + CB);
      int64_t cb = c1 - c0;
      // acc[(h*W + w) * cb + (c - c0)]
      thread_local std::vector<Acc> acc;
      acc.assign(plane * cb, Acc(0));
      for (int64_t oh = 0; oh < g.OH; ++oh)
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          int64_t out = n * ys.n + oh * ys.h + ow * ys.w;
          for (int64_t c = c0; c < c1; ++c) {
            int32_t i = idx[out + c * ys.c];
            // Indices come from our forward; anything outside the plane (the -1 of an empty
            // window) receives nothing.
            if (i < 0 || i >= plane) continue;
            acc[i * cb + (c - c0)] += Num<T>::load(dy[out + c * ys.c]);
          }
        }
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t w = 0; w < g.W; ++w) {
          T* dst = dx + n * xs.n + h * xs.h + w * xs.w;
          const Acc* src = acc.data() + (h * g.W + w) * cb;
          for (int64_t c = c0; c < c1; ++c) dst[c * xs.c] = Num<T>::store(src[c - c0]);
        }
    });
  }
};

ffi::Error MaxPool2dFwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                            ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> idx,
                            ffi::Dictionary attrs) {
  static constexpr char kTarget[] = "jaxconv_max_pool2d_fwd";
  PoolParams p;
  PoolGeometry g;
  JAXCONV_RETURN_IF_ERROR(read_pool_params(attrs, &p, kTarget));
  JAXCONV_RETURN_IF_ERROR(pool_geometry(p, x, *y, *idx, kTarget, &g));
  ParallelRunner pr(&pool);
  return dispatch_float(x.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    Pool<T>(g).forward(pr, static_cast<const T*>(x.untyped_data()),
                       static_cast<T*>(y->untyped_data()),
                       static_cast<int32_t*>(idx->untyped_data()));
    return ffi::Error::Success();
  });
}

ffi::Error MaxPool2dBwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer idx,
                            ffi::Result<ffi::AnyBuffer> dx, ffi::Dictionary attrs) {
  static constexpr char kTarget[] = "jaxconv_max_pool2d_bwd";
  PoolParams p;
  PoolGeometry g;
  JAXCONV_RETURN_IF_ERROR(read_pool_params(attrs, &p, kTarget));
  JAXCONV_RETURN_IF_ERROR(pool_geometry(p, *dx, dy, idx, kTarget, &g));
  ParallelRunner pr(&pool);
  return dispatch_float(dy.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    Pool<T>(g).backward(pr, static_cast<const T*>(dy.untyped_data()),
                        static_cast<const int32_t*>(idx.untyped_data()),
                        static_cast<T*>(dx->untyped_data()));
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPool2dFwdCpu, MaxPool2dFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>()  // indices (int32)
                                  .Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPool2dBwdCpu, MaxPool2dBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // indices (int32)
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Attrs());

}  // namespace jaxconv
