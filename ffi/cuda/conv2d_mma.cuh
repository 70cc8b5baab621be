// Tensor-core pass kernel (sm_80+): forward and bwd_data of conv2d_kernels.cuh's "pass" as an
// implicit GEMM on mma.sync, for bfloat16/float16 operands (m16n8k16) and float32 operands
// rounded to TF32 (m16n8k8), always accumulating in float32. Included by conv2d_kernels.cuh
// after PassParams; the pass's index math (rows m = (n, u, v), reduction k over the layout's
// (ci, tap) order, taps per bwd_data phase from geometry.h) is the SIMT kernel's, only the
// multiply changes.
//
// Block tile BM x BN (output rows x output channels of one group), split over
// kWarpsM x kWarpsN warps; each warp owns a (BM / kWarpsM) x (BN / kWarpsN) piece as MI x NI
// tiles of 16 x 8 accumulators. The reduction advances one stage of 64 bytes of k per row at a
// time (32 16-bit values or 16 floats: two mma k-steps), through kMmaStages shared-memory
// buffers filled with cp.async, so the loads of stage s + 1 run while stage s is multiplied.
//
// Shared layouts (byte pitches chosen so that the 8 row addresses of one ldmatrix fall into 8
// distinct groups of 4 banks, i.e. no bank conflicts):
//   A: [BM][80 bytes], row m holds the stage's k values of output row m (k contiguous).
//   B, n-major: [BN][80 bytes], row n holds the stage's k values of output channel n; read with
//      ldmatrix (the mma's "col" B operand is exactly B^T rows).
//   B, k-major (16-bit types with weights contiguous along output channels, i.e. HWIO forward):
//      [32][(BN + 8) * 2 bytes], row k holds BN channels; read with ldmatrix.trans.
// Loads are 16-byte cp.async where 8 (16-bit) or 4 (float) consecutive elements of a chunk are
// consecutive and aligned in memory (NHWC activations with channels per group a multiple of the
// vector; weights along k or along output channels); every other case (NCHW activations, odd
// channel counts) gathers element by element into the same layout, so all geometries the SIMT
// kernel handles run here too.
#pragma once

#include <type_traits>

#include "kernel_common.cuh"

namespace jaxconv::cuda {

template <typename T>
struct MmaOf;
template <>
struct MmaOf<__nv_bfloat16> {
  static constexpr MmaKind kind = MmaKind::kBf16;
  using Bits = uint16_t;
};
template <>
struct MmaOf<__half> {
  static constexpr MmaKind kind = MmaKind::kF16;
  using Bits = uint16_t;
};
template <>
struct MmaOf<float> {  // only with allow_tf32
  static constexpr MmaKind kind = MmaKind::kTf32;
  using Bits = uint32_t;
};

template <int BM_, int BN_, int kWarpsM_, int kWarpsN_>
struct MmaTile {
  static constexpr int BM = BM_, BN = BN_, kWarpsM = kWarpsM_, kWarpsN = kWarpsN_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWarpRows = BM / kWarpsM, kWarpCols = BN / kWarpsN;
  static constexpr int MI = kWarpRows / 16, NI = kWarpCols / 8;
  static_assert(kWarpRows % 16 == 0 && kWarpCols % 16 == 0, "B fragments load in pairs");
  static_assert((BM * 4) % kThreads == 0 && (BN * 4) % kThreads == 0,
                "each thread copies the same number of 16-byte chunks");
};

// Large layers: 8 warps of 64 x 32. Small layers (few output rows or channels, where 128-wide
// tiles would leave most SMs idle or compute padding): 4 warps of 32 x 32.
using MmaLargeTile = MmaTile<128, 128, 2, 4>;
using MmaSmallTile = MmaTile<64, 64, 2, 2>;

constexpr int kMmaStages = 2;
constexpr int kMmaRowBytes = 64;    // k bytes per row and stage
constexpr int kMmaPitchBytes = 80;  // 20 words: 8 rows start at banks 0, 20, 8, 28, 16, 4, 24, 12

// How the loads of one launch run; decided on the host (mma_pass_loads).
struct MmaLoads {
  int a_vector;   // A chunks as one 16-byte copy (NHWC, channels per group % vector == 0)
  int b_vector;   // B chunks as one 16-byte copy
};

template <typename T, typename Cfg, int kLayout, bool kBKMajor>
__global__ void __launch_bounds__(Cfg::kThreads)
    conv_pass_mma_kernel(PassParams p, MmaLoads loads, const T* __restrict__ in,
                         const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ out) {
  using S = typename std::conditional<sizeof(T) == 2, T, float>::type;
  using Bits = typename MmaOf<T>::Bits;
  constexpr MmaKind kKind = MmaOf<T>::kind;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, MI = Cfg::MI, NI = Cfg::NI;
  constexpr int kThreads = Cfg::kThreads;
  constexpr bool kChannelsLast = kLayout == kNHWC;
  constexpr int kVec = 16 / int(sizeof(S));          // elements per 16-byte chunk
  constexpr int BK = kMmaRowBytes / int(sizeof(S));  // k per stage
  constexpr int kChunksA = BM * 4 / kThreads, kChunksB = BN * 4 / kThreads;
  constexpr int kBPitch = kBKMajor ? (BN + 8) * 2 : kMmaPitchBytes;  // k-major: 16-bit only
  static_assert(!kBKMajor || sizeof(S) == 2, "ldmatrix.trans splits 32-bit values");
  static_assert(!kBKMajor || BK * (BN + 8) * 2 <= BN * kMmaPitchBytes, "k-major B fits");

  __shared__ __align__(16) unsigned char As[kMmaStages][BM * kMmaPitchBytes];
  __shared__ __align__(16) unsigned char Bs[kMmaStages][BN * kMmaPitchBytes];
  // Per tile and output row: image offset (-1 past the grid), in position before the tap
  // offset, out offset (-1 outside `out`).
  __shared__ int64_t row_in[BM], row_ih[BM], row_iw[BM], row_out[BM];

  const int tid = int(threadIdx.x), lane = lane_index(), warp = tid / 32;
  const int warp_m0 = (warp % Cfg::kWarpsM) * Cfg::kWarpRows;
  const int warp_n0 = (warp / Cfg::kWarpsM) * Cfg::kWarpCols;
  // k digits: NCHW (ci, th, tw) radices (TH, TW); NHWC (th, tw, ci) radices (TW, Cin).
  const int64_t r1 = kChannelsLast ? p.TW : p.TH, r2 = kChannelsLast ? p.Cin : p.TW;
  const Digits3 stage_step = split_index(BK, r1, r2), unit_step = split_index(1, r1, r2);

  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    // tile = (((phase_h * phases_w + phase_w) * G + g) * n_tiles + nt) * m_tiles + mt
    int64_t rest = tile;
    const int64_t mt = rest % p.m_tiles;
    rest /= p.m_tiles;
    const int64_t nt = rest % p.n_tiles;
    rest /= p.n_tiles;
    const int64_t g = rest % p.G;
    rest /= p.G;
    const int64_t rho_w = rest % p.phases_w, rho_h = rest / p.phases_w;
    const PassAxis ah = p.transposed
                            ? transposed_axis(rho_h, p.stride_h, p.pad_top, p.dil_h, p.KH)
                            : forward_axis(p.stride_h, p.pad_top, p.dil_h, p.KH);
    const PassAxis aw = p.transposed
                            ? transposed_axis(rho_w, p.stride_w, p.pad_left, p.dil_w, p.KW)
                            : forward_axis(p.stride_w, p.pad_left, p.dil_w, p.KW);
    const int64_t m0 = mt * BM, n0 = nt * BN;
    const T* w_group = w + g * p.w_group;

    for (int r = tid; r < BM; r += kThreads) {
      const int64_t m = m0 + r;
      int64_t img = -1, ih = 0, iw = 0, o = -1;
      if (m < p.M) {
        const int64_t v = m % p.V, u = (m / p.V) % p.U, n = m / (p.U * p.V);
        const int64_t oh = ah.out0 + u * ah.out_step, ow = aw.out0 + v * aw.out_step;
        img = n * p.is.n;
        ih = u * ah.step;
        iw = v * aw.step;
        if (oh < p.Hout && ow < p.Wout) o = n * p.os.n + oh * p.os.h + ow * p.os.w;
      }
      row_in[r] = img;
      row_ih[r] = ih;
      row_iw[r] = iw;
      row_out[r] = o;
    }
    __syncthreads();

    // The k that each of this thread's chunks starts at, as digits, for the next stage to load.
    // A and n-major B chunk e = tid + l * kThreads: row e / 4, k offset (e % 4) * kVec.
    // k-major B chunk e: k offset e / (BN / 8), channels 8 * (e % (BN / 8)) ...
    Digits3 a_k[kChunksA], b_k[kChunksB];
    int64_t a_k0[kChunksA], b_k0[kChunksB];
    JAXCONV_UNROLL
    for (int l = 0; l < kChunksA; ++l) {
      a_k0[l] = ((tid + l * kThreads) % 4) * kVec;
      a_k[l] = split_index(a_k0[l], r1, r2);
    }
    JAXCONV_UNROLL
    for (int l = 0; l < kChunksB; ++l) {
      const int e = tid + l * kThreads;
      b_k0[l] = kBKMajor ? e / (BN / 8) : (e % 4) * kVec;
      b_k[l] = split_index(b_k0[l], r1, r2);
    }

    // Tap of reduction index k (digits d): channel offset into `in` (-1: no tap), the tap's
    // offsets, and the weight offset within the group.
    struct Tap {
      int64_t chan, dh, dw, w;
    };
    auto tap_of = [&](Digits3 d, int64_t k) -> Tap {
      const int64_t ci = kChannelsLast ? d.c : d.a;
      const int64_t th = kChannelsLast ? d.a : d.b;
      const int64_t tw = kChannelsLast ? d.b : d.c;
      if (k >= p.K || th >= ah.count || tw >= aw.count) return {-1, 0, 0, 0};
      return {(g * p.Cin + ci) * p.is.c, ah.off0 + th * ah.off_q, aw.off0 + tw * aw.off_q,
              ci * p.w_ci + (ah.cell0 + th * ah.cell_q) * p.w_kh +
                  (aw.cell0 + tw * aw.cell_q) * p.w_kw};
    };
    // Offset of in[row r, tap] or -1 where the tap reads padding.
    auto in_offset = [&](int r, const Tap& t) -> int64_t {
      const int64_t img = row_in[r];
      if (img < 0 || t.chan < 0) return -1;
      const int64_t ih = row_ih[r] + t.dh, iw = row_iw[r] + t.dw;
      if (ih < 0 || ih >= p.Hin || iw < 0 || iw >= p.Win) return -1;
      return img + t.chan + ih * p.is.h + iw * p.is.w;
    };

    auto load_stage = [&](int stage, int64_t k0) {
      JAXCONV_UNROLL
      for (int l = 0; l < kChunksA; ++l) {
        const int e = tid + l * kThreads, r = e / 4;
        unsigned char* dst = &As[stage][r * kMmaPitchBytes + (e % 4) * 16];
        if (loads.a_vector) {
          const int64_t off = in_offset(r, tap_of(a_k[l], k0 + a_k0[l]));
          cp_async_16(dst, in + (off < 0 ? 0 : off), off >= 0);
        } else {
          Digits3 d = a_k[l];
          JAXCONV_UNROLL
          for (int i = 0; i < kVec; ++i) {
            const int64_t off = in_offset(r, tap_of(d, k0 + a_k0[l] + i));
            const Bits v = off < 0 ? Bits(0) : reinterpret_cast<const Bits*>(in)[off];
            reinterpret_cast<Bits*>(dst)[i] = v;
            d = add_digits(d, unit_step, r1, r2);
          }
        }
        a_k[l] = add_digits(a_k[l], stage_step, r1, r2);
      }
      JAXCONV_UNROLL
      for (int l = 0; l < kChunksB; ++l) {
        const int e = tid + l * kThreads;
        if (kBKMajor) {
          // One k, 8 consecutive output channels.
          const int kk = e / (BN / 8), c = (e % (BN / 8)) * 8;
          unsigned char* dst = &Bs[stage][kk * kBPitch + c * 2];
          const Tap t = tap_of(b_k[l], k0 + b_k0[l]);
          if (loads.b_vector) {
            const bool live = t.chan >= 0 && n0 + c < p.Cout;
            const int64_t off = live ? (n0 + c) * p.w_co + t.w : 0;
            cp_async_16(dst, w_group + off, live);
          } else {
            JAXCONV_UNROLL
            for (int i = 0; i < 8; ++i) {
              const int64_t n = n0 + c + i;
              const Bits v = t.chan >= 0 && n < p.Cout
                                 ? reinterpret_cast<const Bits*>(w_group)[n * p.w_co + t.w]
                                 : Bits(0);
              reinterpret_cast<Bits*>(dst)[i] = v;
            }
          }
        } else {
          // One output channel, kVec consecutive k.
          const int c = e / 4;
          const int64_t n = n0 + c;
          unsigned char* dst = &Bs[stage][c * kMmaPitchBytes + (e % 4) * 16];
          if (loads.b_vector) {
            const Tap t = tap_of(b_k[l], k0 + b_k0[l]);
            const bool live = t.chan >= 0 && n < p.Cout;
            cp_async_16(dst, w_group + (live ? n * p.w_co + t.w : 0), live);
          } else {
            Digits3 d = b_k[l];
            JAXCONV_UNROLL
            for (int i = 0; i < kVec; ++i) {
              const Tap t = tap_of(d, k0 + b_k0[l] + i);
              const Bits v = t.chan >= 0 && n < p.Cout
                                 ? reinterpret_cast<const Bits*>(w_group)[n * p.w_co + t.w]
                                 : Bits(0);
              reinterpret_cast<Bits*>(dst)[i] = v;
              d = add_digits(d, unit_step, r1, r2);
            }
          }
        }
        b_k[l] = add_digits(b_k[l], stage_step, r1, r2);
      }
    };

    float acc[MI][NI][4];
    JAXCONV_UNROLL
    for (int i = 0; i < MI; ++i)
      JAXCONV_UNROLL
      for (int j = 0; j < NI; ++j)
        JAXCONV_UNROLL
        for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

    const int64_t steps = (p.K + BK - 1) / BK;
    load_stage(0, 0);
    cp_async_commit();
    for (int64_t s = 0; s < steps; ++s) {
      const int stage = int(s % kMmaStages);
      if (s + 1 < steps) load_stage(int((s + 1) % kMmaStages), (s + 1) * BK);
      cp_async_commit();  // possibly empty: keeps "all but the newest group" = stage s
      cp_async_wait<1>();
      __syncthreads();  // every thread's part of stage s is in shared memory

      const unsigned char* a_tile = As[stage];
      const unsigned char* b_tile = Bs[stage];
      JAXCONV_UNROLL
      for (int ks = 0; ks < 2; ++ks) {  // two mma k-steps of 32 bytes
        uint32_t a[MI][4], b[NI][2];
        JAXCONV_UNROLL
        for (int i = 0; i < MI; ++i)
          // lanes 0-15: rows 0-15 at k bytes 0-15; lanes 16-31: the same rows at bytes 16-31
          // (a[0..3] = rows 0-7 / 8-15 x k low / high, the mma A layout).
          ldmatrix<4>(a[i], a_tile + (warp_m0 + i * 16 + lane % 16) * kMmaPitchBytes + ks * 32 +
                                (lane / 16) * 16);
        JAXCONV_UNROLL
        for (int j = 0; j < NI; j += 2) {
          uint32_t r[4];
          // Matrices: (channels 0-7, k low), (0-7, k high), (8-15, low), (8-15, high) of the
          // pair of n8 tiles j, j + 1: registers b[j][0], b[j][1], b[j+1][0], b[j+1][1].
          if constexpr (kBKMajor)
            ldmatrix<4, true>(r, b_tile + (ks * 16 + ((lane / 8) % 2) * 8 + lane % 8) * kBPitch +
                                     (warp_n0 + j * 8 + (lane / 16) * 8) * 2);
          else
            ldmatrix<4>(r, b_tile + (warp_n0 + j * 8 + (lane / 16) * 8 + lane % 8) * kBPitch +
                               ks * 32 + ((lane / 8) % 2) * 16);
          b[j][0] = r[0];
          b[j][1] = r[1];
          b[j + 1][0] = r[2];
          b[j + 1][1] = r[3];
        }
        if constexpr (kKind == MmaKind::kTf32) {
          JAXCONV_UNROLL
          for (int i = 0; i < MI; ++i)
            JAXCONV_UNROLL
            for (int q = 0; q < 4; ++q) a[i][q] = to_tf32(a[i][q]);
          JAXCONV_UNROLL
          for (int j = 0; j < NI; ++j)
            JAXCONV_UNROLL
            for (int q = 0; q < 2; ++q) b[j][q] = to_tf32(b[j][q]);
        }
        JAXCONV_UNROLL
        for (int i = 0; i < MI; ++i)
          JAXCONV_UNROLL
          for (int j = 0; j < NI; ++j) mma<kKind>(acc[i][j], a[i], b[j]);
      }
      __syncthreads();  // stage s is read; the next iteration refills it
    }
    cp_async_wait<0>();  // the trailing empty group

    // Epilogue: accumulator q of tile (i, j) is D[g + 8 * (q / 2)][2t + q % 2] (lane = 4g + t).
    const int grp = lane / 4, t4 = lane % 4;
    JAXCONV_UNROLL
    for (int i = 0; i < MI; ++i)
      JAXCONV_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int64_t o = row_out[warp_m0 + i * 16 + grp + 8 * h];
        if (o < 0) continue;
        JAXCONV_UNROLL
        for (int j = 0; j < NI; ++j)
          JAXCONV_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int64_t c = n0 + warp_n0 + j * 8 + 2 * t4 + e;
            if (c >= p.Cout) continue;
            const float b = bias ? Num<T>::load(bias[g * p.Cout + c]) : 0.0f;
            out[o + (g * p.Cout + c) * p.os.c] = Num<T>::store(acc[i][j][2 * h + e] + b);
          }
      }
    __syncthreads();  // the next tile rewrites the row tables
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Whether k-major B (ldmatrix.trans) applies: 16-bit weights contiguous along output channels.
template <typename T>
bool mma_b_k_major(const PassParams& p) {
  return sizeof(T) == 2 && p.w_co == 1;
}

// Which chunks may be copied as 16 bytes: the kVec (8 or 4) elements of a chunk must be
// consecutive in memory, and every offset that starts a chunk a multiple of kVec elements
// (with 16-byte-aligned buffers).
template <typename T>
MmaLoads mma_pass_loads(const PassParams& p, const T* in, const T* w) {
  const int64_t vec = sizeof(T) == 2 ? 8 : 4;
  auto multiple = [&](int64_t v) { return v % vec == 0; };
  MmaLoads loads{0, 0};
  // NHWC: k = (th, tw, ci) with ci innermost; a chunk stays within one tap when Cin % vec == 0.
  loads.a_vector = p.layout == kNHWC && multiple(p.Cin) && multiple(p.is.n) &&
                   multiple(p.is.h) && multiple(p.is.w) && aligned16(in);
  bool b = aligned16(w) && multiple(p.w_group);
  if (mma_b_k_major<T>(p)) {  // 8 output channels of one k
    b = b && multiple(p.Cout) && multiple(p.w_ci) && multiple(p.w_kh) && multiple(p.w_kw);
  } else if (p.layout == kNHWC) {  // vec input channels of one tap
    b = b && p.w_ci == 1 && multiple(p.Cin) && multiple(p.w_co) && multiple(p.w_kh) &&
        multiple(p.w_kw);
  } else {  // forward OIHW: k = (ci, kh, kw) is the weight's own order, offset co * w_co + k
    b = b && !p.transposed && p.w_kw == 1 && p.w_kh == p.KW && p.w_ci == p.KH * p.KW &&
        multiple(p.K) && multiple(p.w_co);
  }
  loads.b_vector = b;
  return loads;
}

template <typename T, typename Cfg>
cudaError_t launch_pass_mma(PassParams p, const T* in, const T* w, const T* bias, T* out,
                            cudaStream_t stream) {
  p.m_tiles = ceil_div_pos(p.M, Cfg::BM);
  p.n_tiles = ceil_div_pos(p.Cout, Cfg::BN);
  p.tiles = p.phases_h * p.phases_w * p.G * p.n_tiles * p.m_tiles;
  if (p.tiles == 0) return cudaSuccess;
  const MmaLoads loads = mma_pass_loads(p, in, w);
  void (*kernel)(PassParams, MmaLoads, const T*, const T*, const T*, T*);
  if (p.layout == kNHWC) {
    if constexpr (sizeof(T) == 2)
      kernel = mma_b_k_major<T>(p) ? conv_pass_mma_kernel<T, Cfg, kNHWC, true>
                                   : conv_pass_mma_kernel<T, Cfg, kNHWC, false>;
    else
      kernel = conv_pass_mma_kernel<T, Cfg, kNHWC, false>;
  } else {
    kernel = conv_pass_mma_kernel<T, Cfg, kNCHW, false>;
  }
  return launch(kernel, dim3(grid_blocks(p.tiles)), dim3(Cfg::kThreads), stream, p, loads, in, w,
                bias, out);
}

}  // namespace jaxconv::cuda
