// Tensor-core kernels, level 4: bwd_filter as an implicit GEMM (rows o, columns k, reduction over
// the positions of one split): the general kernel and the precomputed-iterator kernel for
// 16-byte NHWC operands.
//
// FilterParams, FilterTileSpan, filter_tile_span and filter_columns come from
// conv2d_problem.cuh.
#pragma once

#include <type_traits>

#include "conv2d_mma_mainloop.cuh"
#include "conv2d_problem.cuh"

namespace jaxconv::cuda {

// The bwd_filter epilogue: block-tile row r is output channel o = m0 + r of group g (written
// while o < Og), column c the dW offset col_w[c] (written while col_x[c] >= 0). With
// splits == 1 the value is rounded into dw; otherwise stored, float32, into partial[split].
template <typename T, typename Cfg, typename Index>
__device__ __forceinline__ void mma_store_filter_tile(
    const FilterParams& p, const float (&acc)[Cfg::MI][Cfg::NI][4], const Index* col_x,
    const Index* col_w, int64_t g, int64_t m0, int64_t split, T* __restrict__ dw,
    float* __restrict__ partial, int warp_m0, int warp_n0, int lane) {
  float* part = p.splits > 1 ? partial + split * p.dw_elems : nullptr;
  mma_store_accumulators<Cfg>(
      acc, warp_m0, warp_n0, lane,
      [&](int r) -> Index {
        const int64_t o = m0 + r;
        return o < p.Og ? Index(g * p.Og + o) * Index(p.ws.n) : Index(-1);
      },
      [&](Index base, int c, float v) {
        if (col_x[c] < 0) return;
        const Index off = base + col_w[c];
        if (part)
          part[off] = v;
        else
          dw[off] = Num<T>::store(v);
      });
}

// bwd_filter on tensor cores: per group g, dW[o, k] = sum over positions p = (n, oh, ow) of
// dy[p, o] * im2col(x)[p, k], a GEMM with rows m = o (Og), columns k (Kg, dW's own order within a
// group: NCHW (ci, kh, kw), NHWC (kh, kw, ci)) and the reduction over the positions of one
// split [p_begin, p_end) (FilterParams; the split plan is conv2d_plan.cuh's plan_filter). The
// block tile, warps, stages, fragments and multiply are the pass kernel's (mma_mainloop); only
// the operands' origin differs:
//   NHWC: dy[p, o] and x[n, ih, iw, ci] are contiguous along o and ci, so both operands are
//     staged k-major (rows of one position: [p][BM] of dy, [p][BN] of im2col(x)); a 16-byte
//     chunk is kVec output channels of one position (cp.async when Og % kVec == 0) or kVec
//     columns k of one tap (cp.async when Cg % kVec == 0: the chunk's ci are consecutive).
//   NCHW: dy[n, o, oh, ow] is contiguous along positions within an image, so A is m-major
//     ([o][positions], cp.async when OH * OW % kVec == 0: a chunk never crosses an image);
//     im2col(x) is n-major ([k][positions]), gathered element by element.
// ih = oh * stride_h + kh * dilation_h - pad_top (and likewise iw); a tap outside x reads zero.
// With splits == 1 the tile is rounded into dw; otherwise it is stored, float32, into
// partial[split] (laid out like dw) for sum_partials_kernel, which adds the splits in order.
// Index as for the pass kernel: int32_t where x, dy and dw each have fewer than 2^31 elements.
// Compiled for one block per SM: with no minimum, ptxas capped the int64 NHWC 64x64 instance
// at 168 registers and spilled 8 bytes (test_sass's no-local-memory check).
template <typename T, typename Cfg, int kLayout, typename Index>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    conv_filter_mma_kernel(FilterParams p, MmaLoads loads, const T* __restrict__ x,
                           const T* __restrict__ dy, T* __restrict__ dw,
                           float* __restrict__ partial) {
  using Types = MmaKernelTypes<T, Cfg>;
  using S = typename Types::S;
  using Bits = typename Types::Bits;
  constexpr MmaKind kKind = Types::kKind;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, MI = Cfg::MI, NI = Cfg::NI;
  constexpr int kThreads = Cfg::kThreads;
  constexpr bool kKMajor = kLayout == kNHWC;  // both operands staged by position rows
  constexpr int kVec = Types::kVec, BK = Types::BK, kE = Types::kE;  // BK: positions per stage
  constexpr int kChunksA = Types::kChunksA, kChunksB = Types::kChunksB;
  constexpr int kAPitch = kKMajor ? mma_k_major_pitch<S>(BM) : kMmaRowBytes;
  constexpr int kBPitch = kKMajor ? mma_k_major_pitch<S>(BN) : kMmaRowBytes;
  static_assert(
      !kKMajor || (BK * kAPitch == Cfg::kAStageBytes && BK * kBPitch == Cfg::kBStageBytes),
      "k-major tiles fit the stage buffers");

  JAXCONV_DYNAMIC_SHARED(smem);  // Cfg::kSharedBytes: the A stages, then the B stages
  unsigned char* const As = smem;
  unsigned char* const Bs = smem + Cfg::kStages * Cfg::kAStageBytes;
  // Per tile, per column k: channel offset into x (-1 past Kg), the tap's offsets
  // kh * dilation_h - pad_top and kw * dilation_w - pad_left, and the offset within dW.
  __shared__ Index col_x[BN], col_dh[BN], col_dw[BN], col_w[BN];

  const MmaThread me = mma_thread<Cfg>();
  const int tid = me.tid, lane = me.lane, warp_m0 = me.warp_m0, warp_n0 = me.warp_n0;
  // Position digits (n, oh, ow), radices (OH, OW).
  const Digits3 stage_step = split_index(BK, p.OH, p.OW), unit_step = split_index(1, p.OH, p.OW);
  const Index x_h = Index(p.H), x_w = Index(p.W), s_h = Index(p.stride_h), s_w = Index(p.stride_w);
  const Index xs_n = Index(p.xs.n), xs_h = Index(p.xs.h), xs_w = Index(p.xs.w);
  const Index ys_n = Index(p.ys.n), ys_c = Index(p.ys.c), ys_h = Index(p.ys.h),
              ys_w = Index(p.ys.w);

  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const FilterTileSpan t = filter_tile_span(p, tile, BM, BN);
    const int64_t g = t.g, m0 = t.m0, n0 = t.n0, split = t.split, p_begin = t.p_begin,
                  p_end = t.p_end;
    filter_columns<kKMajor>(p, g, n0, BN, tid, kThreads, col_x, col_dh, col_dw, col_w);
    __syncthreads();

    // Once per tile, in registers: the position (offset from the stage's first, and digits)
    // that each of this thread's chunks starts at in the next stage to load; each A chunk's
    // dy channel offset (its first output channel) and each B chunk's column (channel offset
    // and tap offsets of its first column k); and the predicate masks, bit l for chunk l:
    // a_live (that output channel is below Og), b_live (that column is below Kg).
    // k-major chunk e = tid + l * kThreads: position row e / (BX / kVec), columns
    // kVec * (e % (BX / kVec)) ...; m/n-major chunk e: row e / 4, positions (e % 4) * kVec ...
    Digits3 a_pd[kChunksA], b_pd[kChunksB];
    int a_p0[kChunksA], b_p0[kChunksB];
    Index a_chan[kChunksA], b_x[kChunksB], b_dh[kChunksB], b_dw[kChunksB];
    uint32_t a_live = 0, b_live = 0;
    JAXCONV_UNROLL
    for (int l = 0; l < kChunksA; ++l) {
      const int e = tid + l * kThreads;
      a_p0[l] = kKMajor ? e / (BM / kVec) : (e % 4) * kVec;
      a_pd[l] = split_index(p_begin + a_p0[l], p.OH, p.OW);
      const int64_t o = m0 + (kKMajor ? (e % (BM / kVec)) * kVec : e / 4);
      a_chan[l] = o < p.Og ? Index(g * p.Og + o) * ys_c : Index(0);
      if (o < p.Og) a_live |= 1u << l;
    }
    JAXCONV_UNROLL
    for (int l = 0; l < kChunksB; ++l) {
      const int e = tid + l * kThreads;
      b_p0[l] = kKMajor ? e / (BN / kVec) : (e % 4) * kVec;
      b_pd[l] = split_index(p_begin + b_p0[l], p.OH, p.OW);
      const int c = kKMajor ? (e % (BN / kVec)) * kVec : e / 4;
      b_x[l] = col_x[c];
      b_dh[l] = col_dh[c];
      b_dw[l] = col_dw[c];
      if (b_x[l] >= 0) b_live |= 1u << l;
    }

    // Offset of dy[position (digits d, index pos), channel offset chan], or -1 past the split.
    auto dy_offset = [&](Digits3 d, int64_t pos, Index chan) -> Index {
      if (pos >= p_end) return -1;
      return Index(d.a) * ys_n + Index(d.b) * ys_h + Index(d.c) * ys_w + chan;
    };
    // Offset of im2col(x)[position, column (chan, dh, dw)], or -1 (past the split, padding).
    auto x_offset = [&](Digits3 d, int64_t pos, Index chan, Index dh, Index dwo) -> Index {
      if (pos >= p_end) return -1;
      const Index ih = Index(d.b) * s_h + dh, iw = Index(d.c) * s_w + dwo;
      if (ih < 0 || ih >= x_h || iw < 0 || iw >= x_w) return -1;
      return Index(d.a) * xs_n + chan + ih * xs_h + iw * xs_w;
    };

    auto load_stage = [&](int stage, int64_t step) {
      const int64_t pos0 = p_begin + step * BK;
      JAXCONV_UNROLL
      for (int l = 0; l < kChunksA; ++l) {
        const int e = tid + l * kThreads;
        const int64_t pos = pos0 + a_p0[l];
        const bool chunk_live = (a_live >> l) & 1u;
        if constexpr (kKMajor) {  // one position, kVec output channels from a_chan[l]
          const int c = (e % (BM / kVec)) * kVec;
          unsigned char* dst =
              As + stage * Cfg::kAStageBytes + mma_tile_offset<kAPitch, kE>(a_p0[l], c / kVec);
          if (loads.a_vector) {  // Og % kVec == 0: the whole chunk is live or not
            const Index off = chunk_live ? dy_offset(a_pd[l], pos, a_chan[l]) : Index(-1);
            cp_async_16(dst, dy + (off < 0 ? 0 : off), off >= 0);
          } else {
            JAXCONV_UNROLL
            for (int i = 0; i < kVec; ++i) {
              const Index off = chunk_live && m0 + c + i < p.Og
                                    ? dy_offset(a_pd[l], pos, a_chan[l] + Index(i) * ys_c)
                                    : Index(-1);
              reinterpret_cast<Bits*>(dst)[i] =
                  off < 0 ? Bits(0) : reinterpret_cast<const Bits*>(dy)[off];
            }
          }
        } else {  // one output channel, kVec positions
          const int r = e / 4;
          unsigned char* dst =
              As + stage * Cfg::kAStageBytes + mma_tile_offset<kMmaRowBytes, kE>(r, e % 4);
          if (loads.a_vector) {
            const Index off = chunk_live ? dy_offset(a_pd[l], pos, a_chan[l]) : Index(-1);
            cp_async_16(dst, dy + (off < 0 ? 0 : off), off >= 0);
          } else {
            Digits3 d = a_pd[l];
            JAXCONV_UNROLL
            for (int i = 0; i < kVec; ++i) {
              const Index off = chunk_live ? dy_offset(d, pos + i, a_chan[l]) : Index(-1);
              reinterpret_cast<Bits*>(dst)[i] =
                  off < 0 ? Bits(0) : reinterpret_cast<const Bits*>(dy)[off];
              d = add_digits(d, unit_step, p.OH, p.OW);
            }
          }
        }
        a_pd[l] = add_digits(a_pd[l], stage_step, p.OH, p.OW);
      }
      JAXCONV_UNROLL
      for (int l = 0; l < kChunksB; ++l) {
        const int e = tid + l * kThreads;
        const int64_t pos = pos0 + b_p0[l];
        const bool chunk_live = (b_live >> l) & 1u;
        if constexpr (kKMajor) {  // one position, kVec columns k
          const int c = (e % (BN / kVec)) * kVec;
          unsigned char* dst =
              Bs + stage * Cfg::kBStageBytes + mma_tile_offset<kBPitch, kE>(b_p0[l], c / kVec);
          if (loads.b_vector) {  // Cg % kVec == 0: one tap, consecutive ci, all live or not
            const Index off =
                chunk_live ? x_offset(b_pd[l], pos, b_x[l], b_dh[l], b_dw[l]) : Index(-1);
            cp_async_16(dst, x + (off < 0 ? 0 : off), off >= 0);
          } else {  // columns of several taps: each its own table entry
            JAXCONV_UNROLL
            for (int i = 0; i < kVec; ++i) {
              const Index chan = col_x[c + i];
              const Index off = chan >= 0
                                    ? x_offset(b_pd[l], pos, chan, col_dh[c + i], col_dw[c + i])
                                    : Index(-1);
              reinterpret_cast<Bits*>(dst)[i] =
                  off < 0 ? Bits(0) : reinterpret_cast<const Bits*>(x)[off];
            }
          }
        } else {  // one column k, kVec positions (gathered: x is not contiguous along them)
          const int c = e / 4;
          unsigned char* dst =
              Bs + stage * Cfg::kBStageBytes + mma_tile_offset<kMmaRowBytes, kE>(c, e % 4);
          Digits3 d = b_pd[l];
          JAXCONV_UNROLL
          for (int i = 0; i < kVec; ++i) {
            const Index off =
                chunk_live ? x_offset(d, pos + i, b_x[l], b_dh[l], b_dw[l]) : Index(-1);
            reinterpret_cast<Bits*>(dst)[i] =
                off < 0 ? Bits(0) : reinterpret_cast<const Bits*>(x)[off];
            d = add_digits(d, unit_step, p.OH, p.OW);
          }
        }
        b_pd[l] = add_digits(b_pd[l], stage_step, p.OH, p.OW);
      }
    };

    float acc[MI][NI][4];
    mma_mainloop<kKind, Cfg, MmaOperands<kKMajor, kAPitch, kKMajor, kBPitch>>(
        acc, (p_end - p_begin + BK - 1) / BK, load_stage, As, Bs, warp_m0, warp_n0, lane);

    mma_store_filter_tile<T, Cfg, Index>(p, acc, col_x, col_w, g, m0, split, dw, partial, warp_m0,
                                         warp_n0, lane);
    __syncthreads();  // the next tile rewrites the column tables
  }
}

// bwd_filter NHWC with precomputed iterators: the instantiation for 16-byte chunks of both
// operands (MmaLoads a_vector and b_vector), dy dense along positions (ys.h == OW * ys.w,
// ys.n == OH * ys.h) and int32 offsets (mma_filter_pos_applies). Both operands are staged
// k-major, one position per shared row, as in conv_filter_mma_kernel; chunk e = tid + l *
// kThreads covers position row e / (BX / 8) (BX / kVec for the float32 x tile) of the stage.
// Once per tile: each dy chunk's offset (position p_begin + row, its kVec output channels),
// advanced by BK * ys.w per stage; each x chunk's column (channel offset and tap offsets dh, dw,
// shared by the thread's chunks, which sit kThreads / (BN / kVec) rows apart in the same
// columns) and, per chunk, its position as (oh, ow) and the offset of x[n, oh * s_h + dh,
// ow * s_w + dw, chan], advanced per stage by the constant digits of BK positions with at most
// one carry per digit. A chunk is live while its position is below p_end (one compare against
// the block-uniform count of positions left) and, for x, while ih, iw are inside the image.
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    conv_filter_mma_pos_kernel(FilterParams p, const T* __restrict__ x, const T* __restrict__ dy,
                               T* __restrict__ dw, float* __restrict__ partial) {
  using Types = MmaKernelTypes<T, Cfg>;
  using S = typename Types::S;
  constexpr MmaKind kKind = Types::kKind;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, MI = Cfg::MI, NI = Cfg::NI;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kVec = Types::kVec, BK = Types::BK, kE = Types::kE;  // BK: positions per stage
  constexpr int kChunksA = Types::kChunksA, kChunksB = Types::kChunksB;
  constexpr int kAPitch = mma_k_major_pitch<S>(BM), kBPitch = mma_k_major_pitch<S>(BN);
  constexpr int kARowChunks = BM / kVec, kBRowChunks = BN / kVec;  // chunks per position row
  static_assert(BK * kAPitch == Cfg::kAStageBytes && BK * kBPitch == Cfg::kBStageBytes,
                "k-major tiles fit the stage buffers");
  static_assert(kThreads % kARowChunks == 0 && kThreads % kBRowChunks == 0,
                "a thread's chunks share their columns");

  JAXCONV_DYNAMIC_SHARED(smem);  // Cfg::kSharedBytes: the A stages, then the B stages
  unsigned char* const As = smem;
  unsigned char* const Bs = smem + Cfg::kStages * Cfg::kAStageBytes;
  __shared__ int col_x[BN], col_dh[BN], col_dw[BN], col_w[BN];

  const MmaThread me = mma_thread<Cfg>();
  const int tid = me.tid, lane = me.lane, warp_m0 = me.warp_m0, warp_n0 = me.warp_n0;
  const int oh_count = int(p.OH), ow_count = int(p.OW), x_h = int(p.H), x_w = int(p.W);
  const int s_h = int(p.stride_h), s_w = int(p.stride_w);
  // BK positions as digits (n, oh, ow) (each below its radix: at most one carry per digit) and
  // what each digit and carry adds to an x offset.
  const Digits3 step = split_index(BK, p.OH, p.OW);
  const int d_ih = int(step.b * p.stride_h), d_iw = int(step.c * p.stride_w);
  const int x_step =
      int(step.a * p.xs.n + step.b * p.stride_h * p.xs.h + step.c * p.stride_w * p.xs.w);
  const int x_carry_w = int(p.stride_h * p.xs.h - p.OW * p.stride_w * p.xs.w);
  const int x_carry_h = int(p.xs.n - p.OH * p.stride_h * p.xs.h);
  const int y_step = int(BK * p.ys.w);

  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const FilterTileSpan t = filter_tile_span(p, tile, BM, BN);
    const int64_t g = t.g, m0 = t.m0, n0 = t.n0, split = t.split, p_begin = t.p_begin,
                  p_end = t.p_end;
    filter_columns<true>(p, g, n0, BN, tid, kThreads, col_x, col_dh, col_dw, col_w);
    __syncthreads();

    // dy chunk l: position row e / kARowChunks, output channels m0 + kVec * (e % kARowChunks) ..
    // Liveness is folded into a row limit: the chunk reads while a_row[l] < left (positions
    // left from the stage's first on); a chunk past Og gets a row no count reaches.
    constexpr int kDeadRow = 1 << 30;
    int a_off[kChunksA], a_row[kChunksA];
    JAXCONV_UNROLL
    for (int l = 0; l < kChunksA; ++l) {
      const int e = tid + l * kThreads;
      const int64_t o = m0 + (e % kARowChunks) * kVec;
      a_off[l] = int((p_begin + e / kARowChunks) * p.ys.w + (g * p.Og + o) * p.ys.c);
      a_row[l] = o < p.Og ? e / kARowChunks : kDeadRow;
    }
    // x chunks: one column group c (shared: channel offset, tap offsets dh, dw), rows
    // e / kBRowChunks; per chunk the input row and column ih = oh * s_h + dh, iw = ow * s_w + dw
    // of its position and its x offset. Moving on by BK positions adds (d_ih, d_iw, x_step);
    // iw past its last output column (iw >= OW * s_w + dw) wraps back by OW * s_w into the next
    // output row, ih past its last likewise into the next image.
    const int c = (tid % kBRowChunks) * kVec;
    const int b_dh = col_dh[c], b_dw = col_dw[c];
    const bool b_col_live = col_x[c] >= 0;
    const int iw_wrap = ow_count * s_w + b_dw, ih_wrap = oh_count * s_h + b_dh;
    int b_row[kChunksB], b_ih[kChunksB], b_iw[kChunksB], b_off[kChunksB];
    JAXCONV_UNROLL
    for (int l = 0; l < kChunksB; ++l) {
      const int e = tid + l * kThreads;
      const Digits3 d = split_index(p_begin + e / kBRowChunks, p.OH, p.OW);
      b_row[l] = b_col_live ? e / kBRowChunks : kDeadRow;
      b_ih[l] = int(d.b * p.stride_h + b_dh);
      b_iw[l] = int(d.c * p.stride_w + b_dw);
      b_off[l] =
          int(d.a * p.xs.n + b_ih[l] * p.xs.h + b_iw[l] * p.xs.w + (b_col_live ? col_x[c] : 0));
    }
    int left = int(p_end - p_begin);  // positions from the next stage's first on

    // Shared destinations a constant distance apart (see the pass's tap kernel); a
    // predicated-off chunk forms its source address but cp.async reads nothing there.
    // (The swizzle repeats every 8 rows, 4 for float32; chunk l sits a multiple of that past
    // chunk 0.)
    const int a_dst = mma_tile_offset<kAPitch, kE>(tid / kARowChunks, tid % kARowChunks);
    const int b_dst = mma_tile_offset<kBPitch, kE>(tid / kBRowChunks, tid % kBRowChunks);
    static_assert((kThreads / kARowChunks) % (kE == 2 ? 8 : 4) == 0 &&
                      (kThreads / kBRowChunks) % (kE == 2 ? 8 : 4) == 0,
                  "a thread's chunks share their swizzle");
    constexpr int kADstStep = (kThreads / kARowChunks) * kAPitch;
    constexpr int kBDstStep = (kThreads / kBRowChunks) * kBPitch;
    auto load_stage = [&](int stage, int) {
      unsigned char* a_stage = (As + stage * Cfg::kAStageBytes) + a_dst;
      unsigned char* b_stage = (Bs + stage * Cfg::kBStageBytes) + b_dst;
      JAXCONV_UNROLL
      for (int l = 0; l < kChunksA; ++l) {
        cp_async_16(a_stage + l * kADstStep, dy + a_off[l], a_row[l] < left);
        a_off[l] += y_step;
      }
      JAXCONV_UNROLL
      for (int l = 0; l < kChunksB; ++l) {
        const bool live = b_row[l] < left && unsigned(b_ih[l]) < unsigned(x_h) &&
                          unsigned(b_iw[l]) < unsigned(x_w);
        cp_async_16(b_stage + l * kBDstStep, x + b_off[l], live);
        b_iw[l] += d_iw;
        b_ih[l] += d_ih;
        b_off[l] += x_step;
        if (b_iw[l] >= iw_wrap) {
          b_iw[l] -= ow_count * s_w;
          b_ih[l] += s_h;
          b_off[l] += x_carry_w;
        }
        if (b_ih[l] >= ih_wrap) {
          b_ih[l] -= oh_count * s_h;
          b_off[l] += x_carry_h;
        }
      }
      left -= BK;
    };

    float acc[MI][NI][4];
    mma_mainloop<kKind, Cfg, MmaOperands<true, kAPitch, true, kBPitch>>(
        acc, int((p_end - p_begin + BK - 1) / BK), load_stage, As, Bs, warp_m0, warp_n0, lane);

    mma_store_filter_tile<T, Cfg, int>(p, acc, col_x, col_w, g, m0, split, dw, partial, warp_m0,
                                       warp_n0, lane);
    __syncthreads();  // the next tile rewrites the column tables and the stage buffers
  }
}

}  // namespace jaxconv::cuda
