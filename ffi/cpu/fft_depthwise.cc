// The depthwise FFT kernels (fft_kernels.h): forward, bwd_data (stride 1) and bwd_filter,
// one input and one output channel per group, 16 channels per complex transform
// (fft_transform.h).
//
// A correlation with filters f1, f2 (spectra F1, F2) of the two channels of one transform is
// Y1 + i*Y2 = X1*conj(F1) + i*X2*conj(F2) = Z * A + Zm * B, A = (conj(F1) + conj(F2))/2,
// B = (conj(F1) - conj(F2))/2, computed for the pair of frequencies (k, -k) together so the
// product can overwrite Z. The inverse of Y1 + i*Y2 gives y1 in the re lanes and y2 in the im
// lanes.
#include "fft_kernels.h"
#include "fft_transform.h"

namespace jaxconv::JAXCONV_CPU_CAPABILITY::fft {
namespace {

// ---------------------------------------------------------------------------------------------
// One depthwise correlation (fft.h): per channel c,
//   out[n, c, u, v] = bias[c] + sum over (a, b) of in[n, c, u + a - pad_h, v + b - pad_w] * f_c[a,
//   b]

struct Corr {
  int64_t N, C, Hin, Win, U, V, pad_h, pad_w, KEh, KEw;
  Strides4 is, os;
  FftPlan pl;
  int64_t TU() const { return (U + pl.TH - 1) / pl.TH; }
  int64_t TV() const { return (V + pl.TW - 1) / pl.TW; }
  int64_t blocks() const { return (C + kPair - 1) / kPair; }
};

// Filter spectra of every channel block: [cb][Ar, Ai, Br, Bi][P*Q vectors], scaled by 1/(PQ).
// The filter of channel c is given as a tap list: value(c, t) at effective position taps[t] =
// (a, b); every other position (between dilated taps) is zero.
template <typename F>
void filter_spectra(const ParallelRunner& pr, const Corr& cr, const LinePlan& rows,
                    const LinePlan& cols, const std::vector<std::pair<int64_t, int64_t>>& taps,
                    const F& value, float* spec) {
  const FftPlan& pl = cr.pl;
  const int64_t P = pl.P, Q = pl.Q, PQ = P * Q, pf = plane_floats(pl);
  const float scale = 1.0f / float(PQ);
  pr.run(cr.blocks(), [&](int64_t cb) {
    Buf b = thread_buf<0>(pl);
    std::memset(b.re, 0, pf * sizeof(float));
    std::memset(b.im, 0, pf * sizeof(float));
    int64_t amax = 0;
    for (size_t t = 0; t < taps.size(); ++t) {
      const int64_t a = taps[t].first, bb = taps[t].second;
      amax = std::max(amax, a + 1);
      for (int l = 0; l < kPair; ++l) {
        const int64_t c = cb * kPair + l;
        if (c >= cr.C) break;
        float* dst = (l < kL ? b.re : b.im) + (a * Q + bb) * kL + (l % kL);
        *dst = value(c, t);
      }
    }
    fft2_forward(rows, cols, Q, 0, amax, &b);
    float* out = spec + cb * 4 * pf;
    for (int64_t i = 0; i < P; ++i)
      for (int64_t j = 0; j < Q; ++j) {
        const int64_t k = i * Q + j, km = mirror(i, j, P, Q);
        const Split f = split(load(b.re + k * kL), load(b.im + k * kL), load(b.re + km * kL),
                              load(b.im + km * kL));
        // conj(F1) = (r1, -i1), conj(F2) = (r2, -i2); A = (cF1 + cF2)/2, B = (cF1 - cF2)/2.
        const V8 h = V8{} + 0.5f * scale;
        store(out + 0 * pf + k * kL, h * (f.r1 + f.r2));
        store(out + 1 * pf + k * kL, -h * (f.i1 + f.i2));
        store(out + 2 * pf + k * kL, h * (f.r1 - f.r2));
        store(out + 3 * pf + k * kL, -h * (f.i1 - f.i2));
      }
  });
}

// out = correlation of in with the filters whose spectra are `spec`, plus bias.
template <typename T>
void correlate(const ParallelRunner& pr, const Corr& cr, const LinePlan& rows, const LinePlan& cols,
               const float* spec, const T* in, const T* bias, T* out) {
  const FftPlan& pl = cr.pl;
  const int64_t P = pl.P, Q = pl.Q, pf = plane_floats(pl);
  const int64_t TU = cr.TU(), TV = cr.TV(), per_block = cr.N * TU * TV;
  pr.run(cr.blocks() * per_block, [&](int64_t task) {
    const int64_t cb = task / per_block, rest = task % per_block;
    const int64_t n = rest / (TU * TV), tu = rest / TV % TU, tv = rest % TV;
    const int64_t u0 = tu * pl.TH, v0 = tv * pl.TW;
    const int64_t th = std::min(pl.TH, cr.U - u0), tw = std::min(pl.TW, cr.V - v0);
    Buf b = thread_buf<0>(pl);
    int64_t lo, hi;
    load_patch(in + n * cr.is.n, cr.is, cr.C, cb, cr.Hin, cr.Win, u0 - cr.pad_h, v0 - cr.pad_w,
               th + cr.KEh - 1, tw + cr.KEw - 1, pl, &b, &lo, &hi);
    fft2_forward(rows, cols, Q, lo, hi, &b);
    // Y = Z*A + conj(Zm)*B at k and at -k, written over Z.
    const float* sp = spec + cb * 4 * pf;
    for (int64_t i = 0; i < P; ++i)
      for (int64_t j = 0; j < Q; ++j) {
        const int64_t k = i * Q + j, km = mirror(i, j, P, Q);
        if (km < k) continue;
        const V8 zr = load(b.re + k * kL), zi = load(b.im + k * kL);
        const V8 mr = load(b.re + km * kL), mi = load(b.im + km * kL);
        auto prod = [&](int64_t at, V8 zr, V8 zi, V8 mr, V8 mi) {
          const V8 ar = load(sp + at * kL), ai = load(sp + pf + at * kL);
          const V8 br = load(sp + 2 * pf + at * kL), bi = load(sp + 3 * pf + at * kL);
          // Z*A + conj(M)*B, conj(M) = (mr, -mi)
          store(b.re + at * kL, zr * ar - zi * ai + mr * br + mi * bi);
          store(b.im + at * kL, zr * ai + zi * ar + mr * bi - mi * br);
        };
        prod(k, zr, zi, mr, mi);
        if (km != k) prod(km, mr, mi, zr, zi);
      }
    fft2_inverse(rows, cols, Q, th, &b);
    const int64_t c0 = cb * kPair;
    const int lre = int(std::min<int64_t>(kL, cr.C - c0));
    const int lim = int(std::max<int64_t>(0, std::min<int64_t>(kL, cr.C - c0 - kL)));
    V8 bre = V8{}, bim = V8{};
    if (bias) {
      bre = load_lanes(bias + c0, 1, lre);
      if (lim > 0) bim = load_lanes(bias + c0 + kL, 1, lim);
    }
    for (int64_t i = 0; i < th; ++i)
      for (int64_t j = 0; j < tw; ++j) {
        T* dst = out + n * cr.os.n + c0 * cr.os.c + (u0 + i) * cr.os.h + (v0 + j) * cr.os.w;
        store_lanes(dst, cr.os.c, lre, load(b.re + (i * Q + j) * kL) + bre);
        if (lim > 0)
          store_lanes(dst + kL * cr.os.c, cr.os.c, lim, load(b.im + (i * Q + j) * kL) + bim);
      }
  });
}

// Forward (flip = false: f = w, pad as given) or bwd_data (flip = true: f = w flipped,
// in = dy, out = dx, pad = KE - 1 - pad) of a depthwise layer.
template <typename T>
bool depthwise_correlation(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                           bool flip, const T* in, const T* w, const T* bias, T* out) {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    const int64_t KEh = eff(g.KH, g.p.dilation_h), KEw = eff(g.KW, g.p.dilation_w);
    Corr cr;
    cr.N = g.N;
    cr.C = g.C;
    cr.KEh = KEh;
    cr.KEw = KEw;
    cr.pl = pl;
    if (!flip) {
      cr.Hin = g.H;
      cr.Win = g.W;
      cr.U = g.OH;
      cr.V = g.OW;
      cr.pad_h = g.p.pad_top;
      cr.pad_w = g.p.pad_left;
      cr.is = g.x_strides();
      cr.os = g.y_strides();
    } else {
      cr.Hin = g.OH;
      cr.Win = g.OW;
      cr.U = g.H;
      cr.V = g.W;
      cr.pad_h = KEh - 1 - g.p.pad_top;
      cr.pad_w = KEw - 1 - g.p.pad_left;
      cr.is = g.y_strides();
      cr.os = g.x_strides();
    }
    if (!all_finite(pr, w, g.O * g.KH * g.KW) || !all_finite(pr, in, cr.N * cr.is.n)) return false;
    const Strides4 ws = g.w_strides();
    std::vector<std::pair<int64_t, int64_t>> taps;
    for (int64_t kh = 0; kh < g.KH; ++kh)
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t a = kh * g.p.dilation_h, b = kw * g.p.dilation_w;
        taps.push_back(flip ? std::make_pair(KEh - 1 - a, KEw - 1 - b) : std::make_pair(a, b));
      }
    auto value = [&](int64_t c, size_t t) {
      const int64_t kh = int64_t(t) / g.KW, kw = int64_t(t) % g.KW;
      return Num<T>::load(w[c * ws.n + kh * ws.h + kw * ws.w]);
    };
    const LinePlan rows = make_line_plan(pl.Q), cols = make_line_plan(pl.P);
    float* const spec = call_buffer<0>(size_t(cr.blocks()) * 4 * plane_floats(pl));
    filter_spectra(pr, cr, rows, cols, taps, value, spec);
    correlate(pr, cr, rows, cols, spec, in, bias, out);
    return true;
  }
}

}  // namespace

template <typename T>
bool depthwise_fft_forward(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                           const T* x, const T* w, const T* bias, T* y) {
  return depthwise_correlation(pr, g, pl, false, x, w, bias, y);
}

template <typename T>
bool depthwise_fft_backward_data(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                                 const T* dy, const T* w, const T* bias, T* dx) {
  return depthwise_correlation(pr, g, pl, true, dy, w, bias, dx);
}

// dw[c, kh, kw] = sum over n and (u, v) of x[n, c, u + kh*dh - pt, v + kw*dw - pl] * dy[n, c, u,
// v]: per output tile, the spectra of the x patch (X) and of the dy tile zero-padded (D) give sum_k
// X*conj(D) = the circular correlation, linear for shifts a < KE_h (see fft.h). The sums S1 + i*S2
// over images and tiles are accumulated in the frequency domain, per channel block and part (a
// contiguous range of (image, tile) pairs; parts only when the blocks are too few for the threads),
// added part by part in order, and inverted once per block.
template <typename T>
bool depthwise_fft_backward_filter(const ParallelRunner& pr, const ConvGeometry& g,
                                   const FftPlan& pl, const T* x, const T* dy, T* dw) {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    Corr cr;
    cr.N = g.N;
    cr.C = g.C;
    cr.Hin = g.H;
    cr.Win = g.W;
    cr.U = g.OH;
    cr.V = g.OW;
    cr.pad_h = g.p.pad_top;
    cr.pad_w = g.p.pad_left;
    cr.KEh = eff(g.KH, g.p.dilation_h);
    cr.KEw = eff(g.KW, g.p.dilation_w);
    cr.is = g.x_strides();
    cr.os = g.y_strides();
    cr.pl = pl;
    if (!all_finite(pr, x, cr.N * cr.is.n) || !all_finite(pr, dy, cr.N * cr.os.n)) return false;
    const int64_t P = pl.P, Q = pl.Q, PQ = P * Q, pf = plane_floats(pl);
    const int64_t TU = cr.TU(), TV = cr.TV(), items = cr.N * TU * TV, blocks = cr.blocks();
    int64_t parts = 1;  // (at least one, so that an empty batch still writes dw = 0)
    if (blocks < 2 * pr.num_threads())
      parts = std::max<int64_t>(1, std::min(items, (2 * pr.num_threads() + blocks - 1) / blocks));
    const int64_t per_part = (items + parts - 1) / parts;
    const LinePlan rows = make_line_plan(Q), cols = make_line_plan(P);
    std::vector<float> acc(size_t(blocks * parts) * 2 * pf);
    pr.run(blocks * parts, [&](int64_t task) {
      const int64_t cb = task / parts, part = task % parts;
      float* sr = acc.data() + task * 2 * pf;
      float* si = sr + pf;
      Buf bx = thread_buf<0>(pl);
      Buf bd = thread_buf<4>(pl);
      for (int64_t it = part * per_part; it < std::min(items, (part + 1) * per_part); ++it) {
        const int64_t n = it / (TU * TV), tu = it / TV % TU, tv = it % TV;
        const int64_t u0 = tu * pl.TH, v0 = tv * pl.TW;
        const int64_t th = std::min(pl.TH, cr.U - u0), tw = std::min(pl.TW, cr.V - v0);
        int64_t lo, hi;
        load_patch(x + n * cr.is.n, cr.is, cr.C, cb, cr.Hin, cr.Win, u0 - cr.pad_h, v0 - cr.pad_w,
                   th + cr.KEh - 1, tw + cr.KEw - 1, pl, &bx, &lo, &hi);
        fft2_forward(rows, cols, Q, lo, hi, &bx);
        load_patch(dy + n * cr.os.n, cr.os, cr.C, cb, cr.U, cr.V, u0, v0, th, tw, pl, &bd, &lo,
                   &hi);
        fft2_forward(rows, cols, Q, lo, hi, &bd);
        for (int64_t i = 0; i < P; ++i)
          for (int64_t j = 0; j < Q; ++j) {
            const int64_t k = i * Q + j, km = mirror(i, j, P, Q);
            const Split X = split(load(bx.re + k * kL), load(bx.im + k * kL), load(bx.re + km * kL),
                                  load(bx.im + km * kL));
            const Split D = split(load(bd.re + k * kL), load(bd.im + k * kL), load(bd.re + km * kL),
                                  load(bd.im + km * kL));
            // S1 = X1 * conj(D1), S2 = X2 * conj(D2); accumulate S1 + i*S2.
            const V8 s1r = X.r1 * D.r1 + X.i1 * D.i1, s1i = X.i1 * D.r1 - X.r1 * D.i1;
            const V8 s2r = X.r2 * D.r2 + X.i2 * D.i2, s2i = X.i2 * D.r2 - X.r2 * D.i2;
            store(sr + k * kL, load(sr + k * kL) + s1r - s2i);
            store(si + k * kL, load(si + k * kL) + s1i + s2r);
          }
      }
    });
    const Strides4 ws = g.w_strides();
    const float scale = 1.0f / float(PQ);
    pr.run(blocks, [&](int64_t cb) {
      float* base = acc.data() + cb * parts * 2 * pf;
      Buf b = thread_buf<0>(pl);
      std::memcpy(b.re, base, pf * sizeof(float));
      std::memcpy(b.im, base + pf, pf * sizeof(float));
      for (int64_t part = 1; part < parts; ++part)
        for (int64_t e = 0; e < pf; e += kL) {
          store(b.re + e, load(b.re + e) + load(base + part * 2 * pf + e));
          store(b.im + e, load(b.im + e) + load(base + part * 2 * pf + pf + e));
        }
      fft2_inverse(rows, cols, Q, cr.KEh, &b);
      const int64_t c0 = cb * kPair;
      for (int64_t kh = 0; kh < g.KH; ++kh)
        for (int64_t kw = 0; kw < g.KW; ++kw) {
          const int64_t e = (kh * g.p.dilation_h * Q + kw * g.p.dilation_w) * kL;
          for (int l = 0; l < kPair && c0 + l < cr.C; ++l) {
            const float v = (l < kL ? b.re : b.im)[e + l % kL] * scale;
            dw[(c0 + l) * ws.n + kh * ws.h + kw * ws.w] = Num<T>::store(v);
          }
        }
    });
    return true;
  }
}

#define JAXCONV_INSTANTIATE(T)                                                                    \
  template bool depthwise_fft_forward(const ParallelRunner&, const ConvGeometry&, const FftPlan&, \
                                      const T*, const T*, const T*, T*);                          \
  template bool depthwise_fft_backward_data(const ParallelRunner&, const ConvGeometry&,           \
                                            const FftPlan&, const T*, const T*, const T*, T*);    \
  template bool depthwise_fft_backward_filter(const ParallelRunner&, const ConvGeometry&,         \
                                              const FftPlan&, const T*, const T*, T*);
JAXCONV_INSTANTIATE(float)
JAXCONV_INSTANTIATE(f16_t)
JAXCONV_INSTANTIATE(bf16_t)
#undef JAXCONV_INSTANTIATE

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY::fft
