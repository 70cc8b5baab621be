// FFT convolution on CUDA: depthwise, stride 1 (any dilation), forward, bwd_data (so stride-1
// depthwise conv_transpose2d) and bwd_filter (fft_depthwise_filter_kernel, below), NCHW and NHWC,
// float32 (float16 / bfloat16 loaded and computed in float32). The plan (transform P x Q, output
// tile TH x TW) and the choice are in fft_conv_choice.h; the correlation each direction computes is
// in ../fft_plan.h.
//
// Forward / bwd_data: one kernel, one block of 256 threads per (tile, image, channel) item,
// grid-stride, everything in the block's static shared memory (no workspace, no second kernel):
//
//   1. load: buf[rev(r), rev(s)] = patch[r][s] + i * f[r][s] for r < P, s < Q, where
//      patch[r][s] = in[u0 + r - pad_h, v0 + s - pad_w] (zero outside the plane and beyond the
//      rows/columns the tile reads, r >= TH + KEh - 1) and f the dilated filter (bwd_data:
//      flipped), rev the bit reversal over log2 P (log2 Q) bits. Each thread notes whether it
//      loaded inf or NaN; __syncthreads_or makes that the block's verdict.
//   2. 2-d FFT Z = F(patch + i f): radix-2 decimation in time, in place, bit-reversed in,
//      natural out; rows (log2 Q stages) then columns (log2 P), a __syncthreads per stage;
//      twiddles exp(-2 pi i j / max(P, Q)) from a shared table.
//   3. pointwise, at k and -k together (one thread per pair): the two real spectra
//      X = (Z[k] + conj Z[-k]) / 2 and F = (Z[k] - conj Z[-k]) / 2i, the correlation's
//      C = X conj(F) (C[-k] = conj C[k]); store conj(C) / PQ at k and C / PQ at -k.
//   4. 2-d FFT of conj(C) / PQ by decimation in frequency (natural in, bit-reversed out): its
//      real part is the inverse transform of C, i.e. the circular correlation, exact on the
//      tile's cells by overlap-save.
//   5. store out[u0 + u, v0 + v] = Re buf[rev(u), rev(v)] (+ bias), u < TH, v < TW, in bounds.
//
// Non-finite operands: one inf or NaN would spread NaN over the whole transform. A block whose
// patch or filter holds one (the block-wide verdict of step 1, uniform, so the branch is too)
// skips 2-4 and computes its tile directly from the patch already in shared memory, tap by tap,
// skipping taps that fall outside the plane exactly as the direct kernels do. So the result is
// non-finite exactly where the direct convolution's is, and the decision costs no host sync.
//
// Deterministic: every sum has a fixed order (the butterflies, the tap loop), no atomics.
// Shared memory per block: P*Q float2 (<= 32 KiB at 64 x 64) + max(P, Q)/2 float2 twiddles.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "fft_conv_choice.h"
#include "kernel_common.cuh"

namespace jaxconv::cuda {

inline constexpr int kFftThreads = 256;

struct FftConvParams {
  int64_t items;              // C * N * tiles_h * tiles_w
  int32_t C, tiles_w, tiles;  // tiles = tiles_h * tiles_w
  int32_t inH, inW;           // the data plane (x forward, dy bwd_data)
  int32_t outH, outW;         // the tiled output plane (y, dx)
  Strides4 in_s, out_s;       // element strides (n, c, h, w) of in and out
  int64_t w_c, w_h, w_w;      // weight strides per channel, row tap, column tap
  int32_t KH, KW, dh, dw;     // taps and dilation
  int32_t pad_h, pad_w;       // in[u + a - pad]
  int32_t flip;               // bwd_data: tap (kh, kw) sits at ((KH-1-kh)*dh, (KW-1-kw)*dw)
  int32_t logP, logQ, logN;   // transform sides, N = max(P, Q) (the twiddle table's period)
  int32_t TH, TW;             // output tile
  int32_t RH, RW;             // patch rows/columns the tile reads: TH + KEh - 1, TW + KEw - 1
};

__device__ __forceinline__ int fft_bit_reverse(int x, int bits) {
#if defined(JAXCONV_CUDA_EMULATION)
  int r = 0;
  for (int i = 0; i < bits; ++i) r |= ((x >> i) & 1) << (bits - 1 - i);
  return r;
#else
  return int(__brev(unsigned(x)) >> (32 - bits));
#endif
}

__device__ __forceinline__ bool fft_finite(float v) {
#if defined(JAXCONV_CUDA_EMULATION)
  return std::isfinite(v);
#else
  return isfinite(v);
#endif
}

// exp(-2 pi i j / n), rounded from double.
__device__ __forceinline__ float2 fft_unit_root(int j, int n) {
  double s, c;
#if defined(JAXCONV_CUDA_EMULATION)
  const double a = -2.0 * 3.14159265358979323846 * double(j) / double(n);
  s = std::sin(a);
  c = std::cos(a);
#else
  sincospi(-2.0 * double(j) / double(n), &s, &c);
#endif
  return make_float2(float(c), float(s));
}

__device__ __forceinline__ float2 cmul(float2 a, float2 b) {
  return make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}

// One radix-2 stage of half-span m = 2^logm over every row (axis 1, length 2^logQ) or every
// column (axis 0, length 2^logP) of the P x Q array; DIT multiplies the twiddle in before the
// butterfly, DIF after. Butterfly t (of PQ/2): its line and its index j in the line.
template <bool kDit, bool kRows>
__device__ __forceinline__ void fft_stage(float2* buf, const float2* twiddle, int logP, int logQ,
                                          int logN, int logm) {
  const int m = 1 << logm;
  const int half = 1 << (logP + logQ - 1);
  for (int t = threadIdx.x; t < half; t += kFftThreads) {
    int i0, step;
    int j;
    if (kRows) {  // t = row * Q/2 + j
      j = t & ((1 << (logQ - 1)) - 1);
      const int row = t >> (logQ - 1);
      i0 = (row << logQ) + ((j >> logm) << (logm + 1)) + (j & (m - 1));
      step = m;
    } else {  // t = j * Q + col
      j = t >> logQ;
      const int col = t & ((1 << logQ) - 1);
      i0 = ((((j >> logm) << (logm + 1)) + (j & (m - 1))) << logQ) + col;
      step = m << logQ;
    }
    const float2 w = twiddle[(j & (m - 1)) << (logN - logm - 1)];
    const float2 a = buf[i0];
    const float2 b = buf[i0 + step];
    if (kDit) {
      const float2 bw = cmul(b, w);
      buf[i0] = make_float2(a.x + bw.x, a.y + bw.y);
      buf[i0 + step] = make_float2(a.x - bw.x, a.y - bw.y);
    } else {
      buf[i0] = make_float2(a.x + b.x, a.y + b.y);
      buf[i0 + step] = cmul(make_float2(a.x - b.x, a.y - b.y), w);
    }
  }
  __syncthreads();
}

// Bit-reversed in, natural out.
__device__ __forceinline__ void fft2d_dit(float2* buf, const float2* twiddle, int logP, int logQ,
                                          int logN) {
  for (int s = 0; s < logQ; ++s) fft_stage<true, true>(buf, twiddle, logP, logQ, logN, s);
  for (int s = 0; s < logP; ++s) fft_stage<true, false>(buf, twiddle, logP, logQ, logN, s);
}

// Natural in, bit-reversed out.
__device__ __forceinline__ void fft2d_dif(float2* buf, const float2* twiddle, int logP, int logQ,
                                          int logN) {
  for (int s = logQ - 1; s >= 0; --s) fft_stage<false, true>(buf, twiddle, logP, logQ, logN, s);
  for (int s = logP - 1; s >= 0; --s) fft_stage<false, false>(buf, twiddle, logP, logQ, logN, s);
}

// Step 3: buf holds Z = F(a + i b) of two real planes a, b; leaves conj(C) / PQ with
// C = A conj(B), the spectrum of the circular correlation of a with b, so that a forward
// transform (fft2d_dif) of it has that correlation as its real part. A and B separate as
// (Z[k] + conj Z[-k]) / 2 and (Z[k] - conj Z[-k]) / 2i; one thread per pair (k, -k), since
// C[-k] = conj C[k]; the two halves and 1/PQ in one scale.
__device__ __forceinline__ void fft_correlation_spectrum(float2* buf, int logP, int logQ) {
  const int P = 1 << logP, Q = 1 << logQ, PQ = P * Q;
  const float scale = 0.25f / float(PQ);
  for (int idx = threadIdx.x; idx < PQ; idx += kFftThreads) {
    const int k1 = idx >> logQ, k2 = idx & (Q - 1);
    const int nidx = (((P - k1) & (P - 1)) << logQ) + ((Q - k2) & (Q - 1));
    if (nidx < idx) continue;  // the pair's other thread
    const float2 z = buf[idx], zn = buf[nidx];
    const float xr = z.x + zn.x, xi = z.y - zn.y;  // 2 A
    const float fr = z.y + zn.y, fi = zn.x - z.x;  // 2 B
    const float cr = (xr * fr + xi * fi) * scale, ci = (xi * fr - xr * fi) * scale;
    buf[nidx] = make_float2(cr, ci);
    buf[idx] = make_float2(cr, -ci);
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kFftThreads)
    fft_depthwise_kernel(FftConvParams p, const T* in, const T* w, const T* bias, T* out) {
  __shared__ float2 buf[kCudaFftMaxSide * kCudaFftMaxSide];
  __shared__ float2 twiddle[kCudaFftMaxSide / 2];
  const int tid = threadIdx.x;
  const int P = 1 << p.logP, Q = 1 << p.logQ, PQ = P * Q;
  for (int j = tid; j < (1 << p.logN) / 2; j += kFftThreads)
    twiddle[j] = fft_unit_root(j, 1 << p.logN);
  // (the first __syncthreads_or below orders these writes before any read)

  for (int64_t item = blockIdx.x; item < p.items; item += gridDim.x) {
    // item = (n * tiles + tile) * C + c: the channel fastest, so that the NHWC blocks running
    // side by side read neighbouring channels of the same pixels (the same 32-byte sectors).
    const int c = int(item % p.C);
    const int64_t rest = item / p.C;
    const int tile = int(rest % p.tiles);
    const int64_t n = rest / p.tiles;
    const int u0 = (tile / p.tiles_w) * p.TH, v0 = (tile % p.tiles_w) * p.TW;
    const T* in_nc = in + n * p.in_s.n + c * p.in_s.c;
    const T* w_c = w + c * p.w_c;

    // 1. patch (real part) and dilated filter (imaginary part), bit-reversed positions.
    int bad = 0;
    for (int idx = tid; idx < PQ; idx += kFftThreads) {
      const int r = idx >> p.logQ, s = idx & (Q - 1);
      float re = 0.f, im = 0.f;
      const int ih = u0 + r - p.pad_h, iw = v0 + s - p.pad_w;
      if (r < p.RH && s < p.RW && ih >= 0 && ih < p.inH && iw >= 0 && iw < p.inW)
        re = Num<T>::load(in_nc[ih * p.in_s.h + iw * p.in_s.w]);
      if (r % p.dh == 0 && s % p.dw == 0 && r / p.dh < p.KH && s / p.dw < p.KW) {
        const int kh = p.flip ? p.KH - 1 - r / p.dh : r / p.dh;
        const int kw = p.flip ? p.KW - 1 - s / p.dw : s / p.dw;
        im = Num<T>::load(w_c[kh * p.w_h + kw * p.w_w]);
      }
      bad |= !(fft_finite(re) && fft_finite(im));
      buf[(fft_bit_reverse(r, p.logP) << p.logQ) + fft_bit_reverse(s, p.logQ)] =
          make_float2(re, im);
    }
    const float b = bias != nullptr ? Num<T>::load(bias[c]) : 0.f;
    T* out_nc = out + n * p.out_s.n + c * p.out_s.c;

    if (!__syncthreads_or(bad)) {
      fft2d_dit(buf, twiddle, p.logP, p.logQ, p.logN);  // 2.
      fft_correlation_spectrum(buf, p.logP, p.logQ);    // 3.
      fft2d_dif(buf, twiddle, p.logP, p.logQ, p.logN);  // 4.
      // 5.
      for (int idx = tid; idx < p.TH * p.TW; idx += kFftThreads) {
        const int u = idx / p.TW, v = idx - u * p.TW;
        if (u0 + u >= p.outH || v0 + v >= p.outW) continue;
        const float y = buf[(fft_bit_reverse(u, p.logP) << p.logQ) + fft_bit_reverse(v, p.logQ)].x;
        out_nc[(u0 + u) * p.out_s.h + (v0 + v) * p.out_s.w] = Num<T>::store(y + b);
      }
    } else {
      // Non-finite operand: the tile directly, taps in (kh, kw) order, from the shared patch.
      for (int idx = tid; idx < p.TH * p.TW; idx += kFftThreads) {
        const int u = idx / p.TW, v = idx - u * p.TW;
        if (u0 + u >= p.outH || v0 + v >= p.outW) continue;
        float acc = 0.f;
        for (int i = 0; i < p.KH; ++i) {
          const int r = u + i * p.dh, ih = u0 + r - p.pad_h;
          if (ih < 0 || ih >= p.inH) continue;
          const int kh = p.flip ? p.KH - 1 - i : i;
          for (int j = 0; j < p.KW; ++j) {
            const int s = v + j * p.dw, iw = v0 + s - p.pad_w;
            if (iw < 0 || iw >= p.inW) continue;
            const int kw = p.flip ? p.KW - 1 - j : j;
            acc += buf[(fft_bit_reverse(r, p.logP) << p.logQ) + fft_bit_reverse(s, p.logQ)].x *
                   Num<T>::load(w_c[kh * p.w_h + kw * p.w_w]);
          }
        }
        out_nc[(u0 + u) * p.out_s.h + (v0 + v) * p.out_s.w] = Num<T>::store(acc + b);
      }
    }
    __syncthreads();  // buf is rewritten by the next item
  }
}

// bwd_filter: dw[c, kh, kw] = sum over n and the dy positions (u, v) of
// x[n, c, u + kh*dh - pad_h, v + kw*dw - pad_w] * dy[n, c, u, v], the correlation of the x patch
// with the dy tile read at the taps (a, b) = (kh*dh, kw*dw). One block per (tile, channel) item
// (channel fastest) loops over the images in order: load buf = patch + i * dy tile (dy at
// [u][v], u < TH, v < TW, inside OH x OW), steps 2-4 as above, and each thread adds the taps it
// owns (t = tid + 256 i) into partial[item][t] (the same thread every image, so a fixed order
// without atomics; image 0 writes). A block whose loads hold inf or NaN sums its taps directly
// from shared memory instead, over the positions the direct kernel visits (dy inside the plane,
// x inside the plane). fft_filter_sum_kernel then adds the tiles of each (channel, tap) in tile
// order and rounds to T.
template <typename T>
__global__ void __launch_bounds__(kFftThreads)
    fft_depthwise_filter_kernel(FftConvParams p, int32_t images, const T* x, const T* dy,
                                float* partial) {
  __shared__ float2 buf[kCudaFftMaxSide * kCudaFftMaxSide];
  __shared__ float2 twiddle[kCudaFftMaxSide / 2];
  const int tid = threadIdx.x;
  const int Q = 1 << p.logQ, PQ = (1 << p.logP) * Q;
  const int taps = p.KH * p.KW;
  for (int j = tid; j < (1 << p.logN) / 2; j += kFftThreads)
    twiddle[j] = fft_unit_root(j, 1 << p.logN);

  for (int64_t item = blockIdx.x; item < p.items; item += gridDim.x) {  // items = tiles * C
    const int c = int(item % p.C);
    const int tile = int(item / p.C);
    const int u0 = (tile / p.tiles_w) * p.TH, v0 = (tile % p.tiles_w) * p.TW;
    float* part = partial + item * taps;
    for (int n = 0; n < images; ++n) {
      const T* x_nc = x + n * p.in_s.n + c * p.in_s.c;
      const T* dy_nc = dy + n * p.out_s.n + c * p.out_s.c;
      int bad = 0;
      for (int idx = tid; idx < PQ; idx += kFftThreads) {
        const int r = idx >> p.logQ, s = idx & (Q - 1);
        float re = 0.f, im = 0.f;
        const int ih = u0 + r - p.pad_h, iw = v0 + s - p.pad_w;
        if (r < p.RH && s < p.RW && ih >= 0 && ih < p.inH && iw >= 0 && iw < p.inW)
          re = Num<T>::load(x_nc[ih * p.in_s.h + iw * p.in_s.w]);
        if (r < p.TH && s < p.TW && u0 + r < p.outH && v0 + s < p.outW)
          im = Num<T>::load(dy_nc[(u0 + r) * p.out_s.h + (v0 + s) * p.out_s.w]);
        bad |= !(fft_finite(re) && fft_finite(im));
        buf[(fft_bit_reverse(r, p.logP) << p.logQ) + fft_bit_reverse(s, p.logQ)] =
            make_float2(re, im);
      }
      if (!__syncthreads_or(bad)) {
        fft2d_dit(buf, twiddle, p.logP, p.logQ, p.logN);
        fft_correlation_spectrum(buf, p.logP, p.logQ);
        fft2d_dif(buf, twiddle, p.logP, p.logQ, p.logN);
        for (int t = tid; t < taps; t += kFftThreads) {
          const int kh = t / p.KW, kw = t - kh * p.KW;
          const float v = buf[(fft_bit_reverse(kh * p.dh, p.logP) << p.logQ) +
                              fft_bit_reverse(kw * p.dw, p.logQ)]
                              .x;
          part[t] = n == 0 ? v : part[t] + v;
        }
      } else {
        for (int t = tid; t < taps; t += kFftThreads) {
          const int kh = t / p.KW, kw = t - kh * p.KW;
          float acc = 0.f;
          for (int u = 0; u < p.TH && u0 + u < p.outH; ++u) {
            const int r = u + kh * p.dh, ih = u0 + r - p.pad_h;
            if (ih < 0 || ih >= p.inH) continue;
            for (int v = 0; v < p.TW && v0 + v < p.outW; ++v) {
              const int s = v + kw * p.dw, iw = v0 + s - p.pad_w;
              if (iw < 0 || iw >= p.inW) continue;
              acc += buf[(fft_bit_reverse(r, p.logP) << p.logQ) + fft_bit_reverse(s, p.logQ)].x *
                     buf[(fft_bit_reverse(u, p.logP) << p.logQ) + fft_bit_reverse(v, p.logQ)].y;
            }
          }
          part[t] = n == 0 ? acc : part[t] + acc;
        }
      }
      __syncthreads();  // buf is rewritten by the next image
    }
  }
}

// dw[c, kh, kw] = sum over tiles, in tile order, of partial[tile * C + c][kh * KW + kw].
template <typename T>
__global__ void __launch_bounds__(kFftThreads)
    fft_filter_sum_kernel(FftConvParams p, const float* partial, T* dw) {
  const int taps = p.KH * p.KW;
  const int64_t total = int64_t(p.C) * taps;
  for (int64_t i = int64_t(blockIdx.x) * kFftThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kFftThreads) {
    const int c = int(i / taps), t = int(i % taps);
    float sum = 0.f;
    for (int tile = 0; tile < p.tiles; ++tile) sum += partial[(int64_t(tile) * p.C + c) * taps + t];
    const int kh = t / p.KW, kw = t - kh * p.KW;
    dw[c * p.w_c + kh * p.w_h + kw * p.w_w] = Num<T>::store(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

inline int fft_log2(int64_t n) {
  int l = 0;
  while ((int64_t(1) << l) < n) ++l;
  return l;
}

// The kernel's parameters for direction `which` (0 forward: in = x, out = y; 1 bwd_data:
// in = dy, out = dx; 2 bwd_filter: in = x, out = dy, the tiled plane) under plan `pl` (from
// cuda_fft_plan).
inline FftConvParams make_fft_conv_params(const ConvGeometry& g, int which, const FftPlan& pl) {
  FftConvParams p{};
  const bool fwd = which != 1;  // forward and bwd_filter read x and tile OH x OW
  const int64_t KEh = effective_kernel(g.KH, g.p.dilation_h);
  const int64_t KEw = effective_kernel(g.KW, g.p.dilation_w);
  p.C = int32_t(g.C);
  p.inH = int32_t(fwd ? g.H : g.OH);
  p.inW = int32_t(fwd ? g.W : g.OW);
  p.outH = int32_t(fwd ? g.OH : g.H);
  p.outW = int32_t(fwd ? g.OW : g.W);
  p.in_s = fwd ? g.x_strides() : g.y_strides();
  p.out_s = fwd ? g.y_strides() : g.x_strides();
  const Strides4 ws = g.w_strides();  // (o, i, kh, kw); depthwise: o = c, i = 0
  p.w_c = ws.n;
  p.w_h = ws.h;
  p.w_w = ws.w;
  p.KH = int32_t(g.KH);
  p.KW = int32_t(g.KW);
  p.dh = int32_t(g.p.dilation_h);
  p.dw = int32_t(g.p.dilation_w);
  // bwd_data: dx[h] = sum over a of dy[h + a - (KE - 1 - pad)] * w[flipped a].
  p.pad_h = int32_t(fwd ? g.p.pad_top : KEh - 1 - g.p.pad_top);
  p.pad_w = int32_t(fwd ? g.p.pad_left : KEw - 1 - g.p.pad_left);
  p.flip = which == 1 ? 1 : 0;
  p.logP = fft_log2(pl.P);
  p.logQ = fft_log2(pl.Q);
  p.logN = p.logP > p.logQ ? p.logP : p.logQ;
  p.TH = int32_t(pl.TH);
  p.TW = int32_t(pl.TW);
  p.RH = int32_t(pl.TH + KEh - 1);
  p.RW = int32_t(pl.TW + KEw - 1);
  p.tiles_w = int32_t(ceil_div(p.outW, pl.TW));
  p.tiles = int32_t(ceil_div(p.outH, pl.TH)) * p.tiles_w;
  p.items = int64_t(which == 2 ? 1 : g.N) * p.tiles * p.C;  // bwd_filter loops over images
  return p;
}

template <typename T>
cudaError_t fft_depthwise_conv(const ConvGeometry& g, int which, const FftPlan& pl, const T* a,
                               const T* b, const T* bias, T* out, float* workspace,
                               cudaStream_t stream) {
  if constexpr (std::is_same_v<T, double>) {
    return cudaErrorInvalidValue;  // float64 stays direct (cuda_fft_inapplicable)
  } else {
    if (!pl.valid() || pl.P > kCudaFftMaxSide || pl.Q > kCudaFftMaxSide || which < 0 || which > 2 ||
        (which == 2 && workspace == nullptr))
      return cudaErrorInvalidValue;
    const FftConvParams p = make_fft_conv_params(g, which, pl);
    if (p.items == 0) return cudaSuccess;
    if (which == 2) {  // a = x, b = dy, out = dw; workspace: cuda_fft_workspace_bytes
      const cudaError_t err = launch(fft_depthwise_filter_kernel<T>, dim3(grid_blocks(p.items)),
                                     dim3(kFftThreads), stream, p, int32_t(g.N), a, b, workspace);
      if (err != cudaSuccess) return err;
      return launch(fft_filter_sum_kernel<T>,
                    dim3(grid_blocks(ceil_div_pos(int64_t(p.C) * p.KH * p.KW, kFftThreads))),
                    dim3(kFftThreads), stream, p, static_cast<const float*>(workspace), out);
    }
    return launch(fft_depthwise_kernel<T>, dim3(grid_blocks(p.items)), dim3(kFftThreads), stream, p,
                  a, b, bias, out);
  }
}

}  // namespace jaxconv::cuda
