// CPU convolution: forward, bwd_data (= transposed convolution) and bwd_filter, side by side.
//
// All three are implicit GEMMs over one convolution y = x (*) w with geometry g (geometry.h):
//
//   fwd:        Y[p, o]  = sum_k  Col[p, k]  * Wf[k, o]          p = (oh, ow), k = (ci, kh, kw)
//   bwd_data:   DX[q, c] = sum_k' ColT[q, k'] * Wd[k', c]        q = (h, w),   k' = (o, kh, kw)
//   bwd_filter: DW[k, o] = sum_(n,p) Col[p, k] * DY[p, o]
//
// per image n and group. Col is im2col of x: Col[p, k] = x[n, ci, oh*sh - pt + kh*dh,
// ow*sw - pl + kw*dw] (zero outside the input). ColT gathers dy for the transposed direction:
// ColT[q, k'] = dy[n, o, oh, ow] where h = oh*sh - pt + kh*dh (source_of_tap in geometry.h),
// zero where no output position reads (h, w) through tap (kh, kw). Both are built one tile of
// rows at a time into per-thread scratch, widened to the accumulation type (float for the half
// formats), then multiplied with the shared GEMM. Bias is added while the tile is stored.
//
// Within a group, the order of the reduction index follows the memory order of the layout so
// that packing reads contiguous runs: NCHW packs k = (ci*KH + kh)*KW + kw, NHWC packs
// k = (kh*KW + kw)*Cg + ci (and likewise k' with o for ci).
#include <cstdint>
#include <vector>

#include "cpu_common.h"

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

// Index of tap (c, kh, kw) in the reduction dimension (see the file comment).
struct KOrder {
  int64_t layout, Cg, KH, KW;
  int64_t operator()(int64_t c, int64_t kh, int64_t kw) const {
    return layout == kNHWC ? (kh * KW + kw) * Cg + c : (c * KH + kh) * KW + kw;
  }
};

// Rows per im2col tile: enough to amortize the weight reads, small enough that the tile
// (rows x k) stays in L2.
int64_t tile_rows(int64_t k, int64_t total) {
  int64_t rows = std::max<int64_t>(32, (128 * 1024 / 4) / std::max<int64_t>(k, 1));
  return std::min(rows, std::max<int64_t>(total, 1));
}

template <typename T>
struct Conv {
  using Acc = typename Num<T>::acc;
  const ConvGeometry& g;
  Strides4 xs, ys, ws;
  int64_t Cg, Og;

  explicit Conv(const ConvGeometry& geo)
      : g(geo), xs(geo.x_strides()), ys(geo.y_strides()), ws(geo.w_strides()),
        Cg(geo.in_per_group()), Og(geo.out_per_group()) {}

  KOrder k_fwd() const { return {g.p.layout, Cg, g.KH, g.KW}; }
  KOrder k_bwd() const { return {g.p.layout, Og, g.KH, g.KW}; }

  // Wf[k, o] for one group: (gemm_k x Og).
  void pack_weights_fwd(const T* w, int64_t grp, Acc* out) const {
    KOrder ko = k_fwd();
    for (int64_t o = 0; o < Og; ++o)
      for (int64_t c = 0; c < Cg; ++c)
        for (int64_t kh = 0; kh < g.KH; ++kh)
          for (int64_t kw = 0; kw < g.KW; ++kw)
            out[ko(c, kh, kw) * Og + o] =
                Num<T>::load(w[(grp * Og + o) * ws.n + c * ws.c + kh * ws.h + kw * ws.w]);
  }

  // Wd[k', c] for one group: (gemm_k_transposed x Cg).
  void pack_weights_bwd_data(const T* w, int64_t grp, Acc* out) const {
    KOrder ko = k_bwd();
    for (int64_t o = 0; o < Og; ++o)
      for (int64_t c = 0; c < Cg; ++c)
        for (int64_t kh = 0; kh < g.KH; ++kh)
          for (int64_t kw = 0; kw < g.KW; ++kw)
            out[ko(o, kh, kw) * Cg + c] =
                Num<T>::load(w[(grp * Og + o) * ws.n + c * ws.c + kh * ws.h + kw * ws.w]);
  }

  // Col rows [p0, p1) of image n, group grp, into col (row stride = gemm_k).
  void pack_cols(const T* x, int64_t n, int64_t grp, int64_t p0, int64_t p1, Acc* col) const {
    const int64_t K = g.gemm_k();
    KOrder ko = k_fwd();
    const T* xn = x + n * xs.n + grp * Cg * xs.c;
    for (int64_t p = p0; p < p1; ++p) {
      Acc* row = col + (p - p0) * K;
      int64_t oh = p / g.OW, ow = p % g.OW;
      TapRange th = window_taps(oh, g.p.stride_h, g.p.pad_top, g.p.dilation_h, g.KH, g.H);
      TapRange tw = window_taps(ow, g.p.stride_w, g.p.pad_left, g.p.dilation_w, g.KW, g.W);
      if (th.hi - th.lo < g.KH || tw.hi - tw.lo < g.KW) std::fill(row, row + K, Acc(0));
      int64_t ih0 = oh * g.p.stride_h - g.p.pad_top, iw0 = ow * g.p.stride_w - g.p.pad_left;
      for (int64_t kh = th.lo; kh < th.hi; ++kh) {
        const T* xr = xn + (ih0 + kh * g.p.dilation_h) * xs.h;
        for (int64_t kw = tw.lo; kw < tw.hi; ++kw) {
          const T* xp = xr + (iw0 + kw * g.p.dilation_w) * xs.w;
          for (int64_t c = 0; c < Cg; ++c) row[ko(c, kh, kw)] = Num<T>::load(xp[c * xs.c]);
        }
      }
    }
  }

  // ColT rows [q0, q1) of the dx plane of image n, group grp, gathered from dy.
  void pack_cols_transposed(const T* dy, int64_t n, int64_t grp, int64_t q0, int64_t q1,
                            Acc* col) const {
    const int64_t K = g.gemm_k_transposed();
    KOrder ko = k_bwd();
    const T* dyn = dy + n * ys.n + grp * Og * ys.c;
    for (int64_t q = q0; q < q1; ++q) {
      Acc* row = col + (q - q0) * K;
      std::fill(row, row + K, Acc(0));
      int64_t h = q / g.W, w = q % g.W;
      for (int64_t kh = 0; kh < g.KH; ++kh) {
        int64_t oh = source_of_tap(h, kh, g.p.stride_h, g.p.pad_top, g.p.dilation_h, g.OH);
        if (oh < 0) continue;
        for (int64_t kw = 0; kw < g.KW; ++kw) {
          int64_t ow = source_of_tap(w, kw, g.p.stride_w, g.p.pad_left, g.p.dilation_w, g.OW);
          if (ow < 0) continue;
          const T* src = dyn + oh * ys.h + ow * ys.w;
          for (int64_t o = 0; o < Og; ++o) row[ko(o, kh, kw)] = Num<T>::load(src[o * ys.c]);
        }
      }
    }
  }

  // Writes a (rows x channels) tile whose row r is spatial position s0 + r of a plane of width
  // `width`, channel offset c0, adding bias[c0 + c] when bias is non-null.
  static void store_tile(const Acc* tile, int64_t rows, int64_t channels, T* out, Strides4 s,
                         int64_t n, int64_t c0, int64_t s0, int64_t width, const T* bias) {
    for (int64_t r = 0; r < rows; ++r) {
      int64_t pos = s0 + r;
      T* dst = out + n * s.n + c0 * s.c + (pos / width) * s.h + (pos % width) * s.w;
      const Acc* src = tile + r * channels;
      for (int64_t c = 0; c < channels; ++c) {
        Acc v = src[c];
        if (bias) v += Num<T>::load(bias[c0 + c]);
        dst[c * s.c] = Num<T>::store(v);
      }
    }
  }

  // y = conv(x, w) + bias
  void forward(const ParallelRunner& pr, const T* x, const T* w, const T* bias, T* y) const {
    const int64_t G = g.groups(), K = g.gemm_k(), P = g.OH * g.OW;
    std::vector<Acc> wpack(G * K * Og);
    for (int64_t grp = 0; grp < G; ++grp) pack_weights_fwd(w, grp, wpack.data() + grp * K * Og);
    const int64_t PT = tile_rows(K, P), tiles = (P + PT - 1) / PT;
    pr.run(g.N * G * tiles, [&](int64_t task) {
      int64_t t = task % tiles, grp = (task / tiles) % G, n = task / (tiles * G);
      int64_t p0 = t * PT, p1 = std::min(P, p0 + PT);
      Acc* col = scratch<Acc, 0>(PT * K);
      Acc* out = scratch<Acc, 1>(PT * Og);
      pack_cols(x, n, grp, p0, p1, col);
      gemm(p1 - p0, Og, K, col, K, wpack.data() + grp * K * Og, Og, out, Og, false);
      store_tile(out, p1 - p0, Og, y, ys, n, grp * Og, p0, g.OW, bias);
    });
  }

  // dx = conv_transpose(dy, w) + bias
  void backward_data(const ParallelRunner& pr, const T* dy, const T* w, const T* bias,
                     T* dx) const {
    const int64_t G = g.groups(), K = g.gemm_k_transposed(), Q = g.H * g.W;
    std::vector<Acc> wpack(G * K * Cg);
    for (int64_t grp = 0; grp < G; ++grp)
      pack_weights_bwd_data(w, grp, wpack.data() + grp * K * Cg);
    const int64_t QT = tile_rows(K, Q), tiles = (Q + QT - 1) / QT;
    pr.run(g.N * G * tiles, [&](int64_t task) {
      int64_t t = task % tiles, grp = (task / tiles) % G, n = task / (tiles * G);
      int64_t q0 = t * QT, q1 = std::min(Q, q0 + QT);
      Acc* col = scratch<Acc, 0>(QT * K);
      Acc* out = scratch<Acc, 1>(QT * Cg);
      pack_cols_transposed(dy, n, grp, q0, q1, col);
      gemm(q1 - q0, Cg, K, col, K, wpack.data() + grp * K * Cg, Cg, out, Cg, false);
      store_tile(out, q1 - q0, Cg, dx, xs, n, grp * Cg, q0, g.W, bias);
    });
  }

  // dw = sum over images and positions of Col^T * DY. The reduction over (n, tile) units is
  // split into `splits` contiguous ranges per group, each summed into its own partial buffer;
  // the partials are then added in a fixed order, so results do not depend on scheduling.
  void backward_filter(const ParallelRunner& pr, const T* x, const T* dy, T* dw) const {
    const int64_t G = g.groups(), K = g.gemm_k(), P = g.OH * g.OW;
    const int64_t PT = tile_rows(K, P), tiles = (P + PT - 1) / PT, units = g.N * tiles;
    const int64_t partial_size = K * Og;
    int64_t splits = std::max<int64_t>(1, (2 * pr.num_threads() + G - 1) / G);
    splits = std::min(splits, std::max<int64_t>(units, 1));
    const int64_t max_elems = int64_t(64) << 20;  // cap partials at 64M accumulators
    while (splits > 1 && G * splits * partial_size > max_elems) --splits;
    std::vector<Acc> partial(G * splits * partial_size, Acc(0));
    pr.run(G * splits, [&](int64_t task) {
      int64_t s = task % splits, grp = task / splits;
      int64_t u0 = units * s / splits, u1 = units * (s + 1) / splits;
      Acc* acc = partial.data() + task * partial_size;
      Acc* col = scratch<Acc, 0>(PT * K);
      Acc* colT = scratch<Acc, 1>(PT * K);
      Acc* dyt = scratch<Acc, 2>(PT * Og);
      for (int64_t u = u0; u < u1; ++u) {
        int64_t n = u / tiles, p0 = (u % tiles) * PT, p1 = std::min(P, p0 + PT);
        int64_t rows = p1 - p0;
        pack_cols(x, n, grp, p0, p1, col);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = 0; k < K; ++k) colT[k * rows + r] = col[r * K + k];
        const T* dyn = dy + n * ys.n + grp * Og * ys.c;
        for (int64_t r = 0; r < rows; ++r) {
          int64_t p = p0 + r;
          const T* src = dyn + (p / g.OW) * ys.h + (p % g.OW) * ys.w;
          for (int64_t o = 0; o < Og; ++o) dyt[r * Og + o] = Num<T>::load(src[o * ys.c]);
        }
        gemm(K, Og, rows, colT, rows, dyt, Og, acc, Og, true);
      }
    });
    KOrder ko = k_fwd();
    for (int64_t grp = 0; grp < G; ++grp) {
      const Acc* base = partial.data() + grp * splits * partial_size;
      for (int64_t o = 0; o < Og; ++o)
        for (int64_t c = 0; c < Cg; ++c)
          for (int64_t kh = 0; kh < g.KH; ++kh)
            for (int64_t kw = 0; kw < g.KW; ++kw) {
              int64_t k = ko(c, kh, kw);
              Acc v = 0;
              for (int64_t s = 0; s < splits; ++s) v += base[s * partial_size + k * Og + o];
              dw[(grp * Og + o) * ws.n + c * ws.c + kh * ws.h + kw * ws.w] = Num<T>::store(v);
            }
    }
  }
};

template <typename T>
const T* bias_or_null(const ffi::AnyBuffer& bias) {
  return bias.element_count() ? static_cast<const T*>(bias.untyped_data()) : nullptr;
}

ffi::Error Conv2dFwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                         ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                         ffi::Dictionary attrs) {
  static constexpr char kTarget[] = "jaxconv_conv2d_fwd";
  ConvParams p;
  ConvGeometry g;
  JAXCONV_RETURN_IF_ERROR(read_conv_params(attrs, &p, kTarget));
  JAXCONV_RETURN_IF_ERROR(conv_geometry(p, x, w, *y, kTarget, &g));
  JAXCONV_RETURN_IF_ERROR(check_bias(bias, g.O, kTarget));
  JAXCONV_RETURN_IF_ERROR(same_float_type(kTarget, x.element_type(), {bias.element_type()}));
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
  ConvParams p;
  ConvGeometry g;
  JAXCONV_RETURN_IF_ERROR(read_conv_params(attrs, &p, kTarget));
  JAXCONV_RETURN_IF_ERROR(conv_geometry(p, *dx, w, dy, kTarget, &g));
  JAXCONV_RETURN_IF_ERROR(check_bias(bias, g.C, kTarget));
  JAXCONV_RETURN_IF_ERROR(same_float_type(kTarget, dy.element_type(), {bias.element_type()}));
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
  ConvParams p;
  ConvGeometry g;
  JAXCONV_RETURN_IF_ERROR(read_conv_params(attrs, &p, kTarget));
  JAXCONV_RETURN_IF_ERROR(conv_geometry(p, x, *dw, dy, kTarget, &g));
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
