// Winograd F(m x m, 3x3) convolution (Lavin & Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2016) for 3x3 stride-1 dilation-1 layers, m = 2 or 4.
//
// Forward and bwd_data are one stride-1 3x3 correlation
//
//   out[n, grp*Cout + co, u, v] = bias + sum over (ci, th, tw) of
//       in[n, grp*Cin + ci, u + th - pad_h, v + tw - pad_w] * f[grp][co][ci][th][tw]
//
// (reads outside the input are zero). Forward: in = x, f = w, pad = (pad_top, pad_left).
// bwd_data: dx[h] = sum over kh of dy[h + pt - kh] * w[kh]; with th = 2 - kh that is
// dy[h + th - (2 - pt)] * w[2 - th]: in = dy, f[co = c][ci = o] = w[o][c] flipped, pad = 2 - pt.
//
// The output is cut into m x m tiles; tile (n, tu, tv) needs the a x a input patch (a = m + 2)
// starting at (tu*m - pad_h, tv*m - pad_w). Per tile and channel, with the constant matrices
// B (a x a), G (a x 3), A (a x m) of the chosen m:
//
//   V = B^T d B  (input transform)   U = G f G^T  (filter transform)   Y = A^T M A  (output)
//   M[e][tile][co] = sum over ci of V[e][tile][ci] * U[e][ci][co]     for each of the a^2 e
//
// so the multiplications are a^2 GEMMs (tiles x Cin) * (Cin x Cout): (m+2)^2 / m^2 products
// per output instead of 9 (2.25x fewer for m = 2, 4x fewer for m = 4). The GEMMs run on the
// packed micro-kernel of gemm.cc: V read in place as A, U packed once per call into its B
// panels. The transforms are additions and multiplications by small constants, done on
// 8-channel vectors (the channel is the lane: contiguous in NHWC, a plane apart in NCHW).
//
// Schedules: "blocked" runs each block of tiles through all three stages in per-thread scratch
// (V and M stay in L2) against U transformed once for all e; "whole" transforms every tile's
// input first, then gives each task one e (its GEMM over all tiles against that U[e]), then
// transforms every output; "panels" (few tiles, many channels: U = a^2 * Cin * Cout floats far
// larger than V and M) transforms every tile's input, then gives each task 32 output channels,
// whose U it makes K-slice by K-slice in L2 for all e right before their GEMMs over all tiles,
// then transforms every output. Blocked and whole transform the filter once per call for all e
// (transform_filter: each weight read once, written a^2 times into U); blocked re-reads all of
// U per block, whole moves V and M through memory once, panels never writes U out but reads V
// once per 32 output channels (see run() for the choice).
//
// Precision: the transforms run in float32 (U[e] as 9 multiply-adds with coefficients formed
// in double and rounded once). F(4x4,3x3) has larger constants (up to 8 in A, 5 in B) and loses
// about one more decimal digit than F(2x2,3x3); tests/test_winograd.py states and checks the
// bounds. Half types are widened to float32 when the input patch is loaded and rounded once when
// the output is stored. bfloat16 F(2x2) under avx512_bf16 also rounds V and U to bfloat16 pairs
// for its GEMMs on vdpbf16ps (gemm_stage's P; bound 4 * 2^-9 of max|y|, docs/design.md). A
// non-finite input or weight spreads differently through the transforms (inf - inf = NaN across a
// whole tile), so such calls take the direct algorithm.
//
// bwd_filter (run_filter, below) is the adjoint of the forward's tiles: the same input
// transform V, a transform A dY A^T of dy's m x m cells, a^2 GEMMs whose reduction runs over
// the tiles, and G^T . G from a x a to the 3 x 3 filter (its comment has the algebra).
#include "winograd.h"

#include "gemm.h"
#include "kernel_table.h"
#include "simd.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace jaxconv::JAXCONV_CPU_CAPABILITY {
namespace {

using V8 = V<float>;

// Per-thread scratch that grows but is never freed between calls.
template <int Slot>
float* scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// ---------------------------------------------------------------------------------------------
// The 1-d transforms. A 2-d transform X^T d X applies the 1-d one down every column, then along
// every row. `S` is V8 (input and output transforms) or double (filter transform).

template <int M>
struct Wino;

// F(2x2,3x3):  B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
//              G   = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
//              A^T = [1 1 1 0; 0 1 -1 -1]
template <>
struct Wino<2> {
  static constexpr int kA = 4;
  template <typename S>
  __attribute__((always_inline)) static void input(const S* d, int ds, S* o, int os) {
    const S d0 = d[0], d1 = d[ds], d2 = d[2 * ds], d3 = d[3 * ds];
    o[0] = d0 - d2;
    o[os] = d1 + d2;
    o[2 * os] = d2 - d1;
    o[3 * os] = d1 - d3;
  }
  static constexpr double kG[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  template <typename S>
  __attribute__((always_inline)) static void output(const S* m, int ms, S* o, int os) {
    const S m0 = m[0], m1 = m[ms], m2 = m[2 * ms], m3 = m[3 * ms];
    o[0] = m0 + m1 + m2;
    o[os] = m1 - m2 - m3;
  }
  // bwd_filter's transposes (see run_filter): A y (m -> a values), i.e. o[k] = sum over i of
  // A^T[i][k] y[i], and G^T m (a -> 3), o[k] = sum over i of G[i][k] m[i].
  template <typename S>
  __attribute__((always_inline)) static void grad_output(const S* y, int ys, S* o, int os) {
    const S y0 = y[0], y1 = y[ys];
    o[0] = y0;
    o[os] = y0 + y1;
    o[2 * os] = y0 - y1;
    o[3 * os] = -y1;
  }
  template <typename S>
  __attribute__((always_inline)) static void grad_filter(const S* m, int ms, S* o, int os) {
    const S m0 = m[0], m1 = m[ms], m2 = m[2 * ms], m3 = m[3 * ms];
    const S p = 0.5f * (m1 + m2);
    o[0] = m0 + p;
    o[os] = 0.5f * (m1 - m2);
    o[2 * os] = p + m3;
  }
};

// F(4x4,3x3), interpolation points 0, +-1, +-2, inf:
//   B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0;
//          0 4 0 -5 0 1]
//   G   = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1]
//   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
template <>
struct Wino<4> {
  static constexpr int kA = 6;
  template <typename S>
  __attribute__((always_inline)) static void input(const S* d, int ds, S* o, int os) {
    const S d0 = d[0], d1 = d[ds], d2 = d[2 * ds], d3 = d[3 * ds], d4 = d[4 * ds], d5 = d[5 * ds];
    // Shared partial sums: rows 1/2 and 3/4 differ only in the sign of one term.
    const S a = d4 - 4.0f * d2, b = d3 - 4.0f * d1;  // rows 1, 2: a +- b
    const S c = d4 - d2, e = 2.0f * (d3 - d1);       // rows 3, 4: c +- e
    o[0] = 4.0f * d0 - 5.0f * d2 + d4;
    o[os] = a + b;
    o[2 * os] = a - b;
    o[3 * os] = c + e;
    o[4 * os] = c - e;
    o[5 * os] = 4.0f * d1 - 5.0f * d3 + d5;
  }
  static constexpr double kG[6][3] = {{1.0 / 4, 0, 0},
                                      {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                      {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                      {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                      {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                      {0, 0, 1}};
  template <typename S>
  __attribute__((always_inline)) static void output(const S* m, int ms, S* o, int os) {
    const S m0 = m[0], m1 = m[ms], m2 = m[2 * ms], m3 = m[3 * ms], m4 = m[4 * ms], m5 = m[5 * ms];
    const S p12 = m1 + m2, n12 = m1 - m2, p34 = m3 + m4, n34 = m3 - m4;
    o[0] = m0 + p12 + p34;
    o[os] = n12 + 2.0f * n34;
    o[2 * os] = p12 + 4.0f * p34;
    o[3 * os] = n12 + 8.0f * n34 + m5;
  }
  // bwd_filter's transposes, as Wino<2>'s: columns of A^T (A y) and of G (G^T m).
  template <typename S>
  __attribute__((always_inline)) static void grad_output(const S* y, int ys, S* o, int os) {
    const S y0 = y[0], y1 = y[ys], y2 = y[2 * ys], y3 = y[3 * ys];
    const S p = y0 + y2, q = y1 + y3;                       // columns 1, 2: p +- q
    const S r = y0 + 4.0f * y2, t = 2.0f * y1 + 8.0f * y3;  // columns 3, 4: r +- t
    o[0] = y0;
    o[os] = p + q;
    o[2 * os] = p - q;
    o[3 * os] = r + t;
    o[4 * os] = r - t;
    o[5 * os] = y3;
  }
  template <typename S>
  __attribute__((always_inline)) static void grad_filter(const S* m, int ms, S* o, int os) {
    const S m0 = m[0], m1 = m[ms], m2 = m[2 * ms], m3 = m[3 * ms], m4 = m[4 * ms], m5 = m[5 * ms];
    const S p12 = m1 + m2, n12 = m1 - m2, p34 = m3 + m4, n34 = m3 - m4;
    constexpr float k4 = 1.0f / 4, k6 = float(1.0 / 6), k12 = float(1.0 / 12),
                    k24 = float(1.0 / 24);
    o[0] = k4 * m0 - k6 * p12 + k24 * p34;
    o[os] = k12 * n34 - k6 * n12;
    o[2 * os] = k6 * (p34 - p12) + m5;
  }
};

// ---------------------------------------------------------------------------------------------
// One call: the correlation above, its filter, and how its tiles are blocked.

// The filter f[grp][co][ci][th][tw] of the correlation, read in place from the weight tensor:
// w0[grp * sg + co * sco + ci * sci + (th * 3 + tw) * stap] (any layout and direction: the
// taps of a 3x3 filter are equally spaced in OIHW and HWIO, and bwd_data's flip is a negative
// stap from the last tap).
template <typename T>
struct Filter {
  const T* w0;
  int64_t sg, sco, sci, stap;
};

template <typename T>
struct Job {
  int64_t N, G, Cin, Cout, Hin, Win, U, V, pad_h, pad_w;
  int64_t TU, TV, Q;  // tiles along u, v; Q = N*TU*TV tiles in all
  Strides4 is, os;
  const T* in;
  int64_t in_size;  // elements of in (N * is.n): the row loads of transform_patch stay inside
  T* out;
  const T* bias;
  Filter<T> f;
  int64_t panels;  // ceil(Cout / NR)
};

constexpr int64_t NR = kPanelWidth<float>;
constexpr int64_t kKC = 256;  // K-slice per GEMM call (as conv_pack.h's kKC)

// Transposes 8 vectors in place (r[k][l] -> r[l][k]): the unpack / shuffle / lane-swap network
// of an 8 x 8 float transpose, written as GCC shuffles (vunpck*, vshufps, vperm2f128 on AVX).
__attribute__((always_inline)) inline void transpose8(V8 (&r)[8]) {
  typedef int32_t VI __attribute__((vector_size(32)));
  const VI lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const VI q0 = {0, 1, 8, 9, 4, 5, 12, 13}, q1 = {2, 3, 10, 11, 6, 7, 14, 15};
  const VI h0 = {0, 1, 2, 3, 8, 9, 10, 11}, h1 = {4, 5, 6, 7, 12, 13, 14, 15};
  V8 t[8], s[8];
  for (int k = 0; k < 8; k += 2) {
    t[k] = __builtin_shuffle(r[k], r[k + 1], lo);
    t[k + 1] = __builtin_shuffle(r[k], r[k + 1], hi);
  }
  // s[0..3]: rows 0-3 of columns (0,4), (1,5), (2,6), (3,7); s[4..7] rows 4-7 of the same.
  for (int b = 0; b < 8; b += 4) {
    s[b] = __builtin_shuffle(t[b], t[b + 2], q0);
    s[b + 1] = __builtin_shuffle(t[b], t[b + 2], q1);
    s[b + 2] = __builtin_shuffle(t[b + 1], t[b + 3], q0);
    s[b + 3] = __builtin_shuffle(t[b + 1], t[b + 3], q1);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = __builtin_shuffle(s[k], s[k + 4], h0);
    r[k + 4] = __builtin_shuffle(s[k], s[k + 4], h1);
  }
}

// The input patch of tile q (of group grp): the image's channel 0 of the group, the patch's
// top-left corner (ih0, iw0) in the input, and the rows/columns of the patch inside the input,
// [ilo, ihi) x [jlo, jhi) (the rest reads as zero).
template <typename T>
struct Patch {
  const T* base;
  int64_t ih0, iw0;
  int ilo, ihi, jlo, jhi;
};

template <typename T>
__attribute__((always_inline)) inline Patch<T> patch(const Job<T>& jb, int64_t grp, int64_t q,
                                                     int A) {
  const int64_t M = A - 2;
  const int64_t n = q / (jb.TU * jb.TV), tu = (q / jb.TV) % jb.TU, tv = q % jb.TV;
  Patch<T> p;
  p.base = jb.in + n * jb.is.n + grp * jb.Cin * jb.is.c;
  p.ih0 = tu * M - jb.pad_h;
  p.iw0 = tv * M - jb.pad_w;
  p.ilo = int(std::max<int64_t>(0, -p.ih0));
  p.ihi = int(std::min<int64_t>(A, jb.Hin - p.ih0));
  p.jlo = int(std::max<int64_t>(0, -p.iw0));
  p.jhi = int(std::min<int64_t>(A, jb.Win - p.iw0));
  return p;
}

// V = B^T d B of one patch, for channels [c0, c0 + lanes) of the group (zero past lanes).
template <typename T, int M>
__attribute__((always_inline)) inline void transform_patch(const Job<T>& jb, const Patch<T>& pt,
                                                           int64_t c0, int lanes,
                                                           V8 (&v)[M + 2][M + 2]) {
  using W = Wino<M>;
  constexpr int A = W::kA;
  V8 d[A][A], tmp[A][A];
  // NCHW (channels a plane apart, columns contiguous): per patch row, 8 columns of each of the
  // 8 channels as one load, transposed to 8 channel vectors per column (gathering 8 lanes a
  // plane apart is 8 scalar loads, stores and a stalled vector reload per cell). The 8 columns
  // start at the patch's first column inside the input; those past its last are dropped, so a
  // row may run into the next one, never past the end of the input (else: the gathers).
  const bool rows = jb.is.w == 1 && jb.is.c != 1;
  const int64_t col0 = pt.iw0 + pt.jlo;
  for (int i = 0; i < A; ++i) {
    if (rows && i >= pt.ilo && i < pt.ihi) {
      const int64_t at = pt.base - jb.in + c0 * jb.is.c + (pt.ih0 + i) * jb.is.h + col0;
      if (at + (lanes - 1) * jb.is.c + kLanes<float> <= jb.in_size) {
        V8 r[8];
        for (int ch = 0; ch < 8; ++ch)
          r[ch] = ch < lanes ? load_widen<T, float>(jb.in + at + ch * jb.is.c) : V8{};
        transpose8(r);
        for (int j = 0; j < A; ++j) d[i][j] = j >= pt.jlo && j < pt.jhi ? r[j - pt.jlo] : V8{};
        continue;
      }
    }
    for (int j = 0; j < A; ++j) {
      if (i < pt.ilo || i >= pt.ihi || j < pt.jlo || j >= pt.jhi) {
        d[i][j] = V8{};
      } else {
        d[i][j] =
            load_lanes(pt.base + c0 * jb.is.c + (pt.ih0 + i) * jb.is.h + (pt.iw0 + j) * jb.is.w,
                       jb.is.c, lanes);
      }
    }
  }
#pragma GCC unroll 6
  for (int j = 0; j < A; ++j) W::input(&d[0][j], A, &tmp[0][j], A);
#pragma GCC unroll 6
  for (int i = 0; i < A; ++i) W::input(&tmp[i][0], 1, &v[i][0], 1);
}

// Input transform of tiles [q0, q0 + nt) of group grp, 8 channels at a time, into
// V[e][row0 + t][ci] (e planes `plane` rows apart: the GEMMs' A operands). P (bf16 pairs, see
// gemm_stage): V's elements are bfloat16 (uint16_t bits, rounded once here), rows 2*KP apart
// with a zero at Cin when Cin is odd; else float32, rows Cin apart.
template <typename T, int M, bool P>
__attribute__((always_inline)) inline void input_stage(const Job<T>& jb, int64_t grp, int64_t q0,
                                                       int64_t nt, float* Vbuf, int64_t plane,
                                                       int64_t row0) {
  using W = Wino<M>;
  using E = std::conditional_t<P, uint16_t, float>;
  constexpr int A = W::kA, A2 = A * A;
  const int64_t Cin = jb.Cin, ld = P ? (Cin + 1) / 2 * 2 : Cin;
  E* const Vb = reinterpret_cast<E*>(Vbuf);
  for (int64_t t = 0; t < nt; ++t) {
    const Patch<T> pt = patch(jb, grp, q0 + t, A);
    for (int64_t c0 = 0; c0 < Cin; c0 += kLanes<float>) {
      const int lanes = int(std::min<int64_t>(kLanes<float>, Cin - c0));
      V8 v[A][A];
      transform_patch<T, M>(jb, pt, c0, lanes, v);
      // Lanes past Cin hold zeros (zero inputs through a linear transform): with P they write
      // the pad of an odd Cin.
      const int64_t out_lanes = std::min<int64_t>(kLanes<float>, ld - c0);
      E* dst = Vb + (row0 + t) * ld + c0;
      // (Whole vectors as fixed-size copies: a copy of a variable length compiled to a byte
      // loop through the stack, the hottest code of a 64-channel layer under perf.)
      for (int e = 0; e < A2; ++e) {
        if constexpr (P) {
          const VU16 h = narrow_bf16(v[e / A][e % A]);
          if (out_lanes == kLanes<float>)
            std::memcpy(dst + e * plane * ld, &h, sizeof(h));
          else
            std::memcpy(dst + e * plane * ld, &h, out_lanes * sizeof(E));
        } else if (out_lanes == kLanes<float>) {
          std::memcpy(dst + e * plane * ld, &v[e / A][e % A], sizeof(V8));
        } else {
          std::memcpy(dst + e * plane * ld, &v[e / A][e % A], out_lanes * sizeof(E));
        }
      }
    }
  }
}

// Output transform of tiles [q0, q0 + nt) from M[e][row0 + t][co] (e planes `plane` rows
// apart), plus bias, 8 output channels at a time; cells past the output's edge are dropped.
template <typename T, int M>
__attribute__((always_inline)) inline void output_stage(const Job<T>& jb, int64_t grp, int64_t q0,
                                                        int64_t nt, const float* Mb, int64_t plane,
                                                        int64_t row0) {
  using W = Wino<M>;
  constexpr int A = W::kA, A2 = A * A;
  const int64_t Cout = jb.Cout;
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t q = q0 + t, n = q / (jb.TU * jb.TV), tu = (q / jb.TV) % jb.TU, tv = q % jb.TV;
    const int64_t u0 = tu * M, v0 = tv * M;
    const int iu = int(std::min<int64_t>(M, jb.U - u0)), iv = int(std::min<int64_t>(M, jb.V - v0));
    T* base = jb.out + n * jb.os.n + grp * Cout * jb.os.c + u0 * jb.os.h + v0 * jb.os.w;
    for (int64_t c0 = 0; c0 < Cout; c0 += kLanes<float>) {
      const int lanes = int(std::min<int64_t>(kLanes<float>, Cout - c0));
      V8 m[A][A], tmp[M][A], y[M][M];
      const float* src = Mb + (row0 + t) * Cout + c0;
      for (int e = 0; e < A2; ++e) {
        if (lanes == kLanes<float>) {  // whole vectors: a fixed-size copy (see input_stage)
          std::memcpy(&m[e / A][e % A], src + e * plane * Cout, sizeof(V8));
        } else {
          float lane_vals[kLanes<float>] = {};
          std::memcpy(lane_vals, src + e * plane * Cout, lanes * sizeof(float));
          std::memcpy(&m[e / A][e % A], lane_vals, sizeof(V8));
        }
      }
#pragma GCC unroll 6
      for (int j = 0; j < A; ++j) W::output(&m[0][j], A, &tmp[0][j], A);
#pragma GCC unroll 4
      for (int i = 0; i < M; ++i) W::output(&tmp[i][0], 1, &y[i][0], 1);
      V8 b = jb.bias ? load_lanes(jb.bias + grp * Cout + c0, 1, lanes) : V8{};
      T* dst = base + c0 * jb.os.c;
      for (int i = 0; i < iu; ++i)
        for (int j = 0; j < iv; ++j)
          store_lanes(dst + i * jb.os.h + j * jb.os.w, jb.os.c, lanes, y[i][j] + b);
    }
  }
}

// f[grp][co][ci][tap] for ci in [c0, c1) and co in [o0, o0 + ncol), widened to float, as
// rows L[ci - c0][tap][0, ldl) (co - o0 along the row, zeros from ncol to ldl). The three loops
// (co, ci, tap) are nested by stride, the smallest innermost, so the weights are read in order
// whatever the layout: co in HWIO forward, ci in HWIO bwd_data, the taps in OIHW.
template <typename T>
void gather_filter(const Filter<T>& f, int64_t grp, int64_t c0, int64_t c1, int64_t o0,
                   int64_t ncol, float* L, int64_t ldl) {
  const T* w = f.w0 + grp * f.sg + o0 * f.sco + c0 * f.sci;
  struct Dim {
    int64_t n, ws, ls;  // extent, stride in w, stride in L
  } d[3] = {{ncol, f.sco, 1}, {c1 - c0, f.sci, 9 * ldl}, {9, f.stap, ldl}};
  auto wider = [](const Dim& a, const Dim& b) { return std::abs(a.ws) > std::abs(b.ws); };
  if (wider(d[1], d[0])) std::swap(d[0], d[1]);  // d[0] the widest stride, d[2] the narrowest
  if (wider(d[2], d[1])) std::swap(d[1], d[2]);
  if (wider(d[1], d[0])) std::swap(d[0], d[1]);
  for (int64_t a = 0; a < d[0].n; ++a)
    for (int64_t b = 0; b < d[1].n; ++b) {
      const T* src = w + a * d[0].ws + b * d[1].ws;
      float* dst = L + a * d[0].ls + b * d[1].ls;
      if constexpr (std::is_same_v<T, float>) {
        if (d[2].ws == 1 && d[2].ls == 1) {  // HWIO forward: whole rows
          std::memcpy(dst, src, d[2].n * sizeof(float));
          continue;
        }
      }
      for (int64_t c = 0; c < d[2].n; ++c) dst[c * d[2].ls] = float(Num<T>::load(src[c * d[2].ws]));
    }
  if (ncol < ldl)
    for (int64_t r = 0; r < (c1 - c0) * 9; ++r)
      std::memset(L + r * ldl + ncol, 0, (ldl - ncol) * sizeof(float));
}

// U[e] = (G f G^T)[i][j] for e = (i, j): sum over the taps (a, b) of G[i][a] G[j][b] f[a][b],
// with each coefficient formed in double and rounded once (kCoef), zero ones skipped.
template <int M>
struct FilterCoef {
  float c[(M + 2) * (M + 2)][9];
};
template <int M>
constexpr FilterCoef<M> filter_coef() {
  constexpr int A = M + 2;
  FilterCoef<M> r{};
  for (int e = 0; e < A * A; ++e)
    for (int k = 0; k < 9; ++k)
      r.c[e][k] = float(Wino<M>::kG[e / A][k / 3] * Wino<M>::kG[e % A][k % 3]);
  return r;
}
template <int M>
constexpr FilterCoef<M> kCoef = filter_coef<M>();

// The filter transform of every e at once, for rows ci in [0, n) of L (gather_filter's
// [ci][tap][ldl], np panels of NR columns used): U[e] as B panels at Ue + e * e_stride, panel p
// p_stride further, row ci at ci * NR. Each 8-column vector of the 9 taps is loaded once for
// all a^2 outputs (one U[e] per pass would read the taps a^2 times).
template <int M>
void filter_all(const float* L, int64_t ldl, int64_t n, int64_t np, float* Ue, int64_t e_stride,
                int64_t p_stride) {
  constexpr int A2 = (M + 2) * (M + 2);
  for (int64_t ci = 0; ci < n; ++ci)
    for (int64_t h = 0; h < np * NR; h += kLanes<float>) {
      V8 f[9];
      for (int k = 0; k < 9; ++k) std::memcpy(&f[k], L + (ci * 9 + k) * ldl + h, sizeof(V8));
      float* dst = Ue + (h / NR) * p_stride + ci * NR + h % NR;
#pragma GCC unroll 36
      for (int e = 0; e < A2; ++e) {
        V8 u{};
#pragma GCC unroll 9
        for (int k = 0; k < 9; ++k)
          if (kCoef<M>.c[e][k] != 0.0f) u += kCoef<M>.c[e][k] * f[k];
        std::memcpy(dst + e * e_stride, &u, sizeof(V8));
      }
    }
}

// M[e] (rows x Cout) = V[e] (rows x Cin) * U[e] (Cin x Cout), K sliced for the cache.
//
// P: the bfloat16 GEMM stage (F(2x2) on bfloat16 data where the CPU has vdpbf16ps). V[e] and
// U[e] are rounded to bfloat16 and multiplied on gemm_bf16_pairs (kernel_table.h) with float32
// accumulation: V[e] rows of KP = ceil(Cin/2) pairs (the input transform writes them), U[e]
// panels of KP x NR pairs (pair_filter). The two roundings (relative 2^-9 each) are the only
// change from the float32 stage; the output transform stays float32. F(4x4) keeps float32 for
// bfloat16 data (its G, B and A constants amplify those roundings ~8x; see choose_tile).
constexpr int64_t kKP = kKC / 2;  // K-slice in pairs: the float32 slice's bytes of B
template <bool P>
inline void gemm_stage(int64_t rows, int64_t Cin, int64_t Cout, const float* Ve, const float* Up,
                       float* Me) {
  if constexpr (P) {
    const int64_t KP = (Cin + 1) / 2;
    const auto* Vq = reinterpret_cast<const uint32_t*>(Ve);
    const auto* Uq = reinterpret_cast<const uint32_t*>(Up);
    const auto gemm = kernels().gemm_bf16_pairs;
    for (int64_t k0 = 0; k0 < KP; k0 += kKP) {
      const int64_t kc = std::min(kKP, KP - k0);
      gemm(rows, Cout, kc, Vq + k0, KP, Uq + k0 * NR, KP * NR, Me, Cout, k0 > 0);
    }
  } else {
    for (int64_t k0 = 0; k0 < Cin; k0 += kKC) {
      const int64_t kc = std::min(kKC, Cin - k0);
      gemm_packed(rows, Cout, kc, Ve + k0, Cin, Up + k0 * NR, Cin * NR, Me, Cout, k0 > 0);
    }
  }
}

// U[e]'s float32 panels ([panel][ci][NR], filter_all) -> bf16 pair panels
// [panel][j][NR] (pair row j: for each column c the pair (U[2j][c], U[2j+1][c]), low half
// first; zero past Cin), as gemm_bf16_pairs reads B.
inline void pair_filter(const float* Uf, int64_t Cin, int64_t panels, float* Uout) {
  const int64_t KP = (Cin + 1) / 2;
  auto* out = reinterpret_cast<uint32_t*>(Uout);
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t j = 0; j < KP; ++j) {
      const float* lo = Uf + (p * Cin + 2 * j) * NR;
      for (int64_t h = 0; h < NR; h += kLanes<float>) {
        V8 a, b{};
        std::memcpy(&a, lo + h, sizeof(V8));
        if (2 * j + 1 < Cin) std::memcpy(&b, lo + NR + h, sizeof(V8));
        const VU32 pair = bf16_bits(a) | (bf16_bits(b) << 16);
        std::memcpy(out + (p * KP + j) * NR + h, &pair, sizeof(pair));
      }
    }
}

// Floats of scratch for one e's V (rows x Cin) and U (Cin x panels*NR), float32 or pairs.
template <bool P>
constexpr int64_t v_row_slots(int64_t Cin) {
  return P ? (Cin + 1) / 2 : Cin;
}

// Blocked schedule, one task = one block of tiles through all three stages, with V and M in
// per-thread scratch (V[e][tile][ci], M[e][tile][co]) and the transformed filter of all e
// (`filt`, [grp][e][panels][ci][NR]) shared.
template <typename T, int M, bool P>
__attribute__((always_inline)) inline void block_body(const Job<T>& jb, const float* filt,
                                                      int64_t U_slots, int64_t grp, int64_t q0,
                                                      int64_t nt) {
  constexpr int A2 = (M + 2) * (M + 2);
  const int64_t row = v_row_slots<P>(jb.Cin);
  float* Vb = scratch<0>(A2 * nt * row);
  float* Mb = scratch<1>(A2 * nt * jb.Cout);
  input_stage<T, M, P>(jb, grp, q0, nt, Vb, nt, 0);
  for (int e = 0; e < A2; ++e)
    gemm_stage<P>(nt, jb.Cin, jb.Cout, Vb + e * nt * row, filt + (grp * A2 + e) * U_slots,
                  Mb + e * nt * jb.Cout);
  output_stage<T, M>(jb, grp, q0, nt, Mb, nt, 0);
}

template <typename T>
bool all_finite(const ParallelRunner& pr, const T* p, int64_t count) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  std::vector<char> bad(chunks, 0);
  pr.run(chunks, [&](int64_t c) {
    const int64_t lo = c * kChunk, hi = std::min(count, lo + kChunk);
    if constexpr (std::is_same_v<T, float>) {
      // Exponent all ones: inf or NaN. Integer OR-reduction, so the loop vectorizes.
      uint32_t any = 0;
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

// Tile size for a correlation of this shape, or 0 for the direct algorithm.
//
// Auto: Winograd needs enough channels on both sides for its a^2 GEMMs to run near the
// micro-kernel's peak and for the transforms (O(Cin + Cout) per tile) to be small next to them
// (O(Cin * Cout) per tile), and enough tiles to amortize the filter transform and the reading
// of U (a^2 * Cin * Cout per call). F(4x4) does 1.78x fewer multiplications than F(2x2) but
// has 36/16 as much filter and wastes more of its last tile row/column on planes that are not
// a multiple of 4. Thresholds from side-by-side timings (see tests/test_winograd.py).
//
// F(4x4) is taken from 14x14 planes up (waste (16/14)^2 = 1.306) once there are a quarter as
// many 4x4 tiles as channels: ResNet-50's 3x3 256-channel layer at 14x14, batch 4 (64 tiles),
// ran forward in 0.28-0.57x and forward+backward in 0.75-0.82x the direct time in two
// interleaved runs (min of 9, 2-core Zen 4 at load 200-365), F(2x2) between the two; 128
// channels at 28x28 (196 tiles) likewise preferred F(4x4) forward.
//
// Many channels on few tiles: F(4x4) also from 32 tiles of 4x4 whatever the channel count, on
// the panels schedule (run()), whose filter transform (about a^2 * Cin * Cout * 5.4
// multiply-adds) is small next to its GEMMs (a^2 * Q * Cin * Cout) from Q = 32 on. Same-run
// ratios to lax, forward / bwd_data, NCHW and NHWC (2-core Zen 4, load 5-7): ResNet-50's 512 @7
// at batch 8 (32 tiles) F(4x4) 1.85 / 1.83, 1.72 / 1.75 against direct's 1.42 / 0.99, 0.99 /
// 1.28; batch 16 F(4x4) 1.53 / 1.85, 2.55 / 1.79 against 1.21 / 0.85, 1.01 / 1.20; 256 @14 at
// batch 2 (32 tiles) F(4x4) 1.47 / 2.00, 1.44 / 2.45 against 1.07 / 1.26, 0.94 / 1.44; 512 @28
// at batch 1 (49 tiles) F(4x4) 2.19 / 1.78, 2.93 / 2.59 against 1.12 / 1.13, 1.06 / 1.27. Below 32
// tiles the winner depends on layout and direction, which this rule does not see, so it stays
// direct there: 512 @7 at batch 4 (16 tiles) forward NCHW direct 14.2 ms, F(2x2) 15.4, F(4x4)
// 14.6; batch 2 forward NCHW direct 9.7 ms against F(2x2)'s 15.5 but bwd_data NHWC 9.5 against
// 11.2 and F(4x4) 12.1; batch 1 forward NCHW direct 3.1 ms against 9.9 / 15.1 (bwd_data NCHW
// loses 11.2 to F(2x2)'s 5.5); 256 @14 at batch 1 (16 tiles) forward NCHW direct 2.8 ms, F(4x4)
// 3.0.
int choose_tile(ConvAlgo algo, ConvDirection dir, int64_t N, int64_t Cin, int64_t Cout, int64_t U,
                int64_t V, bool bf16_gemm) {
  if (algo == ConvAlgo::kDirect) return 0;
  if (algo == ConvAlgo::kWinograd2) return 2;
  if (algo == ConvAlgo::kWinograd4) return 4;
  auto tiles = [&](int64_t m) { return N * ((U + m - 1) / m) * ((V + m - 1) / m); };
  auto waste = [](int64_t n, int64_t m) { return double((n + m - 1) / m * m) / double(n); };
  const int64_t C = std::max(Cin, Cout);
  // bfloat16 with F(2x2) on vdpbf16ps: its GEMMs (4 products per output at twice the float32
  // rate) beat F(4x4)'s float32 ones (2.25 per output) once they dominate the transforms. Batch
  // 8, same run (2-core Zen 4, load ~200): forward 256 @14 took 3.6 / 4.6 ms (NHWC / NCHW)
  // against F(4x4)'s 4.8 / 5.7, 512 @7 6.2 / 9.3 against direct's 7.4 / 11.9; 128 @28 7.0 /
  // 10.7 against 6.5 / 8.7 and 64 @56 9.0 / 16.4 against 4.2 / 12.4 stay with F(4x4).
  if (dir == ConvDirection::kBackwardFilter) bf16_gemm = false;  // its GEMMs stay float32
  if (bf16_gemm && std::min(Cin, Cout) >= 192 && 4 * tiles(2) >= C) return 2;
  // bwd_filter's tiles are its GEMMs' K, not their rows: few tiles cost it only the per-call
  // load and store of each C tile, so F(4x4) needs no tile count there. Batch 8, bwd_filter
  // alone, same run (2-core Zen 4, load ~3.6), F(4x4) / F(2x2) / direct in ms, NCHW | NHWC:
  // 64 @56 16.0 / 21.1 / 20.9 | 14.9 / 19.5 / 23.8; 128 @28 8.4 / 15.6 / 19.9 | 9.1 / 15.8 /
  // 19.7; 256 @14 8.9 / 10.9 / 20.0 | 4.5 / 5.4 / 10.0; 512 @7 (4 tiles per image) 6.0 / 7.0 /
  // 13.7 | 14.4 / 17.7 / 26.9.
  const bool f4 = waste(U, 4) * waste(V, 4) <= 1.31 &&
                  (dir == ConvDirection::kBackwardFilter || 4 * tiles(4) >= C || tiles(4) >= 32);
  const int tile = f4 ? 4 : 2;
  if (algo == ConvAlgo::kWinograd) return tile;
  if (std::min(Cin, Cout) < 32 || (!f4 && tiles(2) < C)) return 0;
  return tile;
}

// The transformed filter of every group and e for the blocked and whole schedules, float32
// ([grp][e][panels][Cin][NR], e planes U_size floats apart): tasks over blocks of 16 input
// channels, each gathering its rows of the weights once (gather_filter) and transforming them
// for all e (filter_all). Returns Uf.
template <typename T, int M>
float* transform_filter(const ParallelRunner& pr, const Job<T>& jb) {
  constexpr int A2 = (M + 2) * (M + 2);
  constexpr int64_t kCiBlock = 16;
  const int64_t Cin = jb.Cin, cols = jb.panels * NR, U_size = jb.panels * Cin * NR;
  const int64_t nb = (Cin + kCiBlock - 1) / kCiBlock;
  thread_local std::vector<float> uf;  // kept between calls: no page faults per call
  uf.resize(std::max<size_t>(uf.size(), jb.G * A2 * U_size));
  // (Thread-local buffers are reached through plain pointers inside the tasks: there, the
  // name would mean the worker thread's own instance.)
  float* const Uf = uf.data();
  pr.run(jb.G * nb, [&](int64_t task) {
    const int64_t grp = task / nb, c0 = task % nb * kCiBlock, n = std::min(kCiBlock, Cin - c0);
    float* L = scratch<4>(kCiBlock * 9 * cols);
    gather_filter(jb.f, grp, c0, c0 + n, 0, jb.Cout, L, cols);
    filter_all<M>(L, cols, n, jb.panels, Uf + grp * A2 * U_size + c0 * NR, U_size, Cin * NR);
  });
  return Uf;
}

// Panel schedule, per group: all tiles' V (vq: Q rows per e), then one task per pair of B
// panels (32 output channels) that, K-slice by K-slice, gathers and transforms its columns of the
// filter for all e into per-thread scratch and runs every e's GEMM over all tiles against it,
// then all tiles' output. U never leaves L2 and each weight is read once, at the price of
// reading V once per panel pair (from L3: V is small when there are few tiles). For many
// channels on few tiles, where U (a^2 * Cin * Cout) dwarfs V and M (a^2 * Q * (Cin + Cout)).
template <typename T, int M, bool P>
void run_panels(const ParallelRunner& pr, const Job<T>& jb, float* Vb, float* Mb) {
  constexpr int A2 = (M + 2) * (M + 2);
  // K-slice: the slice's U for all e (A2 * KS * 32 floats, 256 or 288 KiB) and its gathered
  // taps stay in L2 next to the task's M columns.
  // (32, 64, 128 and 256 measured alike for 512 @7, batch 8, F(4x4).)
  constexpr int64_t KS = A2 == 16 ? 128 : 64;
  const int64_t Cin = jb.Cin, Cout = jb.Cout, Q = jb.Q, row = v_row_slots<P>(Cin);
  const int64_t blk = 48, blocks = (Q + blk - 1) / blk, pairs = (jb.panels + 1) / 2;
  for (int64_t grp = 0; grp < jb.G; ++grp) {
    pr.run(blocks, [&](int64_t b) {
      const int64_t q0 = b * blk, nt = std::min(Q, q0 + blk) - q0;
      input_stage<T, M, P>(jb, grp, q0, nt, Vb, Q, q0);
    });
    pr.run(pairs, [&](int64_t pp) {
      const int64_t o0 = pp * 2 * NR, ncol = std::min(2 * NR, Cout - o0);
      const int64_t np = (ncol + NR - 1) / NR;
      float* L = scratch<4>(KS * 9 * 2 * NR);
      float* Us = scratch<5>(A2 * 2 * KS * NR);
      for (int64_t k0 = 0; k0 < Cin; k0 += KS) {
        const int64_t kc = std::min(KS, Cin - k0);
        gather_filter(jb.f, grp, k0, k0 + kc, o0, ncol, L, 2 * NR);
        filter_all<M>(L, 2 * NR, kc, np, Us, np * kc * NR, kc * NR);
        for (int e = 0; e < A2; ++e) {
          float* Me = Mb + e * Q * Cout + o0;
          const float* Ue = Us + e * np * kc * NR;
          if constexpr (P) {
            const int64_t kp = (kc + 1) / 2;  // k0 is even: the slice starts on a pair
            auto* Uq = reinterpret_cast<uint32_t*>(scratch<6>(np * kp * NR));
            pair_filter(Ue, kc, np, reinterpret_cast<float*>(Uq));
            const auto* Vq = reinterpret_cast<const uint32_t*>(Vb + e * Q * row) + k0 / 2;
            kernels().gemm_bf16_pairs(Q, ncol, kp, Vq, row, Uq, kp * NR, Me, Cout, k0 > 0);
          } else {
            gemm_packed(Q, ncol, kc, Vb + e * Q * row + k0, row, Ue, kc * NR, Me, Cout, k0 > 0);
          }
        }
      }
    });
    pr.run(blocks, [&](int64_t b) {
      const int64_t q0 = b * blk, nt = std::min(Q, q0 + blk) - q0;
      output_stage<T, M>(jb, grp, q0, nt, Mb, Q, q0);
    });
  }
}

template <typename T, int M, bool P>
void run(const ParallelRunner& pr, const Job<T>& jb) {
  constexpr int A2 = (M + 2) * (M + 2);
  const int64_t Cin = jb.Cin, Cout = jb.Cout, U_size = jb.panels * Cin * NR;
  // Floats per e of the GEMM's V rows and U (pairs take half, rounded up to whole pairs).
  const int64_t row = v_row_slots<P>(Cin), U_slots = jb.panels * v_row_slots<P>(Cin) * NR;
  // Tiles per block: V and M scratch (a^2 * tiles * (Cin + Cout) floats) within ~1.5 MB, a
  // multiple of the micro-kernel's 6 rows, 12 to 96.
  const int64_t per_tile = A2 * (row + Cout) * int64_t(sizeof(float));
  int64_t tblk = std::max<int64_t>(12, std::min<int64_t>(96, (3 << 19) / per_tile / 6 * 6));
  // Panels when U (a^2 * Cin * Cout floats) is over twice V and M together (a^2 * Q * (Cin +
  // Cout)): 3x3 512 -> 512 @7, batch 8, F(4x4) (U 8x V + M) ran 1.6-2.1x faster than blocked
  // or whole, forward and bwd_data, both layouts, same runs (2-core Zen 4, load ~6); 256 @14
  // (U = V + M) and 128 @28 forward ran 1.2-1.9x slower than whole, which re-reads less of V.
  if (Cin * Cout > 2 * jb.Q * (Cin + Cout)) {
    thread_local std::vector<float> vm;
    vm.resize(std::max<size_t>(vm.size(), A2 * jb.Q * (row + Cout)));
    float* const Vb = vm.data();
    run_panels<T, M, P>(pr, jb, Vb, Vb + A2 * jb.Q * row);
    return;
  }
  // The blocked schedule reads all of U once per block; the whole schedule writes and reads V
  // and M for all tiles once. Take the one that moves fewer bytes (U re-read per block vs.
  // 2 (V + M)), i.e. blocked when Cin*Cout <= 2 * tblk * (Cin + Cout), or when U fits in L2.
  const bool blocked =
      Cin * Cout <= 2 * tblk * (Cin + Cout) || A2 * U_size * int64_t(sizeof(float)) <= (512 << 10);
  float* const Uf = transform_filter<T, M>(pr, jb);
  // U of (grp, e) for the GEMMs: Uf's float32 panels, or (P) their bf16 pairs.
  float* filt = Uf;
  if constexpr (P) {
    thread_local std::vector<float> pairs;
    pairs.resize(std::max<size_t>(pairs.size(), jb.G * A2 * U_slots));
    float* const pp = pairs.data();
    pr.run(jb.G * A2, [&](int64_t task) {
      pair_filter(Uf + task * U_size, Cin, jb.panels, pp + task * U_slots);
    });
    filt = pp;
  }
  if (blocked) {
    while (tblk > 12 && jb.G * ((jb.Q + tblk - 1) / tblk) < 2 * pr.num_threads()) tblk -= 6;
    const int64_t blocks = (jb.Q + tblk - 1) / tblk;
    pr.run(jb.G * blocks, [&](int64_t task) {
      const int64_t grp = task / blocks, b = task % blocks;
      const int64_t q0 = b * tblk, nt = std::min(jb.Q, q0 + tblk) - q0;
      block_body<T, M, P>(jb, filt, U_slots, grp, q0, nt);
    });
    return;
  }
  // Whole schedule, per group: all tiles' V, then one task per e (its GEMM over all tiles),
  // then all tiles' output.
  thread_local std::vector<float> vm;
  vm.resize(std::max<size_t>(vm.size(), A2 * jb.Q * (row + Cout)));
  float* Vb = vm.data();
  float* Mb = Vb + A2 * jb.Q * row;
  const int64_t blk = 48, blocks = (jb.Q + blk - 1) / blk;
  for (int64_t grp = 0; grp < jb.G; ++grp) {
    pr.run(blocks, [&](int64_t b) {
      const int64_t q0 = b * blk, nt = std::min(jb.Q, q0 + blk) - q0;
      input_stage<T, M, P>(jb, grp, q0, nt, Vb, jb.Q, q0);
    });
    pr.run(A2, [&](int64_t e) {
      gemm_stage<P>(jb.Q, Cin, Cout, Vb + e * jb.Q * row, filt + (grp * A2 + e) * U_slots,
                    Mb + e * jb.Q * Cout);
    });
    pr.run(blocks, [&](int64_t b) {
      const int64_t q0 = b * blk, nt = std::min(jb.Q, q0 + blk) - q0;
      output_stage<T, M>(jb, grp, q0, nt, Mb, jb.Q, q0);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// bwd_filter: the adjoint of the forward's per-tile algorithm.
//
// A tile's output Y = A^T [U ⊙ V] A with U = G f G^T is linear in the filter f, so the
// gradient of <dY, Y> with respect to f is, per tile,
//
//   df = G^T [ (A dY A^T) ⊙ V ] G        (V = B^T d B: the forward's input transform)
//
// with dY the tile's m x m cells of dy (zero past the output plane's edge: the forward drops
// those cells) and d its a x a input patch (zero outside x), exactly as the forward reads them.
// Summed over all tiles t of all images, per frequency e (a^2 of them):
//
//   Mw[e][o][c] = sum over t of Z[e][o][t] * V[e][t][c]    (Z = A dY A^T: a GEMM with K = tiles)
//   dw[o][c]    = G^T Mw[.][o][c] G                         (a x a -> 3 x 3, per (o, c))
//
// So the multiplications are a^2 GEMMs (Cout x tiles) * (tiles x Cin) of the packed
// micro-kernel, A = Z[e] rows [o][t] (the dy transform writes them tile-contiguous: 8 tiles are
// the 8 lanes of its vectors) and B = V[e] in panels [c / NR][t][NR] (the input transform writes
// 8 channels of one tile at a time, as the forward's). Both transforms run for all tiles of a
// group first ("whole" schedule); then each task owns a block of Mw (ob rows x cb columns, for
// all e: within kMwBlockBytes, so it stays in L2), runs its a^2 GEMMs over all tiles (K sliced by
// kKC, accumulated in slice order) and applies G^T . G to its block straight into dw. Where
// Mw has too few blocks for the threads and there are many tiles, the tiles are cut into S
// equal ranges by shape alone (never by thread count), each range's Mw summed into its own
// buffer; a last pass adds the S buffers in range order and transforms. Every element's sum
// order is thus a function of the shape only: results do not depend on the thread count.
constexpr int64_t kMwBlockBytes = 640 << 10;
constexpr int64_t kTilesPerSplit = 384;
constexpr int64_t kMaxSplits = 4;

// Z = A dY A^T of tiles [q0, q0 + nt) of group grp (q0 a multiple of 8), 8 tiles by 8 output
// channels at a time, into Z[e][o][q] (rows of Qp >= Q tiles, e planes Cout rows apart; the
// tiles of a last group of 8 past Q written as zeros). NHWC loads 8 channels of a cell and
// transposes 8 tiles' worth in registers; NCHW gathers 8 tiles' cells of one channel.
template <typename T, int M>
void dy_stage(const Job<T>& jb, const T* dy, const Strides4& ys, int64_t dy_size, int64_t grp,
              int64_t q0, int64_t nt, float* Z, int64_t Qp) {
  using W = Wino<M>;
  constexpr int A = W::kA, A2 = A * A, L = kLanes<float>;
  typedef int32_t VI __attribute__((vector_size(32)));
  const int64_t Cout = jb.Cout;
  for (int64_t t0 = 0; t0 < nt; t0 += L) {
    // Per lane (tile): its (0, 0) cell of channel 0 of the group, and the rows/columns of its
    // m x m cells inside the output plane (0 for lanes past nt).
    const T* base[L];
    int iu[L], iv[L];
    for (int k = 0; k < L; ++k) {
      base[k] = dy;
      iu[k] = iv[k] = 0;
      if (t0 + k >= nt) continue;
      const int64_t q = q0 + t0 + k, n = q / (jb.TU * jb.TV), tu = (q / jb.TV) % jb.TU,
                    tv = q % jb.TV;
      base[k] = dy + n * ys.n + grp * Cout * ys.c + tu * M * ys.h + tv * M * ys.w;
      iu[k] = int(std::min<int64_t>(M, jb.U - tu * M));
      iv[k] = int(std::min<int64_t>(M, jb.V - tv * M));
    }
    // NCHW's lane masks: all ones where tile k has cell (i, j) inside the plane.
    VI mask[M][M];
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < M; ++j)
        for (int k = 0; k < L; ++k) mask[i][j][k] = i < iu[k] && j < iv[k] ? -1 : 0;
    for (int64_t c0 = 0; c0 < Cout; c0 += L) {
      const int lanes = int(std::min<int64_t>(L, Cout - c0));
      V8 y[L][M][M];  // [channel][i][j], the lanes are the 8 tiles
      if (ys.c == 1) {
        for (int i = 0; i < M; ++i)
          for (int j = 0; j < M; ++j) {
            V8 r[L];
            for (int k = 0; k < L; ++k)
              r[k] = i < iu[k] && j < iv[k]
                         ? load_lanes(base[k] + c0 + i * ys.h + j * ys.w, 1, lanes)
                         : V8{};
            transpose8(r);
            for (int ch = 0; ch < L; ++ch) y[ch][i][j] = r[ch];
          }
      } else {
        // Rows: per (channel, row i), 8 columns of each tile's row as one load, transposed to
        // one vector of 8 tiles per column j; cells outside a tile's part of the plane masked
        // to zero (what they read is other finite dy, as long as the loads stay inside dy;
        // else the cells are gathered one by one).
        for (int ch = 0; ch < lanes; ++ch)
          for (int i = 0; i < M; ++i) {
            const int64_t off = (c0 + ch) * ys.c + i * ys.h;
            bool inside = true;
            for (int k = 0; k < L; ++k) inside &= (base[k] - dy) + off + L <= dy_size;
            if (inside) {
              V8 r[L];
              for (int k = 0; k < L; ++k) r[k] = load_widen<T, float>(base[k] + off);
              transpose8(r);
              for (int j = 0; j < M; ++j) y[ch][i][j] = (V8)((VI)r[j] & mask[i][j]);
              continue;
            }
            for (int j = 0; j < M; ++j) {
              float cell[L];
              for (int k = 0; k < L; ++k)
                cell[k] = i < iu[k] && j < iv[k] ? Num<T>::load(base[k][off + j * ys.w]) : 0.0f;
              std::memcpy(&y[ch][i][j], cell, sizeof(V8));
            }
          }
      }
      for (int ch = 0; ch < lanes; ++ch) {
        V8 tmp[A][M], z[A][A];
#pragma GCC unroll 4
        for (int j = 0; j < M; ++j) W::grad_output(&y[ch][0][j], M, &tmp[0][j], M);
#pragma GCC unroll 6
        for (int i = 0; i < A; ++i) W::grad_output(&tmp[i][0], 1, &z[i][0], 1);
        float* dst = Z + (c0 + ch) * Qp + q0 + t0;
        for (int e = 0; e < A2; ++e) std::memcpy(dst + e * Cout * Qp, &z[e / A][e % A], sizeof(V8));
      }
    }
  }
}

// V = B^T d B of tiles [q0, q0 + nt) of group grp into B panels: V[e] is cpanels panels of
// Q x NR (V[e][c / NR][q][c % NR]), zero past Cin.
template <typename T, int M>
void input_panels(const Job<T>& jb, int64_t grp, int64_t q0, int64_t nt, float* Vp,
                  int64_t cpanels) {
  constexpr int A = M + 2, A2 = A * A, L = kLanes<float>;
  const int64_t Cin = jb.Cin, Q = jb.Q, e_stride = cpanels * Q * NR;
  for (int64_t t = 0; t < nt; ++t) {
    const Patch<T> pt = patch(jb, grp, q0 + t, A);
    for (int64_t c0 = 0; c0 < Cin; c0 += L) {
      const int lanes = int(std::min<int64_t>(L, Cin - c0));
      V8 v[A][A];
      transform_patch<T, M>(jb, pt, c0, lanes, v);
      float* dst = Vp + (c0 / NR) * Q * NR + (q0 + t) * NR + c0 % NR;
      // The second half of a last panel that Cin does not reach: zeros.
      const bool pad_half = c0 % NR == 0 && c0 + L >= Cin;
      for (int e = 0; e < A2; ++e) {
        std::memcpy(dst + e * e_stride, &v[e / A][e % A], sizeof(V8));
        if (pad_half) std::memset(dst + e * e_stride + L, 0, sizeof(V8));
      }
    }
  }
}

// dw[o][c] = G^T Mw[.][o][c] G for rows [0, on) and columns [0, cn) of an Mw block (rows ld
// apart, e planes e_stride apart), each Mw value the sum of S buffers s_stride apart (added in
// buffer order); dw points at the block's (o, c) = (0, 0), strides ws.
template <typename T, int M>
void filter_out(const float* Mw, int64_t e_stride, int64_t S, int64_t s_stride, int64_t ld,
                int64_t on, int64_t cn, T* dw, const Strides4& ws) {
  using W = Wino<M>;
  constexpr int A = W::kA, A2 = A * A, L = kLanes<float>;
  for (int64_t o = 0; o < on; ++o)
    for (int64_t c = 0; c < cn; c += L) {
      const int lanes = int(std::min<int64_t>(L, cn - c));
      V8 m[A][A], tmp[3][A], f[3][3];
      for (int e = 0; e < A2; ++e) {
        const float* src = Mw + e * e_stride + o * ld + c;  // rows hold whole vectors (ld % 8 == 0)
        V8 acc = load(src);
        for (int64_t s = 1; s < S; ++s) acc += load(src + s * s_stride);
        m[e / A][e % A] = acc;
      }
#pragma GCC unroll 6
      for (int j = 0; j < A; ++j) W::grad_filter(&m[0][j], A, &tmp[0][j], A);
#pragma GCC unroll 3
      for (int i = 0; i < 3; ++i) W::grad_filter(&tmp[i][0], 1, &f[i][0], 1);
      T* dst = dw + o * ws.n + c * ws.c;
      for (int kh = 0; kh < 3; ++kh)
        for (int kw = 0; kw < 3; ++kw)
          store_lanes(dst + kh * ws.h + kw * ws.w, ws.c, lanes, f[kh][kw]);
    }
}

template <typename T, int M>
void run_filter(const ParallelRunner& pr, const Job<T>& jb, const T* dy, const Strides4& ys, T* dw,
                const Strides4& ws) {
  constexpr int A2 = (M + 2) * (M + 2);
  const int64_t Cin = jb.Cin, Cout = jb.Cout, Q = jb.Q, Qp = (Q + 7) / 8 * 8;
  const int64_t cpanels = (Cin + NR - 1) / NR, Cinp = cpanels * NR;
  // Blocks of Mw: ob rows (a multiple of 8) x cb columns (of whole panels), halving the larger
  // side until a block's a^2 planes fit kMwBlockBytes.
  int64_t ob = (Cout + 7) / 8 * 8, cb = Cinp;
  while (A2 * ob * cb * int64_t(sizeof(float)) > kMwBlockBytes) {
    if (cb >= ob && cb > NR)
      cb = (cb / 2 + NR - 1) / NR * NR;
    else if (ob > 8)
      ob = (ob / 2 + 7) / 8 * 8;
    else
      break;
  }
  const int64_t oblocks = (Cout + ob - 1) / ob, cblocks = (Cinp + cb - 1) / cb;
  // Tile ranges (shape only: see above): under 4 blocks of Mw, up to 4 ranges of at least
  // kTilesPerSplit tiles.
  const int64_t S = jb.G * oblocks * cblocks >= 4
                        ? 1
                        : std::max<int64_t>(1, std::min(kMaxSplits, Q / kTilesPerSplit));
  thread_local std::vector<float> buf;
  const int64_t v_size = A2 * cpanels * Q * NR, z_size = A2 * Cout * Qp,
                p_size = S > 1 ? S * A2 * Cout * Cinp : 0;
  buf.resize(std::max<size_t>(buf.size(), v_size + z_size + p_size));
  float* const Vp = buf.data();
  float* const Z = Vp + v_size;
  float* const Pw = Z + z_size;
  const int64_t blk = 48, blocks = (Q + blk - 1) / blk;  // a multiple of 8 (dy_stage)
  for (int64_t grp = 0; grp < jb.G; ++grp) {
    T* const dw_grp = dw + grp * Cout * ws.n;
    pr.run(2 * blocks, [&](int64_t task) {
      const int64_t b = task / 2, q0 = b * blk, nt = std::min(Q, q0 + blk) - q0;
      if (task % 2 == 0)
        input_panels<T, M>(jb, grp, q0, nt, Vp, cpanels);
      else
        dy_stage<T, M>(jb, dy, ys, jb.N * ys.n, grp, q0, nt, Z, Qp);
    });
    pr.run(S * oblocks * cblocks, [&](int64_t task) {
      const int64_t s = task / (oblocks * cblocks), ob_i = (task / cblocks) % oblocks,
                    cb_i = task % cblocks;
      const int64_t o0 = ob_i * ob, on = std::min(Cout, o0 + ob) - o0;
      const int64_t c0 = cb_i * cb, cn = std::min(Cin, c0 + cb) - c0;
      const int64_t k0 = Q * s / S, k1 = Q * (s + 1) / S;
      // S == 1: this task's block in per-thread scratch ([e][ob][cb]); else its place in
      // range s's buffer ([s][e][Cout][Cinp]).
      float* const Mw =
          S == 1 ? scratch<4>(A2 * ob * cb) : Pw + s * A2 * Cout * Cinp + o0 * Cinp + c0;
      const int64_t e_stride = S == 1 ? ob * cb : Cout * Cinp, ld = S == 1 ? cb : Cinp;
      for (int e = 0; e < A2; ++e) {
        const float* Ze = Z + (e * Cout + o0) * Qp;
        const float* Ve = Vp + (e * cpanels + c0 / NR) * Q * NR;
        for (int64_t k = k0; k < k1; k += kKC) {
          const int64_t kc = std::min(kKC, k1 - k);
          gemm_packed(on, cn, kc, Ze + k, Qp, Ve + k * NR, Q * NR, Mw + e * e_stride, ld, k > k0);
        }
      }
      if (S == 1)
        filter_out<T, M>(Mw, e_stride, 1, 0, ld, on, cn, dw_grp + o0 * ws.n + c0 * ws.c, ws);
    });
    if (S > 1) {
      constexpr int64_t kRows = 8;
      pr.run((Cout + kRows - 1) / kRows, [&](int64_t b) {
        const int64_t o0 = b * kRows, on = std::min(Cout, o0 + kRows) - o0;
        filter_out<T, M>(Pw + o0 * Cinp, Cout * Cinp, S, A2 * Cout * Cinp, Cinp, on, Cin,
                         dw_grp + o0 * ws.n, ws);
      });
    }
  }
}

// The tiles of one correlation of `in` (N x G*Cin x Hin x Win in `layout`) onto a U x V plane
// of G*Cout channels, m x m tiles (m = tile) whose patches start at (tu*m - pad_h, tv*m - pad_w):
// the part of a Job that the forward-style passes (correlate) and bwd_filter share.
template <typename T>
Job<T> tiled_job(int64_t layout, int tile, int64_t N, int64_t G, int64_t Cin, int64_t Cout,
                 int64_t Hin, int64_t Win, int64_t U, int64_t V, int64_t pad_h, int64_t pad_w,
                 const T* in) {
  Job<T> jb{};
  jb.N = N;
  jb.G = G;
  jb.Cin = Cin;
  jb.Cout = Cout;
  jb.Hin = Hin;
  jb.Win = Win;
  jb.U = U;
  jb.V = V;
  jb.pad_h = pad_h;
  jb.pad_w = pad_w;
  jb.TU = (U + tile - 1) / tile;
  jb.TV = (V + tile - 1) / tile;
  jb.Q = N * jb.TU * jb.TV;
  jb.is = activation_strides(layout, G * Cin, Hin, Win);
  jb.os = activation_strides(layout, G * Cout, U, V);
  jb.in = in;
  jb.in_size = N * jb.is.n;
  return jb;
}

// Shared by both kernels: the correlation (see the file comment) with filter f.
template <typename T>
bool correlate(const ParallelRunner& pr, int64_t N, int64_t G, int64_t Cin, int64_t Cout,
               int64_t Hin, int64_t Win, int64_t U, int64_t V, int64_t pad_h, int64_t pad_w,
               int64_t layout, int tile, const T* in, const T* w, int64_t w_count,
               const Filter<T>& f, const T* bias, T* out) {
  if constexpr (std::is_same_v<T, double>) {
    return false;  // float64 stays on the direct algorithm (Winograd would lose precision)
  } else {
    if ((tile != 2 && tile != 4) || N * U * V == 0 || Cin == 0) return false;
    const Strides4 is = activation_strides(layout, G * Cin, Hin, Win);
    if (!all_finite(pr, w, w_count) || !all_finite(pr, in, N * is.n)) return false;
    Job<T> jb = tiled_job(layout, tile, N, G, Cin, Cout, Hin, Win, U, V, pad_h, pad_w, in);
    jb.out = out;
    jb.bias = bias;
    jb.f = f;
    jb.panels = (Cout + NR - 1) / NR;
    if (tile == 4) {
      run<T, 4, false>(pr, jb);
    } else if constexpr (std::is_same_v<T, bf16_t>) {
      if (kernels().gemm_bf16_pairs)
        run<T, 2, true>(pr, jb);
      else
        run<T, 2, false>(pr, jb);
    } else {
      run<T, 2, false>(pr, jb);
    }
    return true;
  }
}

bool applicable(const ConvGeometry& g) { return winograd_applicable(g); }

template <typename T>
bool winograd_forward(const ParallelRunner& pr, const ConvGeometry& g, int tile, const T* x,
                      const T* w, const T* bias, T* y) {
  if (!applicable(g)) return false;
  const Strides4 ws = g.w_strides();
  const int64_t Og = g.out_per_group();
  // f[grp][co][ci][tap] = w[grp * Og + co][ci][tap] (taps ws.w apart: ws.h = 3 * ws.w).
  const Filter<T> f{w, Og * ws.n, ws.n, ws.c, ws.w};
  return correlate<T>(pr, g.N, g.groups(), g.in_per_group(), Og, g.H, g.W, g.OH, g.OW, g.p.pad_top,
                      g.p.pad_left, g.p.layout, tile, x, w, g.O * g.in_per_group() * 9, f, bias, y);
}

template <typename T>
bool winograd_backward_data(const ParallelRunner& pr, const ConvGeometry& g, int tile, const T* dy,
                            const T* w, const T* bias, T* dx) {
  if (!applicable(g)) return false;
  const Strides4 ws = g.w_strides();
  const int64_t Og = g.out_per_group();
  // Correlation input channel ci = conv output channel o; output channel co = conv input c;
  // tap (th, tw) = w's (2 - th, 2 - tw), i.e. tap 8 - k: from w's last tap backwards.
  const Filter<T> f{w + 8 * ws.w, Og * ws.n, ws.c, ws.n, -ws.w};
  return correlate<T>(pr, g.N, g.groups(), Og, g.in_per_group(), g.OH, g.OW, g.H, g.W,
                      2 - g.p.pad_top, 2 - g.p.pad_left, g.p.layout, tile, dy, w,
                      g.O * g.in_per_group() * 9, f, bias, dx);
}

// dw of the forward's correlation (see run_filter), in float32 for every storage type but
// float64 (which declines, as correlate does).
template <typename T>
bool winograd_backward_filter(const ParallelRunner& pr, const ConvGeometry& g, int tile, const T* x,
                              const T* dy, T* dw) {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    if (!applicable(g) || (tile != 2 && tile != 4) || g.N * g.OH * g.OW == 0) return false;
    const Strides4 xs = activation_strides(g.p.layout, g.C, g.H, g.W);
    const Strides4 ys = activation_strides(g.p.layout, g.O, g.OH, g.OW);
    if (!all_finite(pr, x, g.N * xs.n) || !all_finite(pr, dy, g.N * ys.n)) return false;
    const Job<T> jb =
        tiled_job(g.p.layout, tile, g.N, g.groups(), g.in_per_group(), g.out_per_group(), g.H, g.W,
                  g.OH, g.OW, g.p.pad_top, g.p.pad_left, x);
    if (tile == 4)
      run_filter<T, 4>(pr, jb, dy, ys, dw, g.w_strides());
    else
      run_filter<T, 2>(pr, jb, dy, ys, dw, g.w_strides());
    return true;
  }
}

}  // namespace

// forward / backward_data / backward_filter for every storage type (float64 always declines:
// see correlate), and the tile rule the one algorithm choice (conv_algo.cc) asks.
void add_winograd_kernels(KernelTable* t) {
  t->winograd_tile = choose_tile;
  t->winograd_f32 = {winograd_forward<float>, winograd_backward_data<float>,
                     winograd_backward_filter<float>};
  t->winograd_f64 = {winograd_forward<double>, winograd_backward_data<double>,
                     winograd_backward_filter<double>};
  t->winograd_f16 = {winograd_forward<f16_t>, winograd_backward_data<f16_t>,
                     winograd_backward_filter<f16_t>};
  t->winograd_bf16 = {winograd_forward<bf16_t>, winograd_backward_data<bf16_t>,
                      winograd_backward_filter<bf16_t>};
}

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY
