// Tensor-core kernels, level 4: forward and bwd_data of conv2d_kernels.cuh's "pass" as implicit
// GEMMs (rows m = (n, u, v), reduction k over the layout's (ci, tap) order, taps per bwd_data
// phase from geometry.h; the index math is the SIMT kernel's, only the multiply changes): the
// general kernel, which handles every geometry (16-byte cp.async or element gathers, int32 or
// int64 offsets), and the precomputed-iterator kernel for 16-byte NHWC operands.
//
// PassParams, PassAxis, forward_axis and transposed_axis come from conv2d_problem.cuh.
#pragma once

#include <type_traits>

#include "conv2d_mma_mainloop.cuh"
#include "conv2d_problem.cuh"

namespace jaxconv::cuda {

// One block tile of the pass: tile = (((phase_h * phases_w + phase_w) * G + g) * n_tiles + nt)
// * m_tiles + mt; its group, first row m0 and first output channel n0, and the axes of its
// stride phase (forward: the one phase).
struct MmaPassTile {
  int64_t g, m0, n0;
  PassAxis ah, aw;
};
__device__ __forceinline__ MmaPassTile mma_pass_tile(const PassParams& p, int64_t tile, int BM,
                                                     int BN) {
  int64_t rest = tile;
  const int64_t mt = rest % p.m_tiles;
  rest /= p.m_tiles;
  const int64_t nt = rest % p.n_tiles;
  rest /= p.n_tiles;
  const int64_t g = rest % p.G;
  rest /= p.G;
  const int64_t rho_w = rest % p.phases_w, rho_h = rest / p.phases_w;
  return {g, mt * BM, nt * BN,
          p.transposed ? transposed_axis(rho_h, p.stride_h, p.pad_top, p.dil_h, p.KH)
                       : forward_axis(p.stride_h, p.pad_top, p.dil_h, p.KH),
          p.transposed ? transposed_axis(rho_w, p.stride_w, p.pad_left, p.dil_w, p.KW)
                       : forward_axis(p.stride_w, p.pad_left, p.dil_w, p.KW)};
}

// Output row m < M of a tile's phase: digits (n, u, v) and the offset of out[n, oh, ow, 0]
// (oh = out0 + u * out_step, likewise ow), -1 where that position is past the output (a phase
// grid may be larger than its share of out).
struct MmaPassRow {
  int64_t n, u, v, out;
};
__device__ __forceinline__ MmaPassRow mma_pass_row(const PassParams& p, const MmaPassTile& t,
                                                   int64_t m) {
  const int64_t v = m % p.V, u = (m / p.V) % p.U, n = m / (p.U * p.V);
  const int64_t oh = t.ah.out0 + u * t.ah.out_step, ow = t.aw.out0 + v * t.aw.out_step;
  const int64_t o = oh < p.Hout && ow < p.Wout ? n * p.os.n + oh * p.os.h + ow * p.os.w : -1;
  return {n, u, v, o};
}

// The pass epilogue: out[row_out[r] + (g * Cout + c) * os_c] = acc + bias[g * Cout + c] for the
// block tile's rows r with row_out[r] >= 0 and its channels c = n0 + column below Cout.
template <typename T, typename Cfg, typename Index>
__device__ __forceinline__ void mma_store_pass_tile(const PassParams& p,
                                                    const float (&acc)[Cfg::MI][Cfg::NI][4],
                                                    const Index* row_out, int64_t g, int64_t n0,
                                                    Index os_c, const T* __restrict__ bias,
                                                    T* __restrict__ out, int warp_m0, int warp_n0,
                                                    int lane) {
  mma_store_accumulators<Cfg>(
      acc, warp_m0, warp_n0, lane, [&](int r) { return row_out[r]; },
      [&](Index o, int col, float v) {
        const int64_t c = n0 + col;
        if (c >= p.Cout) return;
        const float b = bias ? Num<T>::load(bias[g * p.Cout + c]) : 0.0f;
        out[o + Index(g * p.Cout + c) * os_c] = Num<T>::store(v + b);
      });
}

// The pass epilogue through shared memory, for 16-bit T (the tap kernel): each warp writes its
// accumulators, bias added and rounded, as pairs of T into a [BM][BN] tile of T in the stage
// buffers (rows padded by 16 bytes: the 8 rows x 4 lanes of one store hit 32 distinct banks),
// then each thread copies 8 consecutive channels of one row to `out` as one 16-byte store
// (vec_out: out 16-byte aligned and every row offset and channel start a multiple of 8), else
// element by element, skipping rows with row_out < 0 and channels past Cout. The values are
// those of mma_store_pass_tile bit for bit. Starts with a barrier (warps may still read the
// last stage); the caller's barrier before the next tile protects the tile.
template <typename T, typename Cfg>
__device__ __forceinline__ void mma_store_pass_tile_staged(
    const PassParams& p, const float (&acc)[Cfg::MI][Cfg::NI][4], const int* row_out, int64_t g,
    int64_t n0, const T* __restrict__ bias, T* __restrict__ out, unsigned char* smem, int warp_m0,
    int warp_n0, int lane, int tid) {
  static_assert(sizeof(T) == 2, "pairs of 16-bit values");
  constexpr int BM = Cfg::BM, BN = Cfg::BN;
  constexpr int kPitch = BN * 2 + 16;
  static_assert(BM * kPitch <= Cfg::kSharedBytes, "the staged tile fits the stage buffers");
  static_assert((BM * BN / 8) % Cfg::kThreads == 0, "each thread copies the same chunks");
  const int cout = int(p.Cout), chan0 = int(g * p.Cout + n0);
  // 16-byte output stores: out aligned, and every row offset and group start a multiple of 8.
  const bool vec_out = (reinterpret_cast<uintptr_t>(out) & 15) == 0 && p.Cout % 8 == 0 &&
                       p.os.n % 8 == 0 && p.os.h % 8 == 0 && p.os.w % 8 == 0;
  __syncthreads();
  struct alignas(4) Pair {
    T lo, hi;
  };
  const int grp = lane / 4, t4 = lane % 4;
  JAXCONV_UNROLL
  for (int j = 0; j < Cfg::NI; ++j) {
    const int c = warp_n0 + j * 8 + 2 * t4;
    float b0 = 0.0f, b1 = 0.0f;
    if (bias) {
      if (n0 + c < cout) b0 = Num<T>::load(bias[chan0 + c]);
      if (n0 + c + 1 < cout) b1 = Num<T>::load(bias[chan0 + c + 1]);
    }
    JAXCONV_UNROLL
    for (int i = 0; i < Cfg::MI; ++i) JAXCONV_UNROLL
    for (int h = 0; h < 2; ++h) {
      *reinterpret_cast<Pair*>(smem + (warp_m0 + i * 16 + grp + 8 * h) * kPitch + c * 2) =
          Pair{Num<T>::store(acc[i][j][2 * h] + b0), Num<T>::store(acc[i][j][2 * h + 1] + b1)};
    }
  }
  __syncthreads();
  JAXCONV_UNROLL
  for (int l = 0; l < BM * BN / 8 / Cfg::kThreads; ++l) {
    const int e = tid + l * Cfg::kThreads, r = e / (BN / 8), c = (e % (BN / 8)) * 8;
    const int o = row_out[r];
    if (o < 0 || n0 + c >= cout) continue;
    const unsigned char* src = smem + r * kPitch + c * 2;
    T* dst = out + (o + chan0 + c);
    if (vec_out && n0 + c + 8 <= cout) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int q = 0; q < 8 && n0 + c + q < cout; ++q) dst[q] = reinterpret_cast<const T*>(src)[q];
    }
  }
}

// Index: int32_t where every operand has fewer than 2^31 elements (mma_index_32), else
// int64_t. Offsets are formed only for elements inside their tensor (bounds are checked on the
// positions first), so each one is below that tensor's size.
template <typename T, typename Cfg, int kLayout, bool kBKMajor, typename Index>
__global__ void __launch_bounds__(Cfg::kThreads)
    conv_pass_mma_kernel(PassParams p, MmaLoads loads, const T* __restrict__ in,
                         const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ out) {
  using Types = MmaKernelTypes<T, Cfg>;
  using S = typename Types::S;
  using Bits = typename Types::Bits;
  constexpr MmaKind kKind = Types::kKind;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, MI = Cfg::MI, NI = Cfg::NI;
  constexpr int kThreads = Cfg::kThreads;
  constexpr bool kChannelsLast = kLayout == kNHWC;
  constexpr int kVec = Types::kVec, BK = Types::BK, kE = Types::kE;  // BK: k per stage
  constexpr int kChunksA = Types::kChunksA, kChunksB = Types::kChunksB;
  constexpr int kBPitch = kBKMajor ? mma_k_major_pitch<S>(BN) : kMmaRowBytes;
  static_assert(!kBKMajor || sizeof(S) == 2, "ldmatrix.trans splits 32-bit values");
  static_assert(!kBKMajor || BK * kBPitch == Cfg::kBStageBytes, "k-major B fills a stage");

  JAXCONV_DYNAMIC_SHARED(smem);  // Cfg::kSharedBytes: the A stages, then the B stages
  unsigned char* const As = smem;
  unsigned char* const Bs = smem + Cfg::kStages * Cfg::kAStageBytes;
  // Per tile and output row: image offset (-1 past the grid), in position before the tap
  // offset, out offset (-1 outside `out`).
  __shared__ Index row_in[BM], row_ih[BM], row_iw[BM], row_out[BM];

  const MmaThread me = mma_thread<Cfg>();
  const int tid = me.tid, lane = me.lane, warp_m0 = me.warp_m0, warp_n0 = me.warp_n0;
  // k digits: NCHW (ci, th, tw) radices (TH, TW); NHWC (th, tw, ci) radices (TW, Cin).
  const int64_t r1 = kChannelsLast ? p.TW : p.TH, r2 = kChannelsLast ? p.Cin : p.TW;
  const Digits3 stage_step = split_index(BK, r1, r2), unit_step = split_index(1, r1, r2);
  const Index in_h = Index(p.Hin), in_w = Index(p.Win);
  const Index is_c = Index(p.is.c), is_h = Index(p.is.h), is_w = Index(p.is.w);
  const Index w_co = Index(p.w_co), w_ci = Index(p.w_ci), w_kh = Index(p.w_kh),
              w_kw = Index(p.w_kw);

  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const MmaPassTile t = mma_pass_tile(p, tile, BM, BN);
    const PassAxis &ah = t.ah, &aw = t.aw;
    const int64_t g = t.g, m0 = t.m0, n0 = t.n0;
    const T* w_group = w + g * p.w_group;
    const Index chan0 = Index(g * p.Cin);  // the group's first input channel

    for (int r = tid; r < BM; r += kThreads) {
      const int64_t m = m0 + r;
      const MmaPassRow row = m < p.M ? mma_pass_row(p, t, m) : MmaPassRow{-1, 0, 0, -1};
      row_in[r] = Index(row.n < 0 ? -1 : row.n * p.is.n);
      row_ih[r] = Index(row.u * ah.step);
      row_iw[r] = Index(row.v * aw.step);
      row_out[r] = Index(row.out);
    }
    __syncthreads();

    // Once per tile, in registers: the k that each of this thread's chunks starts at, as
    // digits, for the next stage to load; the row of each A chunk (image offset and position)
    // and the output channel offset of each B chunk; and the predicate masks, bit l for chunk
    // l: a_live (the row is inside the grid), b_live (the B chunk's first channel is below
    // Cout). A and n-major B chunk e = tid + l * kThreads: row e / 4, k offset (e % 4) * kVec.
    // k-major B chunk e: k offset e / (BN / 8), channels 8 * (e % (BN / 8)) ...
    Digits3 a_k[kChunksA], b_k[kChunksB];
    int a_k0[kChunksA], b_k0[kChunksB];
    Index a_img[kChunksA], a_ih[kChunksA], a_iw[kChunksA], b_chan[kChunksB];
    uint32_t a_live = 0, b_live = 0;
    JAXCONV_UNROLL
    for (int l = 0; l < kChunksA; ++l) {
      const int e = tid + l * kThreads, r = e / 4;
      a_k0[l] = (e % 4) * kVec;
      a_k[l] = split_index(a_k0[l], r1, r2);
      a_img[l] = row_in[r];
      a_ih[l] = row_ih[r];
      a_iw[l] = row_iw[r];
      if (a_img[l] >= 0) a_live |= 1u << l;
    }
    JAXCONV_UNROLL
    for (int l = 0; l < kChunksB; ++l) {
      const int e = tid + l * kThreads;
      b_k0[l] = kBKMajor ? e / (BN / 8) : (e % 4) * kVec;
      b_k[l] = split_index(b_k0[l], r1, r2);
      const int64_t n = n0 + (kBKMajor ? (e % (BN / 8)) * 8 : e / 4);
      b_chan[l] = n < p.Cout ? Index(n) : Index(0);
      if (n < p.Cout) b_live |= 1u << l;
    }

    // Tap of reduction index k (digits d): channel offset into `in` (-1: no tap), the tap's
    // offsets, and the weight offset within the group.
    struct Tap {
      Index chan, dh, dw, w;
    };
    auto tap_of = [&](Digits3 d, int64_t k) -> Tap {
      const Index ci = Index(kChannelsLast ? d.c : d.a);
      const Index th = Index(kChannelsLast ? d.a : d.b);
      const Index tw = Index(kChannelsLast ? d.b : d.c);
      if (k >= p.K || th >= ah.count || tw >= aw.count) return {-1, 0, 0, 0};
      return {(chan0 + ci) * is_c, Index(ah.off0) + th * Index(ah.off_q),
              Index(aw.off0) + tw * Index(aw.off_q),
              ci * w_ci + (Index(ah.cell0) + th * Index(ah.cell_q)) * w_kh +
                  (Index(aw.cell0) + tw * Index(aw.cell_q)) * w_kw};
    };
    // Offset of in[row of A chunk l, tap] or -1 where the tap reads padding.
    auto in_offset = [&](int l, const Tap& t) -> Index {
      if (!((a_live >> l) & 1u) || t.chan < 0) return -1;
      const Index ih = a_ih[l] + t.dh, iw = a_iw[l] + t.dw;
      if (ih < 0 || ih >= in_h || iw < 0 || iw >= in_w) return -1;
      return a_img[l] + t.chan + ih * is_h + iw * is_w;
    };

    auto load_stage = [&](int stage, int64_t step) {
      const int64_t k0 = step * BK;
      JAXCONV_UNROLL
      for (int l = 0; l < kChunksA; ++l) {
        const int e = tid + l * kThreads, r = e / 4;
        unsigned char* dst =
            As + stage * Cfg::kAStageBytes + mma_tile_offset<kMmaRowBytes, kE>(r, e % 4);
        if (loads.a_vector) {
          const Index off = in_offset(l, tap_of(a_k[l], k0 + a_k0[l]));
          cp_async_16(dst, in + (off < 0 ? 0 : off), off >= 0);
        } else {
          Digits3 d = a_k[l];
          JAXCONV_UNROLL
          for (int i = 0; i < kVec; ++i) {
            const Index off = in_offset(l, tap_of(d, k0 + a_k0[l] + i));
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
        const bool chunk_live = (b_live >> l) & 1u;
        if (kBKMajor) {
          // One k, 8 consecutive output channels from b_chan[l].
          const int kk = e / (BN / 8), c = (e % (BN / 8)) * 8;
          unsigned char* dst =
              Bs + stage * Cfg::kBStageBytes + mma_tile_offset<kBPitch, 2>(kk, c / 8);
          const Tap t = tap_of(b_k[l], k0 + b_k0[l]);
          if (loads.b_vector) {
            const bool live = t.chan >= 0 && chunk_live;
            cp_async_16(dst, w_group + (live ? b_chan[l] * w_co + t.w : 0), live);
          } else {
            JAXCONV_UNROLL
            for (int i = 0; i < 8; ++i) {
              const bool live = t.chan >= 0 && chunk_live && n0 + c + i < p.Cout;
              const Bits v =
                  live ? reinterpret_cast<const Bits*>(w_group)[(b_chan[l] + i) * w_co + t.w]
                       : Bits(0);
              reinterpret_cast<Bits*>(dst)[i] = v;
            }
          }
        } else {
          // One output channel, kVec consecutive k.
          const int c = e / 4;
          unsigned char* dst =
              Bs + stage * Cfg::kBStageBytes + mma_tile_offset<kMmaRowBytes, kE>(c, e % 4);
          const Index co = b_chan[l] * w_co;
          if (loads.b_vector) {
            const Tap t = tap_of(b_k[l], k0 + b_k0[l]);
            const bool live = t.chan >= 0 && chunk_live;
            cp_async_16(dst, w_group + (live ? co + t.w : 0), live);
          } else {
            Digits3 d = b_k[l];
            JAXCONV_UNROLL
            for (int i = 0; i < kVec; ++i) {
              const Tap t = tap_of(d, k0 + b_k0[l] + i);
              const Bits v = t.chan >= 0 && chunk_live
                                 ? reinterpret_cast<const Bits*>(w_group)[co + t.w]
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
    mma_mainloop<kKind, Cfg, MmaOperands<false, kMmaRowBytes, kBKMajor, kBPitch>>(
        acc, (p.K + BK - 1) / BK, load_stage, As, Bs, warp_m0, warp_n0, lane);

    mma_store_pass_tile<T, Cfg>(p, acc, row_out, g, n0, Index(p.os.c), bias, out, warp_m0, warp_n0,
                                lane);
    __syncthreads();  // the next tile rewrites the row tables
  }
}

// The pass with precomputed iterators (CUTLASS's "optimized" conv iterators): the instantiation
// for NHWC operands whose every chunk is one 16-byte copy (MmaLoads a_vector and b_vector), Cin
// a multiple of the stage's k (BK), fewer than 32 tap slots per axis, and int32 offsets
// (mma_pass_tap_applies). k = (th, tw, ci) with ci innermost, so a stage of BK consecutive k
// lies inside one tap and the whole block walks the reduction tap by tap:
//   stage s: tap (th, tw) = digits of s / (Cin / BK) (radix count_w: only the phase's own taps
//   are visited), ci = (s % (Cin / BK)) * BK.
// Once per tile each A chunk gets the offset of in[n, ih0, iw0, g*Cin + kc] (ih0 = u*step +
// off0; negative rows or columns are fine, the offset is formed only for live chunks) and two
// 32-bit masks, bit th of mh: ih0 + th*off_q inside [0, Hin) and th < count (likewise mw); each
// B chunk the offset of its output channel / k row. Each stage then adds one block-uniform tap
// offset (a_tap: th*off_q_h*is_h + tw*off_q_w*is_w + ci; b_tap: the weight offset of the tap
// and ci) to the per-chunk bases; the predicates change only when the tap does. All counters
// and offsets are int32.
template <typename T, typename Cfg, bool kBKMajor>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    conv_pass_mma_tap_kernel(PassParams p, const T* __restrict__ in, const T* __restrict__ w,
                             const T* __restrict__ bias, T* __restrict__ out) {
  using Types = MmaKernelTypes<T, Cfg>;
  using S = typename Types::S;
  constexpr MmaKind kKind = Types::kKind;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, MI = Cfg::MI, NI = Cfg::NI;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kVec = Types::kVec, BK = Types::BK, kE = Types::kE;  // BK: k per stage
  constexpr int kChunksA = Types::kChunksA, kChunksB = Types::kChunksB;
  constexpr int kBPitch = kBKMajor ? mma_k_major_pitch<S>(BN) : kMmaRowBytes;
  static_assert(!kBKMajor || sizeof(S) == 2, "ldmatrix.trans splits 32-bit values");
  static_assert(!kBKMajor || BK * kBPitch == Cfg::kBStageBytes, "k-major B fills a stage");

  JAXCONV_DYNAMIC_SHARED(smem);  // Cfg::kSharedBytes: the A stages, then the B stages
  unsigned char* const As = smem;
  unsigned char* const Bs = smem + Cfg::kStages * Cfg::kAStageBytes;
  __shared__ int row_out[BM];  // per output row: out offset, -1 outside `out`

  const MmaThread me = mma_thread<Cfg>();
  const int tid = me.tid, lane = me.lane, warp_m0 = me.warp_m0, warp_n0 = me.warp_n0;
  const int cin = int(p.Cin), w_ci = int(p.w_ci);

  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const MmaPassTile t = mma_pass_tile(p, tile, BM, BN);
    const PassAxis &ah = t.ah, &aw = t.aw;
    const int64_t g = t.g, m0 = t.m0, n0 = t.n0;

    for (int r = tid; r < BM; r += kThreads) {
      const int64_t m = m0 + r;
      row_out[r] = m < p.M ? int(mma_pass_row(p, t, m).out) : -1;
    }

    // A chunk e = tid + l * kThreads: row e / 4, k offset kc = (e % 4) * kVec of the stage.
    int a_base[kChunksA];
    uint32_t a_mh[kChunksA], a_mw[kChunksA];
    JAXCONV_UNROLL
    for (int l = 0; l < kChunksA; ++l) {
      const int e = tid + l * kThreads;
      const int64_t m = m0 + e / 4;
      a_base[l] = 0;
      a_mh[l] = a_mw[l] = 0;
      if (m < p.M) {
        const MmaPassRow row = mma_pass_row(p, t, m);
        const int64_t ih0 = row.u * ah.step + ah.off0, iw0 = row.v * aw.step + aw.off0;
        a_base[l] = int(row.n * p.is.n + ih0 * p.is.h + iw0 * p.is.w + g * p.Cin + (e % 4) * kVec);
        for (int64_t q = 0; q < ah.count; ++q) {
          const int64_t ih = ih0 + q * ah.off_q;
          if (ih >= 0 && ih < p.Hin) a_mh[l] |= 1u << q;
        }
        for (int64_t q = 0; q < aw.count; ++q) {
          const int64_t iw = iw0 + q * aw.off_q;
          if (iw >= 0 && iw < p.Win) a_mw[l] |= 1u << q;
        }
      }
    }
    // B chunk e: n-major, output channel n0 + e / 4 at k offset (e % 4) * kVec; k-major, k
    // offset e / (BN / 8) at output channels n0 + 8 * (e % (BN / 8)) ...; offsets into w,
    // the group's included.
    int b_base[kChunksB];
    uint32_t b_live = 0;
    JAXCONV_UNROLL
    for (int l = 0; l < kChunksB; ++l) {
      const int e = tid + l * kThreads;
      const int64_t kk = kBKMajor ? e / (BN / 8) : (e % 4) * kVec;
      const int64_t n = n0 + (kBKMajor ? (e % (BN / 8)) * 8 : e / 4);
      b_base[l] = int(g * p.w_group + (n < p.Cout ? n * p.w_co + kk * p.w_ci : 0));
      if (n < p.Cout) b_live |= 1u << l;
    }
    // Block-uniform tap walk over the taps this tile's phase has (th < count_h, tw < count_w;
    // bwd_data phases may have fewer than TH x TW, and those slots would only multiply zeros,
    // so they are not visited). Moving to the next tw adds a_tw / b_tw (and resets ci), to the
    // next th a_th / b_th (and resets tw).
    const int tw_count = int(aw.count);
    const int steps = int(ah.count) * tw_count * (cin / BK);
    const int a_tw = int(aw.off_q * p.is.w) - cin;
    const int a_th = int(ah.off_q * p.is.h - (aw.count - 1) * aw.off_q * p.is.w) - cin;
    const int b_tw = int(aw.cell_q * p.w_kw) - cin * w_ci;
    const int b_th = int(ah.cell_q * p.w_kh - (aw.count - 1) * aw.cell_q * p.w_kw) - cin * w_ci;
    int ci = 0, th = 0, tw = 0, a_tap = 0;
    int b_tap = int(ah.cell0 * p.w_kh + aw.cell0 * p.w_kw);
    // A predicated-off chunk still forms its source address (a_src + a_base) but cp.async
    // reads nothing there (src-size 0) and zero-fills its 16 shared bytes.
    // Whether A chunk l reads memory at the current tap; B chunks read at every tap visited.
    bool a_pred[kChunksA], b_pred[kChunksB];
    auto set_predicates = [&]() {
      JAXCONV_UNROLL
      for (int l = 0; l < kChunksA; ++l) a_pred[l] = (a_mh[l] >> th) & (a_mw[l] >> tw) & 1u;
    };
    set_predicates();
    JAXCONV_UNROLL
    for (int l = 0; l < kChunksB; ++l) b_pred[l] = (b_live >> l) & 1u;
    __syncthreads();  // row_out

    // Shared destinations: chunk l lies a constant distance past chunk 0 (kThreads is a
    // multiple of the chunks per row), so each stage forms one address per operand.
    // The swizzle repeats every 8 rows, and chunk l sits kThreads / 4 (n-major) or
    // kThreads / (BN / 8) (k-major) rows past chunk 0, a multiple of 8.
    const int a_dst = mma_tile_offset<kMmaRowBytes, kE>(tid / 4, tid % 4);
    constexpr int kADstStep = (kThreads / 4) * kMmaRowBytes;
    const int b_dst =
        kBKMajor ? mma_tile_offset<kBPitch, 2>(tid / (BN / 8), tid % (BN / 8)) : a_dst;
    constexpr int kBDstStep = kBKMajor ? (kThreads / (BN / 8)) * kBPitch : kADstStep;
    static_assert((kThreads / 4) % 8 == 0 && (kThreads / (BN / 8)) % 8 == 0,
                  "a thread's chunks share their swizzle");
    static_assert(kThreads % (BN / 8) == 0, "B chunks a constant distance apart");
    auto load_stage = [&](int stage, int) {
      unsigned char* a_stage = (As + stage * Cfg::kAStageBytes) + a_dst;
      unsigned char* b_stage = (Bs + stage * Cfg::kBStageBytes) + b_dst;
      JAXCONV_UNROLL
      for (int l = 0; l < kChunksA; ++l)
        cp_async_16(a_stage + l * kADstStep, in + (a_base[l] + a_tap), a_pred[l]);
      JAXCONV_UNROLL
      for (int l = 0; l < kChunksB; ++l)
        cp_async_16(b_stage + l * kBDstStep, w + (b_base[l] + b_tap), b_pred[l]);
      ci += BK;
      a_tap += BK;
      b_tap += BK * w_ci;
      if (ci == cin) {  // next tap
        ci = 0;
        if (++tw == tw_count) {
          tw = 0;
          ++th;
          a_tap += a_th;
          b_tap += b_th;
        } else {
          a_tap += a_tw;
          b_tap += b_tw;
        }
        set_predicates();
      }
    };

    float acc[MI][NI][4];
    mma_mainloop<kKind, Cfg, MmaOperands<false, kMmaRowBytes, kBKMajor, kBPitch>>(
        acc, steps, load_stage, As, Bs, warp_m0, warp_n0, lane);

    if constexpr (sizeof(T) == 2)
      mma_store_pass_tile_staged<T, Cfg>(p, acc, row_out, g, n0, bias, out, smem, warp_m0, warp_n0,
                                         lane, tid);
    else
      mma_store_pass_tile<T, Cfg>(p, acc, row_out, g, n0, 1, bias, out, warp_m0, warp_n0, lane);
    __syncthreads();  // the next tile rewrites row_out and the stage buffers
  }
}

}  // namespace jaxconv::cuda
