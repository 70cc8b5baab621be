// The dense and grouped FFT kernels (fft_kernels.h): forward, bwd_data (stride 1) and
// bwd_filter for layers with more than one input or output channel per group.
//
// Forward and bwd_data are one correlation (fft.h) from Cin "in" channels to Cout "out"
// channels in G groups of Ci -> Co:
//   out[n, g*Co + co] = bias + sum over ci < Ci of corr(in[n, g*Ci + ci], f[g][ci][co])
// forward: in = x, out = y, f[g][ci][co] = w[g*Co + co, ci]; bwd_data: in = dy, out = dx,
// f[g][oi][ci] = w[g*Ci + oi, ci] flipped. Per output tile ("item": an image and a tile):
//   A. the spectra of the item's input patch, 16 channels per complex transform, split into
//      one half spectrum per channel (fft_transform.h: split);
//   B. per frequency k of the half spectrum, a complex GEMM over all items of the batch:
//      Y[k][m][o] = sum over ci of X[k][m][g*Ci + ci] * conj(F[k][g][ci][o]) / (PQ);
//   C. per item and 16 output channels, the full spectrum from the half one and its inverse.
// The filter spectra conj(F)/(PQ) are computed once per call. Real planes have Hermitian
// spectra (Z[-k] = conj(Z[k])), so only the columns j <= Q/2 are kept: K = P * (Q/2 + 1)
// frequencies. bwd_filter: A for the x patches and the dy tiles, then per frequency
// S[k][o][ci] += sum over items m of conj(D[k][m][o]) * X[k][m][g*Ci + ci] (in item order, so
// the result does not depend on the threads), then one inverse per 16 (o, ci) planes, read at
// the taps like the depthwise bwd_filter.
//
// Spectrum rows: for frequency k and item m, the re parts of all channels, then the im parts,
// each `pad` floats (channels rounded up to 16, plus 8 so that a vector read at any channel
// stays inside). Items go in batches small enough that their spectra stay under kBatchBytes.
#include "fft_kernels.h"
#include "fft_transform.h"

namespace jaxconv::JAXCONV_CPU_CAPABILITY::fft {
namespace {

// Bound of the spectra of one batch of items (inputs and outputs together).
constexpr int64_t kBatchBytes = int64_t(32) << 20;

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
int64_t row_pad(int64_t C) { return round_up(C, kPair) + kL; }

struct DenseCorr {
  int64_t N, Cin, Cout, G, Ci, Co;
  int64_t Hin, Win, U, V, pad_h, pad_w, KEh, KEw;
  Strides4 is, os;
  FftPlan pl;
  int64_t TU() const { return (U + pl.TH - 1) / pl.TH; }
  int64_t TV() const { return (V + pl.TW - 1) / pl.TW; }
  int64_t items() const { return N * TU() * TV(); }
  int64_t Qh() const { return pl.Q / 2 + 1; }
  int64_t K() const { return pl.P * Qh(); }
  int64_t Cov() const { return (Co + kL - 1) / kL; }  // output vectors per group
};

// The tile of item it: image n, first output cell (u0, v0), extent th x tw.
struct Item {
  int64_t n, u0, v0, th, tw;
};
Item item(const DenseCorr& cr, int64_t it) {
  const int64_t TU = cr.TU(), TV = cr.TV();
  const int64_t n = it / (TU * TV), u0 = it / TV % TU * cr.pl.TH, v0 = it % TV * cr.pl.TW;
  return {n, u0, v0, std::min(cr.pl.TH, cr.U - u0), std::min(cr.pl.TW, cr.V - v0)};
}

// The half spectrum of the transform in b (16 channels from c0) into rows dst + k*kstride
// (re at +c0, im at +c0 + im_off).
void store_half(const Buf& b, const FftPlan& pl, int64_t c0, float* dst, int64_t kstride,
                int64_t im_off) {
  const int64_t P = pl.P, Q = pl.Q, Qh = Q / 2 + 1;
  for (int64_t i = 0; i < P; ++i)
    for (int64_t j = 0; j < Qh; ++j) {
      const Split s = split_at(b, i * Q + j, mirror(i, j, P, Q));
      float* d = dst + (i * Qh + j) * kstride + c0;
      store(d, s.r1);
      store(d + im_off, s.i1);
      store(d + kL, s.r2);
      store(d + im_off + kL, s.i2);
    }
}

// The full spectrum W = Y1 + i*Y2 of the 16 real planes c0 .. c0+15 from their half spectra
// (rows src + k*kstride as above), into b: W[k] = Y1 + i*Y2 and W[-k] = conj(Y1) + i*conj(Y2).
void load_half(const float* src, int64_t kstride, int64_t im_off, int64_t c0, const FftPlan& pl,
               Buf* b) {
  const int64_t P = pl.P, Q = pl.Q, Qh = Q / 2 + 1;
  for (int64_t i = 0; i < P; ++i)
    for (int64_t j = 0; j < Qh; ++j) {
      const float* s = src + (i * Qh + j) * kstride + c0;
      const V8 y1r = load(s), y1i = load(s + im_off), y2r = load(s + kL),
               y2i = load(s + im_off + kL);
      const int64_t k = i * Q + j, km = mirror(i, j, P, Q);
      store(b->re + km * kL, y1r + y2i);  // -k first: where k = -k, the k value stays
      store(b->im + km * kL, y2r - y1i);
      store(b->re + k * kL, y1r - y2i);
      store(b->im + k * kL, y1i + y2r);
    }
}

// Stage A for items [i0, i0 + B): the half spectra of `in` (C channels, patches of rows x cols
// from (u0 - ph, v0 - pw)) into dst (rows of 2*row_pad(C) floats, item m of frequency k at
// (k*B + m)).
template <typename T>
void spectra_of_items(const ParallelRunner& pr, const DenseCorr& cr, const LinePlan& rows,
                      const LinePlan& cols, const T* in, const Strides4& s, int64_t C, int64_t Hin,
                      int64_t Win, int64_t ph, int64_t pw, bool patch, int64_t i0, int64_t B,
                      float* dst) {
  const int64_t blocks = (C + kPair - 1) / kPair, pad = row_pad(C);
  pr.run(B * blocks, [&](int64_t task) {
    const int64_t m = task / blocks, cb = task % blocks;
    const Item t = item(cr, i0 + m);
    Buf b = thread_buf<0>(cr.pl);
    int64_t lo, hi;
    const int64_t nr = patch ? t.th + cr.KEh - 1 : t.th, nc = patch ? t.tw + cr.KEw - 1 : t.tw;
    load_patch(in + t.n * s.n, s, C, cb, Hin, Win, t.u0 - ph, t.v0 - pw, nr, nc, cr.pl, &b, &lo,
               &hi);
    fft2_forward(rows, cols, cr.pl.Q, lo, hi, &b);
    store_half(b, cr.pl, cb * kPair, dst + m * 2 * pad, B * 2 * pad, pad);
  });
}

// Y[m][o] = sum over k < Kc of X[m][k] * F[k][o] for an MR x (NR vectors) block: X scalars
// (item m's re at x + m*xs + k, im at + xim), F vectors (re at f + k*fs + n*16, im at + 8).
template <int MR, int NR>
void gemm_block(int64_t Kc, const float* x, int64_t xs, int64_t xim, const float* f, int64_t fs,
                float* y, int64_t ys, int64_t yim) {
  V8 ar[MR][NR] = {}, ai[MR][NR] = {};
  for (int64_t k = 0; k < Kc; ++k) {
    V8 fr[NR], fi[NR];
    for (int n = 0; n < NR; ++n) {
      fr[n] = load(f + k * fs + n * 2 * kL);
      fi[n] = load(f + k * fs + n * 2 * kL + kL);
    }
    for (int m = 0; m < MR; ++m) {
      const float xr = x[m * xs + k], xi = x[m * xs + xim + k];
      for (int n = 0; n < NR; ++n) {  // one fused multiply-add per term (not mul, fma, add)
        ar[m][n] = ar[m][n] + xr * fr[n];
        ar[m][n] = ar[m][n] - xi * fi[n];
        ai[m][n] = ai[m][n] + xr * fi[n];
        ai[m][n] = ai[m][n] + xi * fr[n];
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      store(y + m * ys + n * kL, ar[m][n]);
      store(y + m * ys + yim + n * kL, ai[m][n]);
    }
}

// Stage B of forward / bwd_data at frequency k for a batch of B items. Whole vectors are
// stored: the lanes past a group's Co land on the next group's first channels, which are
// written after them (groups in order), or in the row's padding.
void gemm_frequency(const DenseCorr& cr, int64_t B, const float* X, const float* F, float* Y) {
  const int64_t xp = row_pad(cr.Cin), yp = row_pad(cr.Cout), Cov = cr.Cov();
  const int64_t fs = Cov * 2 * kL;
  for (int64_t g = 0; g < cr.G; ++g) {
    const float* xg = X + g * cr.Ci;
    const float* fg = F + g * cr.Ci * fs;
    float* yg = Y + g * cr.Co;
    for (int64_t v0 = 0; v0 < Cov; v0 += 2) {
      const bool two = v0 + 1 < Cov;
      for (int64_t m0 = 0; m0 < B; m0 += 2) {
        const float* x = xg + m0 * 2 * xp;
        const float* f = fg + v0 * 2 * kL;
        float* y = yg + m0 * 2 * yp + v0 * kL;
        if (m0 + 1 < B) {
          if (two)
            gemm_block<2, 2>(cr.Ci, x, 2 * xp, xp, f, fs, y, 2 * yp, yp);
          else
            gemm_block<2, 1>(cr.Ci, x, 2 * xp, xp, f, fs, y, 2 * yp, yp);
        } else {
          if (two)
            gemm_block<1, 2>(cr.Ci, x, 2 * xp, xp, f, fs, y, 2 * yp, yp);
          else
            gemm_block<1, 1>(cr.Ci, x, 2 * xp, xp, f, fs, y, 2 * yp, yp);
        }
      }
    }
  }
  // Channels Cout .. (rounded up to 16) are the im lanes of stage C's last transform: zero, or
  // whatever an earlier call left there would reach the real channels' lanes (as NaN, or as
  // rounding error of a huge value) through the complex inverse.
  const int64_t tail = round_up(cr.Cout, kPair) - cr.Cout;
  for (int64_t m = 0; tail > 0 && m < B; ++m) {
    std::memset(Y + m * 2 * yp + cr.Cout, 0, tail * sizeof(float));
    std::memset(Y + m * 2 * yp + yp + cr.Cout, 0, tail * sizeof(float));
  }
}

// S[o][ci] += sum over m < B of conj(D[m][o]) * X[m][ci] for MR rows o and NR vectors of ci: D
// scalars (re at d + m*ds + r, im at + dim), X vectors (re at x + m*xs + n*8, im at + xim), S
// rows of s_row floats (im at + sim). Swapped (the HWIO layout of S, rows ci and vectors of o):
// d holds the X scalars and x the D vectors; conj(D)*X has the same re part and the negated im
// part of conj(X)*D, which is what the unswapped arithmetic gives with the roles exchanged.
template <int MR, int NR, bool Swapped = false>
void filter_block(int64_t B, const float* d, int64_t ds, int64_t dim, const float* x, int64_t xs,
                  int64_t xim, float* s, int64_t s_row, int64_t sim) {
  V8 ar[MR][NR], ai[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NR; ++n) {
      ar[r][n] = load(s + r * s_row + n * kL);
      ai[r][n] = load(s + r * s_row + sim + n * kL);
    }
  for (int64_t m = 0; m < B; ++m) {
    V8 xr[NR], xi[NR];
    for (int n = 0; n < NR; ++n) {
      xr[n] = load(x + m * xs + n * kL);
      xi[n] = load(x + m * xs + xim + n * kL);
    }
    for (int r = 0; r < MR; ++r) {
      const float dr = d[m * ds + r], di = d[m * ds + dim + r];
      for (int n = 0; n < NR; ++n) {  // conj(D) * X, one fused multiply-add per term
        ar[r][n] = ar[r][n] + dr * xr[n];
        ar[r][n] = ar[r][n] + di * xi[n];
        if constexpr (Swapped) {
          ai[r][n] = ai[r][n] - dr * xi[n];
          ai[r][n] = ai[r][n] + di * xr[n];
        } else {
          ai[r][n] = ai[r][n] + dr * xi[n];
          ai[r][n] = ai[r][n] - di * xr[n];
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NR; ++n) {
      store(s + r * s_row + n * kL, ar[r][n]);
      store(s + r * s_row + sim + n * kL, ai[r][n]);
    }
}

// The filter taps packed for the spectra below: tap t of filter (g, a, b) at
// Wp[((g*Ci + a)*taps + t)*CoP + b], CoP = Cov*8 (b past Co zero), so that the 8 lanes of one
// spectra vector (consecutive b) are one vector load. Read straight from w, those lanes lie
// ws.n (forward) or ws.c (bwd_data) apart: in HWIO bwd_data (and OIHW either way) every lane of
// every tap is its own cache line, and the 14.7 MB of a 15x15 128 -> 128 filter went through the
// cache 8 times over. Tasks take 16 rows (g, a) by 16 taps and walk b outermost, so the reads are
// contiguous in whichever of a (HWIO bwd_data), b (HWIO forward) or t (OIHW) the layout keeps
// innermost. Filter (g, a, b) starts at filter(g, a, 0) + b*bstep.
template <typename T, typename Fn>
void pack_filter(const ParallelRunner& pr, const DenseCorr& cr, const std::vector<int64_t>& tap_off,
                 const Fn& filter, int64_t bstep, float* Wp) {
  const int64_t rows = cr.G * cr.Ci, nt = int64_t(tap_off.size()), CoP = cr.Cov() * kL;
  const int64_t rb = (rows + 15) / 16, tb = (nt + 15) / 16;
  pr.run(rb * tb, [&](int64_t task) {
    const int64_t r0 = task / tb * 16, nr = std::min<int64_t>(16, rows - r0);
    const int64_t t0 = task % tb * 16, t1 = std::min(nt, t0 + 16);
    const T* src[16];
    for (int64_t r = 0; r < nr; ++r) src[r] = filter((r0 + r) / cr.Ci, (r0 + r) % cr.Ci, 0);
    for (int64_t b = 0; b < cr.Co; ++b)
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t r = 0; r < nr; ++r)
          Wp[((r0 + r) * nt + t) * CoP + b] = Num<T>::load(src[r][b * bstep + tap_off[t]]);
    for (int64_t b = cr.Co; b < CoP; ++b)
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t r = 0; r < nr; ++r) Wp[((r0 + r) * nt + t) * CoP + b] = 0.0f;
  });
}

// Filter spectra conj(F)/(PQ): vector v of frequency k at F + k*fs + v*16 (re 8 lanes, im 8),
// where v = (g*Ci + ci)*Cov + co/8 (lanes past Co zero), from the packed taps Wp (pack_filter)
// at effective positions taps[t].
void dense_filter_spectra(const ParallelRunner& pr, const DenseCorr& cr, const LinePlan& rows,
                          const LinePlan& cols,
                          const std::vector<std::pair<int64_t, int64_t>>& taps, const float* Wp,
                          float* F, int64_t fs) {
  const FftPlan& pl = cr.pl;
  const int64_t Q = pl.Q, Cov = cr.Cov(), nv = cr.G * cr.Ci * Cov, pf = plane_floats(pl);
  const int64_t nt = int64_t(taps.size()), CoP = Cov * kL;
  const float scale = 1.0f / float(pl.P * pl.Q);
  int64_t amax = 0;
  for (const auto& t : taps) amax = std::max(amax, t.first + 1);
  pr.run((nv + 1) / 2, [&](int64_t blk) {
    Buf b = thread_buf<0>(pl);
    std::memset(b.re, 0, pf * sizeof(float));
    std::memset(b.im, 0, pf * sizeof(float));
    for (int half = 0; half < 2; ++half) {
      const int64_t v = 2 * blk + half;
      if (v >= nv) break;
      const float* src = Wp + v / Cov * nt * CoP + v % Cov * kL;  // row g*Ci + ci, lanes co
      float* plane = half == 0 ? b.re : b.im;
      for (int64_t t = 0; t < nt; ++t)
        store(plane + (taps[t].first * Q + taps[t].second) * kL, load(src + t * CoP));
    }
    fft2_forward(rows, cols, Q, 0, amax, &b);
    const int64_t Qh = cr.Qh();
    for (int64_t i = 0; i < pl.P; ++i)
      for (int64_t j = 0; j < Qh; ++j) {
        const Split s = split_at(b, i * Q + j, mirror(i, j, pl.P, Q));
        float* d = F + (i * Qh + j) * fs + 2 * blk * 2 * kL;
        store(d, scale * s.r1);
        store(d + kL, -scale * s.i1);
        store(d + 2 * kL, scale * s.r2);
        store(d + 3 * kL, -scale * s.i2);
      }
  });
}

// Forward (flip = false) or bwd_data (flip = true) of a dense or grouped layer.
template <typename T>
bool dense_correlation(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                       bool flip, const T* in, const T* w, const T* bias, T* out) {
  DenseCorr cr;
  cr.N = g.N;
  cr.G = g.groups();
  cr.KEh = eff(g.KH, g.p.dilation_h);
  cr.KEw = eff(g.KW, g.p.dilation_w);
  cr.pl = pl;
  if (!flip) {
    cr.Cin = g.C, cr.Cout = g.O, cr.Ci = g.in_per_group(), cr.Co = g.out_per_group();
    cr.Hin = g.H, cr.Win = g.W, cr.U = g.OH, cr.V = g.OW;
    cr.pad_h = g.p.pad_top, cr.pad_w = g.p.pad_left;
    cr.is = g.x_strides(), cr.os = g.y_strides();
  } else {
    cr.Cin = g.O, cr.Cout = g.C, cr.Ci = g.out_per_group(), cr.Co = g.in_per_group();
    cr.Hin = g.OH, cr.Win = g.OW, cr.U = g.H, cr.V = g.W;
    cr.pad_h = cr.KEh - 1 - g.p.pad_top, cr.pad_w = cr.KEw - 1 - g.p.pad_left;
    cr.is = g.y_strides(), cr.os = g.x_strides();
  }
  if (!all_finite(pr, w, g.O * g.in_per_group() * g.KH * g.KW) ||
      !all_finite(pr, in, cr.N * cr.is.n))
    return false;
  const Strides4 ws = g.w_strides();
  std::vector<std::pair<int64_t, int64_t>> taps;
  for (int64_t kh = 0; kh < g.KH; ++kh)
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      const int64_t a = kh * g.p.dilation_h, b = kw * g.p.dilation_w;
      taps.push_back(flip ? std::make_pair(cr.KEh - 1 - a, cr.KEw - 1 - b) : std::make_pair(a, b));
    }
  std::vector<int64_t> tap_off;
  for (int64_t kh = 0; kh < g.KH; ++kh)
    for (int64_t kw = 0; kw < g.KW; ++kw) tap_off.push_back(kh * ws.h + kw * ws.w);
  // forward: f[g][ci][co] = w[g*Co + co, ci]; bwd_data: f[g][oi][ci] = w[g*Ci + oi, ci].
  auto filter = [&](int64_t gr, int64_t a, int64_t b) {
    const int64_t o = flip ? gr * cr.Ci + a : gr * cr.Co + b, c = flip ? b : a;
    return w + o * ws.n + c * ws.c;
  };
  const LinePlan rows = make_line_plan(pl.Q), cols = make_line_plan(pl.P);
  const int64_t K = cr.K(), fs = round_up(cr.G * cr.Ci * cr.Cov(), 2) * 2 * kL;
  float* const F = call_buffer<1>(size_t(K * fs));
  float* const Wp = call_buffer<4>(size_t(cr.G * cr.Ci * int64_t(taps.size()) * cr.Cov() * kL));
  pack_filter<T>(pr, cr, tap_off, filter, flip ? ws.c : ws.n, Wp);
  dense_filter_spectra(pr, cr, rows, cols, taps, Wp, F, fs);

  const int64_t xp = row_pad(cr.Cin), yp = row_pad(cr.Cout), items = cr.items();
  const int64_t per_item = K * 2 * (xp + yp) * int64_t(sizeof(float));
  const int64_t B = std::max<int64_t>(1, std::min(items, kBatchBytes / per_item));
  float* const X = call_buffer<2>(size_t(K * B * 2 * xp));
  float* const Y = call_buffer<3>(size_t(K * B * 2 * yp));
  const int64_t oblocks = (cr.Cout + kPair - 1) / kPair, Qh = cr.Qh();
  for (int64_t i0 = 0; i0 < items; i0 += B) {
    const int64_t nb = std::min(B, items - i0);
    spectra_of_items(pr, cr, rows, cols, in, cr.is, cr.Cin, cr.Hin, cr.Win, cr.pad_h, cr.pad_w,
                     true, i0, nb, X);
    pr.run(pl.P, [&](int64_t i) {
      for (int64_t k = i * Qh; k < (i + 1) * Qh; ++k)
        gemm_frequency(cr, nb, X + k * nb * 2 * xp, F + k * fs, Y + k * nb * 2 * yp);
    });
    pr.run(nb * oblocks, [&](int64_t task) {
      const int64_t m = task / oblocks, ob = task % oblocks, o0 = ob * kPair;
      const Item t = item(cr, i0 + m);
      Buf b = thread_buf<0>(pl);
      load_half(Y + m * 2 * yp, nb * 2 * yp, yp, o0, pl, &b);
      fft2_inverse(rows, cols, pl.Q, t.th, &b);
      const int lre = re_lanes(cr.Cout, ob), lim = im_lanes(cr.Cout, ob);
      V8 bre = V8{}, bim = V8{};
      if (bias) {
        bre = load_lanes(bias + o0, 1, lre);
        if (lim > 0) bim = load_lanes(bias + o0 + kL, 1, lim);
      }
      for (int64_t i = 0; i < t.th; ++i)
        for (int64_t j = 0; j < t.tw; ++j) {
          T* dst = out + t.n * cr.os.n + o0 * cr.os.c + (t.u0 + i) * cr.os.h + (t.v0 + j) * cr.os.w;
          store_lanes(dst, cr.os.c, lre, load(b.re + (i * pl.Q + j) * kL) + bre);
          if (lim > 0)
            store_lanes(dst + kL * cr.os.c, cr.os.c, lim, load(b.im + (i * pl.Q + j) * kL) + bim);
        }
    });
  }
  return true;
}

}  // namespace

template <typename T>
bool dense_fft_forward(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                       const T* x, const T* w, const T* bias, T* y) {
  return dense_correlation(pr, g, pl, false, x, w, bias, y);
}

template <typename T>
bool dense_fft_backward_data(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                             const T* dy, const T* w, const T* bias, T* dx) {
  return dense_correlation(pr, g, pl, true, dy, w, bias, dx);
}

// dw[o, ci, kh, kw] = sum over n, (u, v) of x[n, g*Ci + ci, u + kh*dh - pt, v + kw*dw - pl] *
// dy[n, o, u, v] (g = o / Co): the x patch and the zero-padded dy tile of every item give
// S[k][o][ci] = sum over items of conj(D[k][o]) * X[k][g*Ci + ci], whose inverse read at the taps
// is dw (as in the depthwise bwd_filter). S rows: plane p = o*CiP + ci, CiP = Ci rounded up to 8
// (the lanes past Ci are never read); HWIO dw where each 8 o lie in one group ("swapped"):
// p = ci*OP + o, OP = Cout rounded up to 8 (lanes past Cout never read).
template <typename T>
bool dense_fft_backward_filter(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                               const T* x, const T* dy, T* dw) {
  DenseCorr cr;
  cr.N = g.N, cr.G = g.groups(), cr.Cin = g.C, cr.Cout = g.O;
  cr.Ci = g.in_per_group(), cr.Co = g.out_per_group();
  cr.Hin = g.H, cr.Win = g.W, cr.U = g.OH, cr.V = g.OW;
  cr.pad_h = g.p.pad_top, cr.pad_w = g.p.pad_left;
  cr.KEh = eff(g.KH, g.p.dilation_h), cr.KEw = eff(g.KW, g.p.dilation_w);
  cr.is = g.x_strides(), cr.os = g.y_strides();
  cr.pl = pl;
  if (!all_finite(pr, x, cr.N * cr.is.n) || !all_finite(pr, dy, cr.N * cr.os.n)) return false;
  const Strides4 ws = g.w_strides();
  // HWIO dw (o innermost) takes the swapped layout of S where its vectors stay in one group.
  const bool swapped = ws.n == 1 && cr.Cout > 1 && (cr.G == 1 || cr.Co % kL == 0);
  const int64_t K = cr.K(), Qh = cr.Qh(), xp = row_pad(cr.Cin), dp = row_pad(cr.Cout);
  const int64_t CiP = round_up(cr.Ci, kL), OP = round_up(cr.Cout, kL);
  const int64_t sp = round_up(swapped ? cr.Ci * OP : cr.Cout * CiP, kPair);
  const int64_t items = cr.items(), per_item = K * 2 * (xp + dp) * int64_t(sizeof(float));
  const int64_t B = std::max<int64_t>(1, std::min(items, kBatchBytes / per_item));
  const LinePlan rows = make_line_plan(pl.Q), cols = make_line_plan(pl.P);
  float* const S = call_buffer<1>(size_t(K * 2 * sp));
  float* const X = call_buffer<2>(size_t(K * B * 2 * xp));
  float* const D = call_buffer<3>(size_t(K * B * 2 * dp));
  std::memset(S, 0, size_t(K * 2 * sp) * sizeof(float));
  // Per group: rows (o, or ci when swapped) in pairs by vectors (8 ci, or 8 o) in pairs.
  const int64_t nrows = swapped ? cr.Ci : cr.Co, nvec = swapped ? cr.Cov() : CiP / kL;
  for (int64_t i0 = 0; i0 < items; i0 += B) {
    const int64_t nb = std::min(B, items - i0);
    spectra_of_items(pr, cr, rows, cols, x, cr.is, cr.Cin, cr.Hin, cr.Win, cr.pad_h, cr.pad_w, true,
                     i0, nb, X);
    spectra_of_items(pr, cr, rows, cols, dy, cr.os, cr.Cout, cr.U, cr.V, 0, 0, false, i0, nb, D);
    pr.run(pl.P, [&](int64_t i) {
      for (int64_t k = i * Qh; k < (i + 1) * Qh; ++k) {
        const float* Xk = X + k * nb * 2 * xp;
        const float* Dk = D + k * nb * 2 * dp;
        float* Sk = S + k * 2 * sp;
        for (int64_t gr = 0; gr < cr.G; ++gr)
          for (int64_t r = 0; r < nrows; r += 2)
            for (int64_t v = 0; v < nvec; v += 2) {
              const bool two_r = r + 1 < nrows, two_v = v + 1 < nvec;
              if (swapped) {  // S[ci][o]: X scalars of group gr's row ci, D vectors of its o
                const float* xs = Xk + gr * cr.Ci + r;
                const float* dv = Dk + gr * cr.Co + v * kL;
                float* s = Sk + r * OP + gr * cr.Co + v * kL;
                if (two_r && two_v)
                  filter_block<2, 2, true>(nb, xs, 2 * xp, xp, dv, 2 * dp, dp, s, OP, sp);
                else if (two_r)
                  filter_block<2, 1, true>(nb, xs, 2 * xp, xp, dv, 2 * dp, dp, s, OP, sp);
                else if (two_v)
                  filter_block<1, 2, true>(nb, xs, 2 * xp, xp, dv, 2 * dp, dp, s, OP, sp);
                else
                  filter_block<1, 1, true>(nb, xs, 2 * xp, xp, dv, 2 * dp, dp, s, OP, sp);
                continue;
              }
              const int64_t o = gr * cr.Co + r;
              const float* d = Dk + o;
              const float* xv = Xk + gr * cr.Ci + v * kL;
              float* s = Sk + o * CiP + v * kL;
              if (two_r && two_v)
                filter_block<2, 2>(nb, d, 2 * dp, dp, xv, 2 * xp, xp, s, CiP, sp);
              else if (two_r)
                filter_block<2, 1>(nb, d, 2 * dp, dp, xv, 2 * xp, xp, s, CiP, sp);
              else if (two_v)
                filter_block<1, 2>(nb, d, 2 * dp, dp, xv, 2 * xp, xp, s, CiP, sp);
              else
                filter_block<1, 1>(nb, d, 2 * dp, dp, xv, 2 * xp, xp, s, CiP, sp);
            }
      }
    });
  }
  const float scale = 1.0f / float(pl.P * pl.Q);
  // Unswapped, plane p = o*CiP + ci: OIHW dw takes a plane's taps contiguous. Swapped, plane
  // p = ci*OP + o: each 8 lanes are 8 consecutive o of one ci, one contiguous HWIO store per tap
  // (written plane by plane instead, every tap of every plane was its own cache line, shared by
  // the 16 tasks holding its other o: NHWC bwd_filter ran 1.8x NCHW's time).
  pr.run(sp / kPair, [&](int64_t blk) {
    Buf b = thread_buf<0>(pl);
    load_half(S, 2 * sp, sp, blk * kPair, pl, &b);
    fft2_inverse(rows, cols, pl.Q, cr.KEh, &b);
    if (swapped) {
      for (int half = 0; half < 2; ++half) {
        const int64_t p = blk * kPair + half * kL, ci = p / OP, o0 = p % OP;
        if (ci >= cr.Ci || o0 >= cr.Cout) continue;
        const int n = int(std::min<int64_t>(kL, cr.Cout - o0));
        const float* plane = half == 0 ? b.re : b.im;
        for (int64_t kh = 0; kh < g.KH; ++kh)
          for (int64_t kw = 0; kw < g.KW; ++kw) {
            const V8 v = load(plane + (kh * g.p.dilation_h * pl.Q + kw * g.p.dilation_w) * kL);
            store_lanes(dw + o0 + ci * ws.c + kh * ws.h + kw * ws.w, 1, n, scale * v);
          }
      }
      return;
    }
    for (int l = 0; l < kPair; ++l) {
      const int64_t p = blk * kPair + l, o = p / CiP, ci = p % CiP;
      if (o >= cr.Cout || ci >= cr.Ci) continue;
      const float* plane = l < kL ? b.re : b.im;
      for (int64_t kh = 0; kh < g.KH; ++kh)
        for (int64_t kw = 0; kw < g.KW; ++kw) {
          const float v = plane[(kh * g.p.dilation_h * pl.Q + kw * g.p.dilation_w) * kL + l % kL];
          dw[o * ws.n + ci * ws.c + kh * ws.h + kw * ws.w] = Num<T>::store(v * scale);
        }
    }
  });
  return true;
}

#define JAXCONV_INSTANTIATE(T)                                                                \
  template bool dense_fft_forward(const ParallelRunner&, const ConvGeometry&, const FftPlan&, \
                                  const T*, const T*, const T*, T*);                          \
  template bool dense_fft_backward_data(const ParallelRunner&, const ConvGeometry&,           \
                                        const FftPlan&, const T*, const T*, const T*, T*);    \
  template bool dense_fft_backward_filter(const ParallelRunner&, const ConvGeometry&,         \
                                          const FftPlan&, const T*, const T*, T*);
JAXCONV_INSTANTIATE(float)
JAXCONV_INSTANTIATE(f16_t)
JAXCONV_INSTANTIATE(bf16_t)
#undef JAXCONV_INSTANTIATE

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY::fft
