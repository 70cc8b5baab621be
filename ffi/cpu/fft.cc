// FFT convolution (fft.h), compiled once per capability: the transforms and the depthwise
// kernels for forward, bwd_data (stride 1) and bwd_filter.
//
// Transforms. A complex value is a pair of 8-lane vectors (re, im) held in two separate planes
// of a buffer; the lanes are 8 channels, so every butterfly is plain vector arithmetic and the
// same code serves NHWC (channels contiguous) and NCHW (lanes gathered a plane apart). The 1-d
// transform is a Stockham auto-sort FFT (decimation in frequency, radices 4, 2, 3, 5; stage
// with radix r, m = n0/r, stride s: for p < m, q < s the inputs x[q + s*(p + j*m)], j < r, go
// through an r-point DFT and land, multiplied by w_n0^(p*k), at y[q + s*(r*p + k)]); the 2-d
// transform runs it along rows (skipping rows known to be zero) and then down all columns at
// once (the "batch": the Q columns are the innermost, contiguous index). The inverse is the
// forward transform with the re and im planes exchanged (swap(DFT(swap(z))) = n * IDFT(z)); the
// 1/(PQ) goes into the filter spectrum or the final scale.
//
// Real data, two channels per complex transform: the planes of channels c (re lanes) and c + 8
// (im lanes) form z = x1 + i*x2, so one complex transform serves 16 real channels. With
// Z = DFT(z) and Zm[k] = conj(Z[-k]): X1 = (Z + Zm)/2, X2 = (Z - Zm)/(2i). A correlation with
// filters f1, f2 (spectra F1, F2) is Y1 + i*Y2 = X1*conj(F1) + i*X2*conj(F2)
//   = Z * A + Zm * B,   A = (conj(F1) + conj(F2))/2,   B = (conj(F1) - conj(F2))/2,
// computed for the pair of frequencies (k, -k) together so the product can overwrite Z. The
// inverse of Y1 + i*Y2 gives y1 in the re lanes and y2 in the im lanes.
#include "fft.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "kernel_table.h"
#include "simd.h"

namespace jaxconv::JAXCONV_CPU_CAPABILITY {
namespace {

using V8 = V<float>;
constexpr int kL = kLanes<float>;  // lanes of one vector: 8 channels
constexpr int kPair = 2 * kL;      // channels per complex transform

// Per-thread scratch that grows but is never freed between calls.
template <int Slot>
float* scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// ---------------------------------------------------------------------------------------------
// 1-d transform plan: the stages and their twiddles w_n0^(p*k), k = 1 .. r-1.

struct Stage {
  int r;
  int64_t m, s, tw;  // m = n0 / r, stride s, offset of the stage's twiddles
};

struct LinePlan {
  int64_t n = 0;
  std::vector<Stage> stages;
  std::vector<float> twr, twi;
};

LinePlan make_line_plan(int64_t n) {
  LinePlan lp;
  lp.n = n;
  int64_t n0 = n, s = 1;
  while (n0 > 1) {
    const int r = n0 % 4 == 0 ? 4 : n0 % 2 == 0 ? 2 : n0 % 3 == 0 ? 3 : 5;
    const int64_t m = n0 / r;
    lp.stages.push_back({r, m, s, int64_t(lp.twr.size())});
    for (int64_t p = 0; p < m; ++p)
      for (int k = 1; k < r; ++k) {
        const double a = -2.0 * M_PI * double(p * k) / double(n0);
        lp.twr.push_back(float(std::cos(a)));
        lp.twi.push_back(float(std::sin(a)));
      }
    n0 = m;
    s *= r;
  }
  return lp;
}

// In-place r-point DFT (forward sign) of a[0..r).
template <int R>
__attribute__((always_inline)) inline void butterfly(V8* ar, V8* ai) {
  if constexpr (R == 2) {
    const V8 r0 = ar[0] + ar[1], i0 = ai[0] + ai[1];
    ar[1] = ar[0] - ar[1];
    ai[1] = ai[0] - ai[1];
    ar[0] = r0;
    ai[0] = i0;
  } else if constexpr (R == 4) {
    const V8 s0r = ar[0] + ar[2], s0i = ai[0] + ai[2], d0r = ar[0] - ar[2], d0i = ai[0] - ai[2];
    const V8 s1r = ar[1] + ar[3], s1i = ai[1] + ai[3], d1r = ar[1] - ar[3], d1i = ai[1] - ai[3];
    ar[0] = s0r + s1r;
    ai[0] = s0i + s1i;
    ar[2] = s0r - s1r;
    ai[2] = s0i - s1i;
    ar[1] = d0r + d1i;  // d0 - i*d1
    ai[1] = d0i - d1r;
    ar[3] = d0r - d1i;  // d0 + i*d1
    ai[3] = d0i + d1r;
  } else if constexpr (R == 3) {
    constexpr float h = 0.86602540378443864676f;  // sin(2 pi / 3)
    const V8 sr = ar[1] + ar[2], si = ai[1] + ai[2], dr = ar[1] - ar[2], di = ai[1] - ai[2];
    const V8 mr = ar[0] - 0.5f * sr, mi = ai[0] - 0.5f * si;
    ar[0] = ar[0] + sr;
    ai[0] = ai[0] + si;
    // t1 = m - i*h*d, t2 = m + i*h*d;  -i*d = (di, -dr)
    ar[1] = mr + h * di;
    ai[1] = mi - h * dr;
    ar[2] = mr - h * di;
    ai[2] = mi + h * dr;
  } else {  // R == 5
    constexpr float c1 = 0.30901699437494742410f,
                    c2 = -0.80901699437494742410f;                               // cos 2pi/5, 4pi/5
    constexpr float n1 = 0.95105651629515357212f, n2 = 0.58778525229247312917f;  // sin 2pi/5, 4pi/5
    const V8 s1r = ar[1] + ar[4], s1i = ai[1] + ai[4], d1r = ar[1] - ar[4], d1i = ai[1] - ai[4];
    const V8 s2r = ar[2] + ar[3], s2i = ai[2] + ai[3], d2r = ar[2] - ar[3], d2i = ai[2] - ai[3];
    const V8 m1r = ar[0] + c1 * s1r + c2 * s2r, m1i = ai[0] + c1 * s1i + c2 * s2i;
    const V8 m2r = ar[0] + c2 * s1r + c1 * s2r, m2i = ai[0] + c2 * s1i + c1 * s2i;
    // e1 = n1*d1 + n2*d2 (t1 = m1 - i*e1, t4 = m1 + i*e1); e2 = n2*d1 - n1*d2 (t2 = m2 - i*e2,
    // t3 = m2 + i*e2).
    const V8 e1r = n1 * d1r + n2 * d2r, e1i = n1 * d1i + n2 * d2i;
    const V8 e2r = n2 * d1r - n1 * d2r, e2i = n2 * d1i - n1 * d2i;
    ar[0] = ar[0] + s1r + s2r;
    ai[0] = ai[0] + s1i + s2i;
    ar[1] = m1r + e1i;
    ai[1] = m1i - e1r;
    ar[4] = m1r - e1i;
    ai[4] = m1i + e1r;
    ar[2] = m2r + e2i;
    ai[2] = m2i - e2r;
    ar[3] = m2r - e2i;
    ai[3] = m2i + e2r;
  }
}

// One Stockham stage on `batch` interleaved sequences (element j of sequence b at j*batch + b,
// each element one vector): x -> y.
template <int R>
void run_stage(const LinePlan& lp, const Stage& sg, int64_t batch, const float* xr, const float* xi,
               float* yr, float* yi) {
  const int64_t m = sg.m, inner = sg.s * batch;
  const int64_t istep = m * inner * kL, ostep = inner * kL;
  const float* twr = lp.twr.data() + sg.tw;
  const float* twi = lp.twi.data() + sg.tw;
  for (int64_t p = 0; p < m; ++p) {
    float wr[R], wi[R];
    for (int k = 1; k < R; ++k) {
      wr[k] = twr[p * (R - 1) + k - 1];
      wi[k] = twi[p * (R - 1) + k - 1];
    }
    const int64_t ibase = p * inner * kL, obase = R * p * inner * kL;
    for (int64_t idx = 0; idx < inner; ++idx) {
      V8 ar[R], ai[R];
      for (int j = 0; j < R; ++j) {
        ar[j] = load(xr + ibase + idx * kL + j * istep);
        ai[j] = load(xi + ibase + idx * kL + j * istep);
      }
      butterfly<R>(ar, ai);
      store(yr + obase + idx * kL, ar[0]);
      store(yi + obase + idx * kL, ai[0]);
      for (int k = 1; k < R; ++k) {
        store(yr + obase + idx * kL + k * ostep, ar[k] * wr[k] - ai[k] * wi[k]);
        store(yi + obase + idx * kL + k * ostep, ar[k] * wi[k] + ai[k] * wr[k]);
      }
    }
  }
}

// The whole 1-d transform of `batch` sequences; x is clobbered. Returns true when the result is
// in y (an odd number of stages), false when it is back in x.
bool fft_line(const LinePlan& lp, int64_t batch, float* xr, float* xi, float* yr, float* yi) {
  bool in_y = false;
  for (const Stage& sg : lp.stages) {
    float *sr = in_y ? yr : xr, *si = in_y ? yi : xi, *dr = in_y ? xr : yr, *di = in_y ? xi : yi;
    switch (sg.r) {
      case 4: run_stage<4>(lp, sg, batch, sr, si, dr, di); break;
      case 2: run_stage<2>(lp, sg, batch, sr, si, dr, di); break;
      case 3: run_stage<3>(lp, sg, batch, sr, si, dr, di); break;
      default: run_stage<5>(lp, sg, batch, sr, si, dr, di); break;
    }
    in_y = !in_y;
  }
  return in_y;
}

// A P x Q complex buffer (element (i, j) at i*Q + j, kL floats each) and a scratch buffer of
// the same size; the transforms may swap the two.
struct Buf {
  float *re, *im, *sre, *sim;
};

// Buffer floats per plane: P*Q vectors.
inline int64_t plane_floats(const FftPlan& pl) { return pl.P * pl.Q * kL; }

// Rows transform of rows [lo, hi) (rows outside are zero and stay zero), then all columns.
void fft2_forward(const LinePlan& rows, const LinePlan& cols, int64_t Q, int64_t lo, int64_t hi,
                  Buf* b) {
  for (int64_t i = lo; i < hi; ++i) {
    float *r = b->re + i * Q * kL, *m = b->im + i * Q * kL;
    if (fft_line(rows, 1, r, m, b->sre, b->sim)) {
      std::memcpy(r, b->sre, Q * kL * sizeof(float));
      std::memcpy(m, b->sim, Q * kL * sizeof(float));
    }
  }
  if (fft_line(cols, Q, b->re, b->im, b->sre, b->sim)) {
    std::swap(b->re, b->sre);
    std::swap(b->im, b->sim);
  }
}

// Unnormalized inverse: all columns, then rows [0, need) only (the rows read afterwards).
void fft2_inverse(const LinePlan& rows, const LinePlan& cols, int64_t Q, int64_t need, Buf* b) {
  if (fft_line(cols, Q, b->im, b->re, b->sim, b->sre)) {
    std::swap(b->re, b->sre);
    std::swap(b->im, b->sim);
  }
  for (int64_t i = 0; i < need; ++i) {
    float *r = b->re + i * Q * kL, *m = b->im + i * Q * kL;
    if (fft_line(rows, 1, m, r, b->sim, b->sre)) {
      std::memcpy(r, b->sre, Q * kL * sizeof(float));
      std::memcpy(m, b->sim, Q * kL * sizeof(float));
    }
  }
}

// Flat index of -k for k = i*Q + j.
inline int64_t mirror(int64_t i, int64_t j, int64_t P, int64_t Q) {
  return ((P - i) % P) * Q + (Q - j) % Q;
}

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

// Loads, for channel block cb, the patch whose buffer cell (i, j) is src[h0 + i, w0 + j] for
// i < rows, j < cols (reads outside the Hin x Win plane are zero), into b->re / b->im (channels
// cb*16 + l in re lane l, cb*16 + 8 + l in im lane l); every other cell is zero. Returns the
// range [lo, hi) of rows that may be non-zero.
template <typename T>
void load_patch(const T* src_n, const Strides4& s, int64_t C, int64_t cb, int64_t Hin, int64_t Win,
                int64_t h0, int64_t w0, int64_t rows, int64_t cols, const FftPlan& pl, Buf* b,
                int64_t* lo, int64_t* hi) {
  const int64_t Q = pl.Q, c0 = cb * kPair;
  const int lre = int(std::min<int64_t>(kL, C - c0));
  const int lim = int(std::max<int64_t>(0, std::min<int64_t>(kL, C - c0 - kL)));
  std::memset(b->re, 0, plane_floats(pl) * sizeof(float));
  std::memset(b->im, 0, plane_floats(pl) * sizeof(float));
  const int64_t i0 = std::max<int64_t>(0, -h0), i1 = std::min(rows, Hin - h0);
  const int64_t j0 = std::max<int64_t>(0, -w0), j1 = std::min(cols, Win - w0);
  *lo = i0;
  *hi = std::max(i0, i1);
  for (int64_t i = i0; i < i1; ++i) {
    const T* row = src_n + c0 * s.c + (h0 + i) * s.h;
    float *dr = b->re + i * Q * kL, *di = b->im + i * Q * kL;
    for (int64_t j = j0; j < j1; ++j) {
      const T* p = row + (w0 + j) * s.w;
      store(dr + j * kL, load_lanes(p, s.c, lre));
      if (lim > 0) store(di + j * kL, load_lanes(p + kL * s.c, s.c, lim));
    }
  }
}

// The two separated spectra of a two-channel transform at k and -k (see the file comment):
// X1 = (Z + conj(Zm))/2, X2 = (Z - conj(Zm))/(2i), from Z = z[k], Zm = z[-k].
struct Split {
  V8 r1, i1, r2, i2;
};
__attribute__((always_inline)) inline Split split(V8 zr, V8 zi, V8 mr, V8 mi) {
  // Z + conj(Zm) = (zr + mr, zi - mi);  (Z - conj(Zm)) / (2i) = ((zi + mi), -(zr - mr)) / 2
  return {0.5f * (zr + mr), 0.5f * (zi - mi), 0.5f * (zi + mi), 0.5f * (mr - zr)};
}

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
    Buf b{scratch<0>(pf), scratch<1>(pf), scratch<2>(pf), scratch<3>(pf)};
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
    Buf b{scratch<0>(pf), scratch<1>(pf), scratch<2>(pf), scratch<3>(pf)};
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

template <typename T>
bool all_finite(const ParallelRunner& pr, const T* p, int64_t count) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  std::vector<char> bad(chunks, 0);
  pr.run(chunks, [&](int64_t c) {
    const int64_t lo = c * kChunk, hi = std::min(count, lo + kChunk);
    if constexpr (std::is_same_v<T, float>) {
      uint32_t any = 0;  // exponent all ones: inf or NaN (an OR-reduction that vectorizes)
      for (int64_t i = lo; i < hi; ++i) {
        uint32_t u;
        std::memcpy(&u, p + i, 4);
        any |= uint32_t((u & 0x7f800000u) == 0x7f800000u);
      }
      bad[c] = any != 0;
    } else {
      for (int64_t i = lo; i < hi; ++i)
        if (!std::isfinite(Num<T>::load(p[i]))) {
          bad[c] = 1;
          return;
        }
    }
  });
  for (char b : bad)
    if (b) return false;
  return true;
}

int64_t eff(int64_t k, int64_t d) { return (k - 1) * d + 1; }

// Forward (flip = false: f = w, pad as given) or bwd_data (flip = true: f = w flipped,
// in = dy, out = dx, pad = KE - 1 - pad) of a depthwise layer.
template <typename T>
bool depthwise_fft(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl, bool flip,
                   const T* in, const T* w, const T* bias, T* out) {
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
    thread_local std::vector<float> spec_buf;
    const size_t spec_size = size_t(cr.blocks()) * 4 * plane_floats(pl);
    if (spec_buf.size() < spec_size) spec_buf.resize(spec_size);
    float* const spec = spec_buf.data();  // not spec_buf inside the tasks: each worker's own
    filter_spectra(pr, cr, rows, cols, taps, value, spec);
    correlate(pr, cr, rows, cols, spec, in, bias, out);
    return true;
  }
}

template <typename T>
bool fft_forward(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl, const T* x,
                 const T* w, const T* bias, T* y) {
  return depthwise_fft(pr, g, pl, false, x, w, bias, y);
}

template <typename T>
bool fft_backward_data(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                       const T* dy, const T* w, const T* bias, T* dx) {
  return depthwise_fft(pr, g, pl, true, dy, w, bias, dx);
}

// dw[c, kh, kw] = sum over n and (u, v) of x[n, c, u + kh*dh - pt, v + kw*dw - pl] * dy[n, c, u,
// v]: per output tile, the spectra of the x patch (X) and of the dy tile zero-padded (D) give sum_k
// X*conj(D) = the circular correlation, linear for shifts a < KE_h (see fft.h). The sums S1 + i*S2
// over images and tiles are accumulated in the frequency domain, per channel block and part (a
// contiguous range of (image, tile) pairs; parts only when the blocks are too few for the threads),
// added part by part in order, and inverted once per block.
template <typename T>
bool fft_backward_filter(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                         const T* x, const T* dy, T* dw) {
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
      Buf bx{scratch<0>(pf), scratch<1>(pf), scratch<2>(pf), scratch<3>(pf)};
      Buf bd{scratch<4>(pf), scratch<5>(pf), scratch<6>(pf), scratch<7>(pf)};
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
      Buf b{scratch<0>(pf), scratch<1>(pf), scratch<2>(pf), scratch<3>(pf)};
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

}  // namespace

void add_fft_kernels(KernelTable* t) {
  t->fft_f32 = {fft_forward<float>, fft_backward_data<float>, fft_backward_filter<float>};
  t->fft_f64 = {nullptr, nullptr, nullptr};
  t->fft_f16 = {fft_forward<f16_t>, fft_backward_data<f16_t>, fft_backward_filter<f16_t>};
  t->fft_bf16 = {fft_forward<bf16_t>, fft_backward_data<bf16_t>, fft_backward_filter<bf16_t>};
}

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY
