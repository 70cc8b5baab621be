// The 1-d and 2-d transforms of the FFT convolution (fft_transform.h), compiled once per
// capability.
#include "fft_transform.h"

namespace jaxconv::JAXCONV_CPU_CAPABILITY::fft {
namespace {

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

}  // namespace

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

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY::fft
