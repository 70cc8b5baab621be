// FFT convolution on CUDA for dense and grouped layers (every group with more than one input or
// output channel; depthwise stays in fft_conv.cuh): stride 1, any dilation, forward, bwd_data
// (so stride-1 conv_transpose2d) and bwd_filter (kernels 3f-5f below), NCHW and NHWC, float32
// (float16 / bfloat16 loaded and computed in float32). The plan, the workspace layout and the
// choice are in fft_conv_choice.h; the correlation each direction computes is in ../fft_plan.h; the
// 2-d transforms (fft2d_dit / fft2d_dif, one block of kFftThreads threads on a P x Q shared array)
// are fft_conv.cuh's.
//
// Overlap-save over tiles of the output plane, then per frequency a GEMM over channels:
//
//   0. reset   the workspace's non-finite flag.
//   1. data    one block per (data channel cd, row m = n * tiles + tile): the patch of the tile
//              (TH + KEh - 1 rows from u0 - pad_h, zero outside the plane) at bit-reversed
//              positions, fft2d_dit, the half spectrum (k2 <= Q/2; a real plane's other half is
//              its conjugate mirror) to X[f][m][cd].
//   2. filter  one block per (result channel cr, data channel of its group cl): the dilated
//              filter (bwd_data: flipped, and w[cd][cr_local] instead of w[cr][cl]), fft2d_dit,
//              Wf[f][cr][cl] = conj(F[f]) / PQ (correlation, and the inverse's scale).
//   3. gemm    per (f, group) Y[f][m][cr] = sum over cl of X[f][m][g*cdg + cl] * Wf[f][cr][cl],
//              a 32 x 32 x 16 tiled complex SIMT GEMM, float32, k in ascending order.
//   4. output  one block per (result channel cr, row m): the full spectrum from the half
//              (Y[-k] = conj Y[k]), conj(Y) forward transformed by fft2d_dif: its real part is
//              the inverse transform of Y (as in fft_conv.cuh step 4), the circular correlation,
//              exact on the tile's cells by overlap-save; store those (+ bias).
//   5. direct  with the flag set only (below): every output directly.
//
// Non-finite operands: one inf or NaN would spread NaN over the whole plane through the
// transforms and the channel sum. Kernels 1 and 2 note any inf or NaN they load in the flag
// (__syncthreads_or per block, one store by thread 0); kernel 4 returns at once when it is set,
// and kernel 5, which returns at once when it is clear, then computes every output directly
// from global memory (channels, then taps in (kh, kw) order, taps outside the plane skipped as
// the direct kernels do), so the output is non-finite exactly where the direct convolution's
// is. Per call, on the device: no host sync. (Two kernels, not a branch in one: the direct loop
// in the transform kernel made ptxas spill in its 16-bit instantiations.)
//
// Deterministic: fixed summation orders (butterflies, the GEMM's k loop, the direct taps), no
// atomics (the flag is only ever set to 1).
#pragma once

#include <cstdint>
#include <type_traits>

#include "fft_conv.cuh"

namespace jaxconv::cuda {

struct FftDenseParams {
  FftConvParams t;       // per-plane geometry (make_fft_conv_params); t.C, t.items unused
  int32_t data, result;  // channels of the transformed input / the output
  int32_t cdg, crg;      // per group
  int32_t M, F, Qh;      // rows (N * tiles), half-spectrum frequencies, Q/2 + 1
  int64_t w_o, w_i;      // weight strides of its logical (O, I) axes
  int32_t bwd;           // bwd_data: data channel = o, result channel = c
  float2* x;             // X[f][m][cd]
  float2* wf;            // Wf[f][cr][cl]
  float2* y;             // Y[f][m][cr]
  int* flag;             // set: some operand holds inf or NaN
};

// The weight's element for result channel cr and data channel cl of cr's group.
__device__ __forceinline__ int64_t fft_dense_weight_offset(const FftDenseParams& p, int cr,
                                                           int cl) {
  const int grp = cr / p.crg;
  if (p.bwd) return int64_t(grp * p.cdg + cl) * p.w_o + int64_t(cr - grp * p.crg) * p.w_i;
  return int64_t(cr) * p.w_o + int64_t(cl) * p.w_i;
}

// (Templates, like every kernel here, so that each unit including this header holds its own.)
template <typename T>
__global__ void fft_dense_reset_kernel(int* flag) {
  if (blockIdx.x == 0 && threadIdx.x == 0) *flag = 0;
}

__device__ __forceinline__ void fft_dense_twiddles(float2* twiddle, int logN) {
  for (int j = threadIdx.x; j < (1 << logN) / 2; j += kFftThreads)
    twiddle[j] = fft_unit_root(j, 1 << logN);
}

// 1: the tiles' half spectra. kDy (bwd_filter's second operand): the dy tile itself
// (dy[u0 + r][v0 + s], r < TH, s < TW, inside the dy plane) of every result channel, to Y.
template <typename T, bool kDy>
__global__ void __launch_bounds__(kFftThreads)
    fft_dense_data_kernel(FftDenseParams p, const T* in) {
  __shared__ float2 buf[kCudaFftMaxSide * kCudaFftMaxSide];
  __shared__ float2 twiddle[kCudaFftMaxSide / 2];
  const FftConvParams& t = p.t;
  const int Q = 1 << t.logQ, PQ = (1 << t.logP) * Q;
  const int channels = kDy ? p.result : p.data;
  const Strides4 st = kDy ? t.out_s : t.in_s;
  float2* dst = kDy ? p.y : p.x;
  fft_dense_twiddles(twiddle, t.logN);  // ordered before use by the __syncthreads_or below
  const int64_t items = int64_t(p.M) * channels;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    // item = m * channels + cd: channel fastest, so that neighbouring blocks store neighbouring
    // X[f][m][cd] (and read neighbouring NHWC channels).
    const int cd = int(item % channels);
    const int m = int(item / channels);
    const int tile = m % t.tiles, n = m / t.tiles;
    const int u0 = (tile / t.tiles_w) * t.TH, v0 = (tile % t.tiles_w) * t.TW;
    const T* in_nc = in + int64_t(n) * st.n + int64_t(cd) * st.c;
    int bad = 0;
    for (int idx = threadIdx.x; idx < PQ; idx += kFftThreads) {
      const int r = idx >> t.logQ, s = idx & (Q - 1);
      float re = 0.f;
      if (kDy) {
        if (r < t.TH && s < t.TW && u0 + r < t.outH && v0 + s < t.outW)
          re = Num<T>::load(in_nc[int64_t(u0 + r) * st.h + int64_t(v0 + s) * st.w]);
      } else {
        const int ih = u0 + r - t.pad_h, iw = v0 + s - t.pad_w;
        if (r < t.RH && s < t.RW && ih >= 0 && ih < t.inH && iw >= 0 && iw < t.inW)
          re = Num<T>::load(in_nc[int64_t(ih) * st.h + int64_t(iw) * st.w]);
      }
      bad |= !fft_finite(re);
      buf[(fft_bit_reverse(r, t.logP) << t.logQ) + fft_bit_reverse(s, t.logQ)] =
          make_float2(re, 0.f);
    }
    if (__syncthreads_or(bad) && threadIdx.x == 0) *p.flag = 1;
    fft2d_dit(buf, twiddle, t.logP, t.logQ, t.logN);
    for (int f = threadIdx.x; f < p.F; f += kFftThreads) {
      const int k1 = f / p.Qh, k2 = f - k1 * p.Qh;
      dst[(int64_t(f) * p.M + m) * channels + cd] = buf[(k1 << t.logQ) + k2];
    }
    __syncthreads();  // buf is rewritten by the next item
  }
}

// 2: the filters' spectra, conjugated and scaled by 1 / PQ.
template <typename T>
__global__ void __launch_bounds__(kFftThreads)
    fft_dense_filter_kernel(FftDenseParams p, const T* w) {
  __shared__ float2 buf[kCudaFftMaxSide * kCudaFftMaxSide];
  __shared__ float2 twiddle[kCudaFftMaxSide / 2];
  const FftConvParams& t = p.t;
  const int Q = 1 << t.logQ, PQ = (1 << t.logP) * Q;
  const float scale = 1.f / float(PQ);
  fft_dense_twiddles(twiddle, t.logN);
  const int64_t items = int64_t(p.result) * p.cdg;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int cl = int(item % p.cdg);
    const int cr = int(item / p.cdg);
    const T* w_rc = w + fft_dense_weight_offset(p, cr, cl);
    int bad = 0;
    for (int idx = threadIdx.x; idx < PQ; idx += kFftThreads) {
      const int r = idx >> t.logQ, s = idx & (Q - 1);
      float re = 0.f;
      if (r % t.dh == 0 && s % t.dw == 0 && r / t.dh < t.KH && s / t.dw < t.KW) {
        const int kh = t.flip ? t.KH - 1 - r / t.dh : r / t.dh;
        const int kw = t.flip ? t.KW - 1 - s / t.dw : s / t.dw;
        re = Num<T>::load(w_rc[kh * t.w_h + kw * t.w_w]);
      }
      bad |= !fft_finite(re);
      buf[(fft_bit_reverse(r, t.logP) << t.logQ) + fft_bit_reverse(s, t.logQ)] =
          make_float2(re, 0.f);
    }
    if (__syncthreads_or(bad) && threadIdx.x == 0) *p.flag = 1;
    fft2d_dit(buf, twiddle, t.logP, t.logQ, t.logN);
    for (int f = threadIdx.x; f < p.F; f += kFftThreads) {
      const int k1 = f / p.Qh, k2 = f - k1 * p.Qh;
      const float2 z = buf[(k1 << t.logQ) + k2];
      p.wf[(int64_t(f) * p.result + cr) * p.cdg + cl] = make_float2(z.x * scale, -z.y * scale);
    }
    __syncthreads();
  }
}

// 3: per (frequency, group, 32-row block, 32-column block) a 32 x 32 block of Y. Thread
// (ty, tx) = (tid / 16, tid % 16) owns rows ty, ty + 16 and columns tx, tx + 16; the k loop runs
// over chunks of 16 data channels staged in shared memory (k-major, padded by one against bank
// conflicts), zero past the matrix edges.
inline constexpr int kFftGemmTile = 32;
inline constexpr int kFftGemmK = 16;

template <typename T>
__global__ void __launch_bounds__(kFftThreads) fft_dense_gemm_kernel(FftDenseParams p) {
  __shared__ float2 As[kFftGemmK][kFftGemmTile + 1];
  __shared__ float2 Bs[kFftGemmK][kFftGemmTile + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int groups = p.result / p.crg;
  const int mt = (p.M + kFftGemmTile - 1) / kFftGemmTile;
  const int nt = (p.crg + kFftGemmTile - 1) / kFftGemmTile;
  const int64_t items = int64_t(p.F) * groups * mt * nt;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    // item = ((f * groups + grp) * mt + mb) * nt + nb
    const int nb = int(item % nt);
    int64_t rest = item / nt;
    const int mb = int(rest % mt);
    rest /= mt;
    const int grp = int(rest % groups);
    const int f = int(rest / groups);
    const int m0 = mb * kFftGemmTile, n0 = nb * kFftGemmTile;
    const float2* X = p.x + int64_t(f) * p.M * p.data + int64_t(grp) * p.cdg;
    const float2* B = p.wf + (int64_t(f) * p.result + int64_t(grp) * p.crg) * p.cdg;
    float2 acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) acc[i][j] = make_float2(0.f, 0.f);
    for (int k0 = 0; k0 < p.cdg; k0 += kFftGemmK) {
      for (int e = tid; e < kFftGemmTile * kFftGemmK; e += kFftThreads) {
        const int row = e / kFftGemmK, kk = e % kFftGemmK;
        const bool kin = k0 + kk < p.cdg;
        As[kk][row] =
            kin && m0 + row < p.M ? X[int64_t(m0 + row) * p.data + k0 + kk] : make_float2(0.f, 0.f);
        Bs[kk][row] = kin && n0 + row < p.crg ? B[int64_t(n0 + row) * p.cdg + k0 + kk]
                                              : make_float2(0.f, 0.f);
      }
      __syncthreads();
      for (int kk = 0; kk < kFftGemmK; ++kk) {
        const float2 a[2] = {As[kk][ty], As[kk][ty + 16]};
        const float2 b[2] = {Bs[kk][tx], Bs[kk][tx + 16]};
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            acc[i][j].x += a[i].x * b[j].x - a[i].y * b[j].y;
            acc[i][j].y += a[i].x * b[j].y + a[i].y * b[j].x;
          }
      }
      __syncthreads();  // the next chunk overwrites As, Bs
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int row = m0 + ty + 16 * i, col = n0 + tx + 16 * j;
        if (row < p.M && col < p.crg)
          p.y[(int64_t(f) * p.M + row) * p.result + int64_t(grp) * p.crg + col] = acc[i][j];
      }
  }
}

// 4: inverse transforms and the tiles' valid cells; nothing when the flag is set (kernel 5).
template <typename T>
__global__ void __launch_bounds__(kFftThreads)
    fft_dense_output_kernel(FftDenseParams p, const T* bias, T* out) {
  __shared__ float2 buf[kCudaFftMaxSide * kCudaFftMaxSide];
  __shared__ float2 twiddle[kCudaFftMaxSide / 2];
  if (*p.flag != 0) return;  // written by kernels 1 and 2, earlier on the stream; uniform
  const FftConvParams& t = p.t;
  const int P = 1 << t.logP, Q = 1 << t.logQ, PQ = P * Q;
  fft_dense_twiddles(twiddle, t.logN);  // ordered before use by the first __syncthreads below
  const int64_t items = int64_t(p.M) * p.result;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int cr = int(item % p.result);
    const int m = int(item / p.result);
    const int tile = m % t.tiles, n = m / t.tiles;
    const int u0 = (tile / t.tiles_w) * t.TH, v0 = (tile % t.tiles_w) * t.TW;
    for (int idx = threadIdx.x; idx < PQ; idx += kFftThreads) {
      const int k1 = idx >> t.logQ, k2 = idx & (Q - 1);
      float2 z;
      if (k2 < p.Qh) {
        z = p.y[(int64_t(k1 * p.Qh + k2) * p.M + m) * p.result + cr];
        z.y = -z.y;  // conj(Y[k])
      } else {       // conj(Y[k]) = Y[-k], which lies in the stored half
        z = p.y[(int64_t(((P - k1) & (P - 1)) * p.Qh + (Q - k2)) * p.M + m) * p.result + cr];
      }
      buf[idx] = z;
    }
    __syncthreads();
    fft2d_dif(buf, twiddle, t.logP, t.logQ, t.logN);
    const float b = bias != nullptr ? Num<T>::load(bias[cr]) : 0.f;
    T* out_nc = out + int64_t(n) * t.out_s.n + int64_t(cr) * t.out_s.c;
    for (int idx = threadIdx.x; idx < t.TH * t.TW; idx += kFftThreads) {
      const int u = idx / t.TW, v = idx - u * t.TW;
      if (u0 + u >= t.outH || v0 + v >= t.outW) continue;
      const float y = buf[(fft_bit_reverse(u, t.logP) << t.logQ) + fft_bit_reverse(v, t.logQ)].x;
      out_nc[int64_t(u0 + u) * t.out_s.h + int64_t(v0 + v) * t.out_s.w] = Num<T>::store(y + b);
    }
    __syncthreads();  // buf is rewritten by the next item
  }
}

// 5: with the flag set (some operand is not finite), every output directly: one thread per
// output element, data channels of its group in order, then taps in (kh, kw) order, taps
// outside the plane skipped (as the direct kernels do: an inf times a padding zero would be
// NaN). Nothing when the flag is clear.
template <typename T>
__global__ void __launch_bounds__(kFftThreads)
    fft_dense_direct_kernel(FftDenseParams p, const T* in, const T* w, const T* bias, T* out) {
  if (*p.flag == 0) return;
  const FftConvParams& t = p.t;
  const int64_t plane = int64_t(t.outH) * t.outW;
  const int64_t total = int64_t(p.M / t.tiles) * p.result * plane;
  for (int64_t i = int64_t(blockIdx.x) * kFftThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kFftThreads) {
    // i = (n * result + cr) * plane + h * outW + w
    const int64_t pos = i % plane, nc = i / plane;
    const int cr = int(nc % p.result), n = int(nc / p.result);
    const int oh = int(pos / t.outW), ow = int(pos % t.outW);
    const int grp = cr / p.crg;
    float acc = 0.f;
    for (int cl = 0; cl < p.cdg; ++cl) {
      const T* in_c = in + int64_t(n) * t.in_s.n + int64_t(grp * p.cdg + cl) * t.in_s.c;
      const T* w_rc = w + fft_dense_weight_offset(p, cr, cl);
      // Tap loops kept rolled: unrolled, ptxas spilled 8 bytes of the float instantiation to
      // the stack (test_sass forbids local memory); the fallback only runs on non-finite data.
#pragma unroll 1
      for (int i2 = 0; i2 < t.KH; ++i2) {
        const int ih = oh + i2 * t.dh - t.pad_h;
        if (ih < 0 || ih >= t.inH) continue;
        const int kh = t.flip ? t.KH - 1 - i2 : i2;
#pragma unroll 1
        for (int j = 0; j < t.KW; ++j) {
          const int iw = ow + j * t.dw - t.pad_w;
          if (iw < 0 || iw >= t.inW) continue;
          const int kw = t.flip ? t.KW - 1 - j : j;
          acc += Num<T>::load(in_c[int64_t(ih) * t.in_s.h + int64_t(iw) * t.in_s.w]) *
                 Num<T>::load(w_rc[kh * t.w_h + kw * t.w_w]);
        }
      }
    }
    const float b = bias != nullptr ? Num<T>::load(bias[cr]) : 0.f;
    out[int64_t(n) * t.out_s.n + int64_t(cr) * t.out_s.c + int64_t(oh) * t.out_s.h +
        int64_t(ow) * t.out_s.w] = Num<T>::store(acc + b);
  }
}

// ---- bwd_filter ------------------------------------------------------------------------------
// dw[o][cl][kh][kw] = sum over n and the dy positions (u, v) of
// x[n][g*cdg + cl][u + kh*dh - pad_h][v + kw*dw - pad_w] * dy[n][o][u][v]: per tile m the
// correlation of the x patch with the dy tile read at the taps (kh*dh, kw*dw), summed over the
// rows m. In spectra, S[f][o][cl] = sum over m of X[f][m][g*cdg + cl] * conj(D[f][m][o])
// (kernel 1 for X, kernel 1 in dy mode for D in the Y array), then one inverse per (o, cl).

// 3f: per (frequency, group, 32 o x 32 cl block) S = sum over m, in ascending m, staged in
// 16-row chunks; S goes to the Wf array ([f][o][cl], the forward filter spectra's layout).
template <typename T>
__global__ void __launch_bounds__(kFftThreads) fft_dense_filter_gemm_kernel(FftDenseParams p) {
  __shared__ float2 As[kFftGemmK][kFftGemmTile + 1];  // D chunk: [m][o]
  __shared__ float2 Bs[kFftGemmK][kFftGemmTile + 1];  // X chunk: [m][cl]
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int groups = p.result / p.crg;
  const int ot = (p.crg + kFftGemmTile - 1) / kFftGemmTile;
  const int ct = (p.cdg + kFftGemmTile - 1) / kFftGemmTile;
  const int64_t items = int64_t(p.F) * groups * ot * ct;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    // item = ((f * groups + grp) * ot + ob) * ct + cb
    const int cb = int(item % ct);
    int64_t rest = item / ct;
    const int ob = int(rest % ot);
    rest /= ot;
    const int grp = int(rest % groups);
    const int f = int(rest / groups);
    const int o0 = ob * kFftGemmTile, c0 = cb * kFftGemmTile;
    const float2* D = p.y + int64_t(f) * p.M * p.result + int64_t(grp) * p.crg;
    const float2* X = p.x + int64_t(f) * p.M * p.data + int64_t(grp) * p.cdg;
    float2 acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) acc[i][j] = make_float2(0.f, 0.f);
    for (int k0 = 0; k0 < p.M; k0 += kFftGemmK) {
      for (int e = tid; e < kFftGemmTile * kFftGemmK; e += kFftThreads) {
        const int kk = e / kFftGemmTile, col = e % kFftGemmTile;  // col fastest: channels
        const bool kin = k0 + kk < p.M;
        As[kk][col] = kin && o0 + col < p.crg ? D[int64_t(k0 + kk) * p.result + o0 + col]
                                              : make_float2(0.f, 0.f);
        Bs[kk][col] = kin && c0 + col < p.cdg ? X[int64_t(k0 + kk) * p.data + c0 + col]
                                              : make_float2(0.f, 0.f);
      }
      __syncthreads();
      for (int kk = 0; kk < kFftGemmK; ++kk) {
        const float2 a[2] = {As[kk][ty], As[kk][ty + 16]};
        const float2 b[2] = {Bs[kk][tx], Bs[kk][tx + 16]};
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) {  // X * conj(D)
            acc[i][j].x += b[j].x * a[i].x + b[j].y * a[i].y;
            acc[i][j].y += b[j].y * a[i].x - b[j].x * a[i].y;
          }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int o = o0 + ty + 16 * i, cl = c0 + tx + 16 * j;
        if (o < p.crg && cl < p.cdg)
          p.wf[(int64_t(f) * p.result + int64_t(grp) * p.crg + o) * p.cdg + cl] = acc[i][j];
      }
  }
}

// 4f: per (o, cl) the inverse of S (conj(S) through fft2d_dif, real part, / PQ) read at the
// taps; nothing when the flag is set (5f).
template <typename T>
__global__ void __launch_bounds__(kFftThreads)
    fft_dense_filter_output_kernel(FftDenseParams p, T* dw) {
  __shared__ float2 buf[kCudaFftMaxSide * kCudaFftMaxSide];
  __shared__ float2 twiddle[kCudaFftMaxSide / 2];
  if (*p.flag != 0) return;
  const FftConvParams& t = p.t;
  const int P = 1 << t.logP, Q = 1 << t.logQ, PQ = P * Q;
  const float scale = 1.f / float(PQ);
  fft_dense_twiddles(twiddle, t.logN);
  const int64_t items = int64_t(p.result) * p.cdg;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int cl = int(item % p.cdg);
    const int o = int(item / p.cdg);
    const float2* S = p.wf + int64_t(o) * p.cdg + cl;  // S[f] at S[f * result * cdg]
    const int64_t fs = int64_t(p.result) * p.cdg;
    for (int idx = threadIdx.x; idx < PQ; idx += kFftThreads) {
      const int k1 = idx >> t.logQ, k2 = idx & (Q - 1);
      float2 z;
      if (k2 < p.Qh) {
        z = S[int64_t(k1 * p.Qh + k2) * fs];
        z.y = -z.y;
      } else {
        z = S[int64_t(((P - k1) & (P - 1)) * p.Qh + (Q - k2)) * fs];
      }
      buf[idx] = z;
    }
    __syncthreads();
    fft2d_dif(buf, twiddle, t.logP, t.logQ, t.logN);
    for (int tap = threadIdx.x; tap < t.KH * t.KW; tap += kFftThreads) {
      const int kh = tap / t.KW, kw = tap - kh * t.KW;
      const float v =
          buf[(fft_bit_reverse(kh * t.dh, t.logP) << t.logQ) + fft_bit_reverse(kw * t.dw, t.logQ)]
              .x;
      dw[int64_t(o) * p.w_o + int64_t(cl) * p.w_i + kh * t.w_h + kw * t.w_w] =
          Num<T>::store(v * scale);
    }
    __syncthreads();
  }
}

// 5f: with the flag set, every tap directly: one thread per (o, cl, kh, kw), images then dy
// positions in order, positions whose x falls outside the plane skipped.
template <typename T>
__global__ void __launch_bounds__(kFftThreads)
    fft_dense_filter_direct_kernel(FftDenseParams p, const T* x, const T* dy, T* dw) {
  if (*p.flag == 0) return;
  const FftConvParams& t = p.t;
  const int taps = t.KH * t.KW;
  const int64_t total = int64_t(p.result) * p.cdg * taps;
  const int images = p.M / t.tiles;
  for (int64_t i = int64_t(blockIdx.x) * kFftThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kFftThreads) {
    const int tap = int(i % taps);
    const int64_t oc = i / taps;
    const int cl = int(oc % p.cdg), o = int(oc / p.cdg);
    const int kh = tap / t.KW, kw = tap - kh * t.KW;
    const int c = (o / p.crg) * p.cdg + cl;
    float acc = 0.f;
    for (int n = 0; n < images; ++n) {
      const T* x_c = x + int64_t(n) * t.in_s.n + int64_t(c) * t.in_s.c;
      const T* dy_o = dy + int64_t(n) * t.out_s.n + int64_t(o) * t.out_s.c;
      for (int u = 0; u < t.outH; ++u) {
        const int ih = u + kh * t.dh - t.pad_h;
        if (ih < 0 || ih >= t.inH) continue;
        for (int v = 0; v < t.outW; ++v) {
          const int iw = v + kw * t.dw - t.pad_w;
          if (iw < 0 || iw >= t.inW) continue;
          acc += Num<T>::load(x_c[int64_t(ih) * t.in_s.h + int64_t(iw) * t.in_s.w]) *
                 Num<T>::load(dy_o[int64_t(u) * t.out_s.h + int64_t(v) * t.out_s.w]);
        }
      }
    }
    dw[int64_t(o) * p.w_o + int64_t(cl) * p.w_i + kh * t.w_h + kw * t.w_w] = Num<T>::store(acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// The kernels' parameters for direction `which` (0 forward, 1 bwd_data, 2 bwd_filter) under plan
// `pl` with the workspace at `ws` (cuda_dense_workspace(g, dir, pl).bytes of it, 256-byte aligned).
inline FftDenseParams make_fft_dense_params(const ConvGeometry& g, int which, const FftPlan& pl,
                                            void* ws) {
  const ConvDirection dir = which == 1   ? ConvDirection::kBackwardData
                            : which == 2 ? ConvDirection::kBackwardFilter
                                         : ConvDirection::kForward;
  const CudaDenseChannels ch = cuda_dense_channels(g, dir);
  const CudaDenseWorkspace lay = cuda_dense_workspace(g, dir, pl);
  FftDenseParams p{};
  p.t = make_fft_conv_params(g, which, pl);
  p.data = int32_t(ch.data);
  p.result = int32_t(ch.result);
  p.cdg = int32_t(ch.data_per_group);
  p.crg = int32_t(ch.result_per_group);
  p.M = int32_t(lay.rows);
  p.F = int32_t(lay.freqs);
  p.Qh = int32_t(pl.Q / 2 + 1);
  const Strides4 wst = g.w_strides();  // (o, i, kh, kw)
  p.w_o = wst.n;
  p.w_i = wst.c;
  p.bwd = which == 1 ? 1 : 0;
  char* base = static_cast<char*>(ws);
  p.flag = reinterpret_cast<int*>(base);
  p.x = reinterpret_cast<float2*>(base + lay.x_off);
  p.wf = reinterpret_cast<float2*>(base + lay.w_off);
  p.y = reinterpret_cast<float2*>(base + lay.y_off);
  return p;
}

// which 0: a = x, b = w, out = y (bias per O); 1: a = dy, b = w, out = dx (bias per C);
// 2: a = x, b = dy, out = dw (bias null).
template <typename T>
cudaError_t fft_dense_conv(const ConvGeometry& g, int which, const FftPlan& pl, const T* a,
                           const T* b, const T* bias, T* out, void* workspace,
                           cudaStream_t stream) {
  if constexpr (std::is_same_v<T, double>) {
    return cudaErrorInvalidValue;  // float64 stays direct (cuda_fft_dense_inapplicable)
  } else {
    if (!pl.valid() || pl.P > kCudaFftMaxSide || pl.Q > kCudaFftMaxSide || which < 0 || which > 2 ||
        workspace == nullptr)
      return cudaErrorInvalidValue;
    const FftDenseParams p = make_fft_dense_params(g, which, pl, workspace);
    if (which == 2) {
      if (int64_t(p.result) * p.cdg == 0) return cudaSuccess;
      cudaError_t err = launch(fft_dense_reset_kernel<T>, dim3(1), dim3(1), stream, p.flag);
      if (err == cudaSuccess)
        err = launch(fft_dense_data_kernel<T, false>, dim3(grid_blocks(int64_t(p.M) * p.data)),
                     dim3(kFftThreads), stream, p, a);
      if (err == cudaSuccess)
        err = launch(fft_dense_data_kernel<T, true>, dim3(grid_blocks(int64_t(p.M) * p.result)),
                     dim3(kFftThreads), stream, p, b);
      const int64_t items = int64_t(p.F) * (p.result / p.crg) * ceil_div_pos(p.crg, kFftGemmTile) *
                            ceil_div_pos(p.cdg, kFftGemmTile);
      if (err == cudaSuccess)
        err = launch(fft_dense_filter_gemm_kernel<T>, dim3(grid_blocks(items)), dim3(kFftThreads),
                     stream, p);
      if (err == cudaSuccess)
        err =
            launch(fft_dense_filter_output_kernel<T>, dim3(grid_blocks(int64_t(p.result) * p.cdg)),
                   dim3(kFftThreads), stream, p, out);
      if (err != cudaSuccess) return err;
      const int64_t taps = int64_t(p.result) * p.cdg * p.t.KH * p.t.KW;
      return launch(fft_dense_filter_direct_kernel<T>,
                    dim3(grid_blocks(ceil_div_pos(taps, kFftThreads))), dim3(kFftThreads), stream,
                    p, a, b, out);
    }
    if (int64_t(p.M) * p.result == 0) return cudaSuccess;
    cudaError_t err = launch(fft_dense_reset_kernel<T>, dim3(1), dim3(1), stream, p.flag);
    if (err != cudaSuccess) return err;
    if (int64_t(p.M) * p.data > 0) {
      err = launch(fft_dense_data_kernel<T, false>, dim3(grid_blocks(int64_t(p.M) * p.data)),
                   dim3(kFftThreads), stream, p, a);
      if (err != cudaSuccess) return err;
    }
    if (p.cdg > 0) {
      err = launch(fft_dense_filter_kernel<T>, dim3(grid_blocks(int64_t(p.result) * p.cdg)),
                   dim3(kFftThreads), stream, p, b);
      if (err != cudaSuccess) return err;
    }
    const int64_t gemm_items = int64_t(p.F) * (p.result / p.crg) * ceil_div_pos(p.M, kFftGemmTile) *
                               ceil_div_pos(p.crg, kFftGemmTile);
    err = launch(fft_dense_gemm_kernel<T>, dim3(grid_blocks(gemm_items)), dim3(kFftThreads), stream,
                 p);
    if (err != cudaSuccess) return err;
    err = launch(fft_dense_output_kernel<T>, dim3(grid_blocks(int64_t(p.M) * p.result)),
                 dim3(kFftThreads), stream, p, bias, out);
    if (err != cudaSuccess) return err;
    const int64_t outputs = int64_t(g.N) * p.result * p.t.outH * p.t.outW;
    return launch(fft_dense_direct_kernel<T>, dim3(grid_blocks(ceil_div_pos(outputs, kFftThreads))),
                  dim3(kFftThreads), stream, p, a, b, bias, out);
  }
}

}  // namespace jaxconv::cuda
