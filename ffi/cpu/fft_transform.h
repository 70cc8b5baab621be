// The transforms shared by the FFT convolution kernels (fft_depthwise.cc, fft_dense.cc),
// compiled once per capability like them: fft_transform.cc holds the 1-d and 2-d transforms,
// this header their plan, the buffers, the patch loads and the two-channel split.
//
// A complex value is a pair of 8-lane vectors (re, im) held in two separate planes of a buffer;
// the lanes are 8 channels, so every butterfly is plain vector arithmetic and the same code
// serves NHWC (channels contiguous) and NCHW (lanes gathered a plane apart). The 1-d transform is
// a Stockham auto-sort FFT (decimation in frequency, radices 4, 2, 3, 5; stage with radix r,
// m = n0/r, stride s: for p < m, q < s the inputs x[q + s*(p + j*m)], j < r, go through an
// r-point DFT and land, multiplied by w_n0^(p*k), at y[q + s*(r*p + k)]); the 2-d transform runs
// it along rows (skipping rows known to be zero) and then down all columns at once (the "batch":
// the Q columns are the innermost, contiguous index). The inverse is the forward transform with
// the re and im planes exchanged (swap(DFT(swap(z))) = n * IDFT(z)); the 1/(PQ) goes into the
// filter spectrum or the final scale.
//
// Real data, two channels per complex transform: the planes of channels c (re lanes) and c + 8
// (im lanes) form z = x1 + i*x2, so one complex transform serves 16 real channels. With
// Z = DFT(z) and Zm[k] = conj(Z[-k]): X1 = (Z + Zm)/2, X2 = (Z - Zm)/(2i) (split() below).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "fft.h"
#include "simd.h"

namespace jaxconv::JAXCONV_CPU_CAPABILITY::fft {

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

LinePlan make_line_plan(int64_t n);

// A P x Q complex buffer (element (i, j) at i*Q + j, kL floats each) and a scratch buffer of
// the same size; the transforms may swap the two.
struct Buf {
  float *re, *im, *sre, *sim;
};

// Buffer floats per plane: P*Q vectors.
inline int64_t plane_floats(const FftPlan& pl) { return pl.P * pl.Q * kL; }

// The four per-thread planes of one buffer (slots Base .. Base + 3).
template <int Base>
Buf thread_buf(const FftPlan& pl) {
  const int64_t pf = plane_floats(pl);
  return {scratch<Base>(pf), scratch<Base + 1>(pf), scratch<Base + 2>(pf), scratch<Base + 3>(pf)};
}

// Rows transform of rows [lo, hi) (rows outside are zero and stay zero), then all columns.
void fft2_forward(const LinePlan& rows, const LinePlan& cols, int64_t Q, int64_t lo, int64_t hi,
                  Buf* b);

// Unnormalized inverse: all columns, then rows [0, need) only (the rows read afterwards).
void fft2_inverse(const LinePlan& rows, const LinePlan& cols, int64_t Q, int64_t need, Buf* b);

// Flat index of -k for k = i*Q + j.
inline int64_t mirror(int64_t i, int64_t j, int64_t P, int64_t Q) {
  return ((P - i) % P) * Q + (Q - j) % Q;
}

inline int64_t eff(int64_t k, int64_t d) { return (k - 1) * d + 1; }

// Lanes of channel block cb held by its re and im vectors (C channels in all).
inline int re_lanes(int64_t C, int64_t cb) { return int(std::min<int64_t>(kL, C - cb * kPair)); }
inline int im_lanes(int64_t C, int64_t cb) {
  return int(std::max<int64_t>(0, std::min<int64_t>(kL, C - cb * kPair - kL)));
}

// Loads, for channel block cb, the patch whose buffer cell (i, j) is src[h0 + i, w0 + j] for
// i < rows, j < cols (reads outside the Hin x Win plane are zero), into b->re / b->im (channels
// cb*16 + l in re lane l, cb*16 + 8 + l in im lane l); every other cell is zero. Returns the
// range [lo, hi) of rows that may be non-zero.
template <typename T>
void load_patch(const T* src_n, const Strides4& s, int64_t C, int64_t cb, int64_t Hin, int64_t Win,
                int64_t h0, int64_t w0, int64_t rows, int64_t cols, const FftPlan& pl, Buf* b,
                int64_t* lo, int64_t* hi) {
  const int64_t Q = pl.Q, c0 = cb * kPair;
  const int lre = re_lanes(C, cb), lim = im_lanes(C, cb);
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
inline Split split_at(const Buf& b, int64_t k, int64_t km) {
  return split(load(b.re + k * kL), load(b.im + k * kL), load(b.re + km * kL),
               load(b.im + km * kL));
}

// Whether no element of p[0, count) is inf or NaN.
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

// Per-call buffers shared by the tasks: grow-only, owned by the calling thread (the tasks get
// the pointer, never the vector, which is each worker's own).
template <int Slot>
float* call_buffer(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY::fft
