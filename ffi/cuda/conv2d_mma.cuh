// Tensor-core kernels (sm_80+): forward and bwd_data of conv2d_kernels.cuh's "pass", and
// bwd_filter, as implicit GEMMs on mma.sync, for bfloat16/float16 operands (m16n8k16) and
// float32 operands rounded to TF32 (m16n8k8), always accumulating in float32. Included by
// conv2d_kernels.cuh after PassParams and FilterParams; the index math (pass: rows
// m = (n, u, v), reduction k over the layout's (ci, tap) order, taps per bwd_data phase from
// geometry.h; bwd_filter: rows o, columns k, reduction over positions of one split) is the SIMT
// kernels', only the multiply changes. Both kernels share the fragment loaders and the staged
// main loop (mma_mainloop) below; they differ in how a stage is loaded.
//
// Block tile BM x BN (output rows x output channels of one group), split over
// kWarpsM x kWarpsN warps; each warp owns a (BM / kWarpsM) x (BN / kWarpsN) piece as MI x NI
// tiles of 16 x 8 accumulators. The reduction advances one stage of 64 bytes of k per row at a
// time (32 16-bit values or 16 floats: two mma k-steps), through Cfg::kStages shared-memory
// buffers filled with cp.async, so the loads of stages s + 1 .. s + kStages - 1 run while stage
// s is multiplied.
//
// Shared layouts (byte pitches chosen so that the 8 row addresses of one ldmatrix fall into 8
// distinct groups of 4 banks, i.e. no bank conflicts):
//   A: [BM][80 bytes], row m holds the stage's k values of output row m (k contiguous).
//   B, n-major: [BN][80 bytes], row n holds the stage's k values of output channel n; read with
//      ldmatrix (the mma's "col" B operand is exactly B^T rows).
//   B, k-major (16-bit types with weights contiguous along output channels, i.e. HWIO forward):
//      [32][(BN + 8) * 2 bytes], row k holds BN channels; read with ldmatrix.trans.
//   bwd_filter NHWC stages both operands k-major (rows of one position); TF32 k-major
//      fragments are read as single shared words ([16][(BX + 8) * 4 bytes]).
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

template <int BM_, int BN_, int kWarpsM_, int kWarpsN_, int kStages_>
struct MmaTile {
  static constexpr int BM = BM_, BN = BN_, kWarpsM = kWarpsM_, kWarpsN = kWarpsN_;
  static constexpr int kStages = kStages_;  // shared-memory buffers of the cp.async pipeline
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWarpRows = BM / kWarpsM, kWarpCols = BN / kWarpsN;
  static constexpr int MI = kWarpRows / 16, NI = kWarpCols / 8;
  static_assert(kWarpRows % 16 == 0 && kWarpCols % 16 == 0, "B fragments load in pairs");
  static_assert((BM * 4) % kThreads == 0 && (BN * 4) % kThreads == 0,
                "each thread copies the same number of 16-byte chunks");
  static_assert(kStages >= 2, "a stage loads while another is multiplied");
};

// Large layers: 8 warps of 64 x 32, 2 stages (a third would take the block's static shared
// memory past the 48 KB limit: 3 x 2 x 10 KB + row tables). Small layers (few output rows or
// channels, where 128-wide tiles would leave most SMs idle or compute padding): 4 warps of
// 32 x 32, 3 stages (32 KB), so two loads are in flight while a stage is multiplied.
using MmaLargeTile = MmaTile<128, 128, 2, 4, 2>;
using MmaSmallTile = MmaTile<64, 64, 2, 2, 3>;

constexpr int kMmaRowBytes = 64;    // k bytes per row and stage
constexpr int kMmaPitchBytes = 80;  // 20 words: 8 rows start at banks 0, 20, 8, 28, 16, 4, 24, 12

// How the loads of one launch run; decided on the host (mma_pass_loads, mma_filter_loads).
struct MmaLoads {
  int a_vector;  // A chunks as one 16-byte copy (NHWC, channels per group % vector == 0)
  int b_vector;  // B chunks as one 16-byte copy
};

// Pitch in bytes of a k-major operand tile (rows of one k, `cols` m or n values each). Eight
// values of padding: 16-bit rows start 4 banks apart, so the 8 row addresses of an
// ldmatrix.trans hit 8 distinct groups of 4 banks; 32-bit rows start 8 banks apart, so the
// words (k = t, t + 4; col = g) of a TF32 fragment, bank 8t + g, are 32 distinct banks.
template <typename S>
constexpr int mma_k_major_pitch(int cols) {
  return (cols + 8) * int(sizeof(S));
}

// One 32-bit word of a k-major tile: row k, column `col` (TF32 fragments, which ldmatrix.trans
// cannot gather because it moves 16-bit halves).
__device__ __forceinline__ uint32_t mma_tile_word(const unsigned char* tile, int pitch, int k,
                                                  int col) {
  return *reinterpret_cast<const uint32_t*>(tile + k * pitch + col * 4);
}

// A fragments (MI tiles of 16 rows from row m0) for mma k-step ks (32 bytes of k) of one stage.
//   m-major tile ([m][kMmaPitchBytes], k contiguous): ldmatrix; lanes 0-15 give rows 0-15 at k
//     bytes 0-15, lanes 16-31 the same rows at bytes 16-31 (a[0..3] = rows 0-7 / 8-15 x k
//     low / high, the mma A layout; for 32-bit values the word [l/4][l%4], the TF32 layout).
//   k-major tile ([k][kPitch], m contiguous), 16-bit: ldmatrix.trans of the four 8 x 8 blocks
//     (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15); lane l gives row
//     k = 8(l/16) + l%8 of block l/8, whose transpose hands lane 4g + t A[g][2t..2t+1].
//   k-major, TF32: a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4],
//     one shared word each.
template <MmaKind kKind, int MI, bool kKMajor, int kPitch>
__device__ __forceinline__ void load_a_fragments(uint32_t (&a)[MI][4], const unsigned char* tile,
                                                 int m0, int ks, int lane) {
  JAXCONV_UNROLL
  for (int i = 0; i < MI; ++i) {
    const int m = m0 + i * 16;
    if constexpr (!kKMajor) {
      ldmatrix<4>(a[i], tile + (m + lane % 16) * kMmaPitchBytes + ks * 32 + (lane / 16) * 16);
    } else if constexpr (kKind != MmaKind::kTf32) {
      ldmatrix<4, true>(a[i], tile + (ks * 16 + (lane / 16) * 8 + lane % 8) * kPitch +
                                  (m + ((lane / 8) % 2) * 8) * 2);
    } else {
      const int k = ks * 8 + lane % 4, r = m + lane / 4;
      a[i][0] = mma_tile_word(tile, kPitch, k, r);
      a[i][1] = mma_tile_word(tile, kPitch, k, r + 8);
      a[i][2] = mma_tile_word(tile, kPitch, k + 4, r);
      a[i][3] = mma_tile_word(tile, kPitch, k + 4, r + 8);
    }
  }
}

// B fragments (NI tiles of 8 columns from column n0) for mma k-step ks of one stage.
//   n-major tile ([n][kMmaPitchBytes], k contiguous; the mma's "col" B operand is exactly B^T
//     rows): ldmatrix of (channels 0-7, k low), (0-7, k high), (8-15, low), (8-15, high) of the
//     pair of n8 tiles j, j + 1: registers b[j][0], b[j][1], b[j+1][0], b[j+1][1].
//   k-major tile ([k][kPitch], n contiguous), 16-bit: the same four blocks by ldmatrix.trans.
//   k-major, TF32: b[0] = B[t][g], b[1] = B[t+4][g], one shared word each.
template <MmaKind kKind, int NI, bool kKMajor, int kPitch>
__device__ __forceinline__ void load_b_fragments(uint32_t (&b)[NI][2], const unsigned char* tile,
                                                 int n0, int ks, int lane) {
  if constexpr (kKMajor && kKind == MmaKind::kTf32) {
    JAXCONV_UNROLL
    for (int j = 0; j < NI; ++j) {
      const int k = ks * 8 + lane % 4, c = n0 + j * 8 + lane / 4;
      b[j][0] = mma_tile_word(tile, kPitch, k, c);
      b[j][1] = mma_tile_word(tile, kPitch, k + 4, c);
    }
  } else {
    JAXCONV_UNROLL
    for (int j = 0; j < NI; j += 2) {
      uint32_t r[4];
      if constexpr (kKMajor)
        ldmatrix<4, true>(r, tile + (ks * 16 + ((lane / 8) % 2) * 8 + lane % 8) * kPitch +
                                 (n0 + j * 8 + (lane / 16) * 8) * 2);
      else
        ldmatrix<4>(r, tile + (n0 + j * 8 + (lane / 16) * 8 + lane % 8) * kMmaPitchBytes + ks * 32 +
                           ((lane / 8) % 2) * 16);
      b[j][0] = r[0];
      b[j][1] = r[1];
      b[j + 1][0] = r[2];
      b[j + 1][1] = r[3];
    }
  }
}

// The operand layouts of one kernel instantiation: whether A (B) is staged k-major and the
// byte pitch of its rows.
template <bool kAKMajor_, int kAPitch_, bool kBKMajor_, int kBPitch_>
struct MmaOperands {
  static constexpr bool kAKMajor = kAKMajor_, kBKMajor = kBKMajor_;
  static constexpr int kAPitch = kAPitch_, kBPitch = kBPitch_;
};

// The reduction of a block tile: `steps` stages of kMmaRowBytes of k each, loaded in order by
// load_stage(buffer, s) (cp.async into As/Bs + buffer * stage bytes; plain shared stores for
// gathers) up to Cfg::kStages - 1 stages ahead of the one multiplied, with one barrier per
// stage. One commit group per stage, so at the top of iteration s (kStages - 1 + s groups
// committed) "at most kStages - 2 groups pending" means stage s has landed for this thread, and
// the barrier after that wait means for every thread. The barrier also means every thread has
// finished iteration s - 1's multiply, so buffer (s - 1) % kStages = (s + kStages - 1) %
// kStages may be refilled right after it, while stage s is multiplied. Each warp multiplies its
// (MI * 16) x (NI * 8) piece at (warp_m0, warp_n0) into acc (float32, zeroed here). Leaves no
// cp.async group in flight; the caller must __syncthreads before the buffers are written again
// (the next tile's first loads). Step: int for the int32 kernels (32-bit loop counters).
template <MmaKind kKind, typename Cfg, typename Ops, typename Step, typename LoadStage>
__device__ __forceinline__ void mma_mainloop(float (&acc)[Cfg::MI][Cfg::NI][4], Step steps,
                                             LoadStage&& load_stage, const unsigned char* As,
                                             const unsigned char* Bs, int warp_m0, int warp_n0,
                                             int lane) {
  constexpr int MI = Cfg::MI, NI = Cfg::NI;
  constexpr int kAStageBytes = Cfg::BM * kMmaPitchBytes, kBStageBytes = Cfg::BN * kMmaPitchBytes;
  JAXCONV_UNROLL
  for (int i = 0; i < MI; ++i) JAXCONV_UNROLL
  for (int j = 0; j < NI; ++j) JAXCONV_UNROLL
  for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

  constexpr int kStages = Cfg::kStages;
  JAXCONV_UNROLL
  for (int s = 0; s < kStages - 1; ++s) {  // the first kStages - 1 stages
    if (s < steps) load_stage(s, Step(s));
    cp_async_commit();  // possibly empty, so that group g is always stage g
  }
  int read = 0, write = kStages - 1;  // buffers of stage s and of stage s + kStages - 1
  for (Step s = 0; s < steps; ++s) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage s is in shared memory; stage s - 1 is read by every warp
    if (s + (kStages - 1) < steps) load_stage(write, s + (kStages - 1));
    cp_async_commit();  // possibly empty, as above
    write = write == kStages - 1 ? 0 : write + 1;

    const unsigned char* a_tile = As + read * kAStageBytes;
    const unsigned char* b_tile = Bs + read * kBStageBytes;
    read = read == kStages - 1 ? 0 : read + 1;
    JAXCONV_UNROLL
    for (int ks = 0; ks < 2; ++ks) {  // two mma k-steps of 32 bytes
      uint32_t a[MI][4], b[NI][2];
      load_a_fragments<kKind, MI, Ops::kAKMajor, Ops::kAPitch>(a, a_tile, warp_m0, ks, lane);
      load_b_fragments<kKind, NI, Ops::kBKMajor, Ops::kBPitch>(b, b_tile, warp_n0, ks, lane);
      if constexpr (kKind == MmaKind::kTf32) {
        JAXCONV_UNROLL
        for (int i = 0; i < MI; ++i) JAXCONV_UNROLL
        for (int q = 0; q < 4; ++q) a[i][q] = to_tf32(a[i][q]);
        JAXCONV_UNROLL
        for (int j = 0; j < NI; ++j) JAXCONV_UNROLL
        for (int q = 0; q < 2; ++q) b[j][q] = to_tf32(b[j][q]);
      }
      JAXCONV_UNROLL
      for (int i = 0; i < MI; ++i) JAXCONV_UNROLL
      for (int j = 0; j < NI; ++j) mma<kKind>(acc[i][j], a[i], b[j]);
    }
  }
  cp_async_wait<0>();  // the trailing empty groups
}

// Index: int32_t where every operand has fewer than 2^31 elements (mma_index_32), else
// int64_t. Offsets are formed only for elements inside their tensor (bounds are checked on the
// positions first), so each one is below that tensor's size.
template <typename T, typename Cfg, int kLayout, bool kBKMajor, typename Index>
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
  constexpr int kBPitch = kBKMajor ? mma_k_major_pitch<S>(BN) : kMmaPitchBytes;
  static_assert(!kBKMajor || sizeof(S) == 2, "ldmatrix.trans splits 32-bit values");
  static_assert(!kBKMajor || BK * kBPitch <= BN * kMmaPitchBytes, "k-major B fits");
  static_assert(kChunksA <= 32 && kChunksB <= 32, "one mask bit per chunk");

  __shared__ __align__(16) unsigned char As[Cfg::kStages][BM * kMmaPitchBytes];
  __shared__ __align__(16) unsigned char Bs[Cfg::kStages][BN * kMmaPitchBytes];
  // Per tile and output row: image offset (-1 past the grid), in position before the tap
  // offset, out offset (-1 outside `out`).
  __shared__ Index row_in[BM], row_ih[BM], row_iw[BM], row_out[BM];

  const int tid = int(threadIdx.x), lane = lane_index(), warp = tid / 32;
  const int warp_m0 = (warp % Cfg::kWarpsM) * Cfg::kWarpRows;
  const int warp_n0 = (warp / Cfg::kWarpsM) * Cfg::kWarpCols;
  // k digits: NCHW (ci, th, tw) radices (TH, TW); NHWC (th, tw, ci) radices (TW, Cin).
  const int64_t r1 = kChannelsLast ? p.TW : p.TH, r2 = kChannelsLast ? p.Cin : p.TW;
  const Digits3 stage_step = split_index(BK, r1, r2), unit_step = split_index(1, r1, r2);
  const Index in_h = Index(p.Hin), in_w = Index(p.Win);
  const Index is_c = Index(p.is.c), is_h = Index(p.is.h), is_w = Index(p.is.w);
  const Index w_co = Index(p.w_co), w_ci = Index(p.w_ci), w_kh = Index(p.w_kh),
              w_kw = Index(p.w_kw);

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
    const PassAxis ah = p.transposed ? transposed_axis(rho_h, p.stride_h, p.pad_top, p.dil_h, p.KH)
                                     : forward_axis(p.stride_h, p.pad_top, p.dil_h, p.KH);
    const PassAxis aw = p.transposed ? transposed_axis(rho_w, p.stride_w, p.pad_left, p.dil_w, p.KW)
                                     : forward_axis(p.stride_w, p.pad_left, p.dil_w, p.KW);
    const int64_t m0 = mt * BM, n0 = nt * BN;
    const T* w_group = w + g * p.w_group;
    const Index chan0 = Index(g * p.Cin);  // the group's first input channel

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
      row_in[r] = Index(img);
      row_ih[r] = Index(ih);
      row_iw[r] = Index(iw);
      row_out[r] = Index(o);
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
        unsigned char* dst = &As[stage][r * kMmaPitchBytes + (e % 4) * 16];
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
          unsigned char* dst = &Bs[stage][kk * kBPitch + c * 2];
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
          unsigned char* dst = &Bs[stage][c * kMmaPitchBytes + (e % 4) * 16];
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
    mma_mainloop<kKind, Cfg, MmaOperands<false, kMmaPitchBytes, kBKMajor, kBPitch>>(
        acc, (p.K + BK - 1) / BK, load_stage, As[0], Bs[0], warp_m0, warp_n0, lane);

    // Epilogue: accumulator q of tile (i, j) is D[g + 8 * (q / 2)][2t + q % 2] (lane = 4g + t).
    const int grp = lane / 4, t4 = lane % 4;
    JAXCONV_UNROLL
    for (int i = 0; i < MI; ++i) JAXCONV_UNROLL
    for (int h = 0; h < 2; ++h) {
      const Index o = row_out[warp_m0 + i * 16 + grp + 8 * h];
      if (o < 0) continue;
      JAXCONV_UNROLL
      for (int j = 0; j < NI; ++j) JAXCONV_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int64_t c = n0 + warp_n0 + j * 8 + 2 * t4 + e;
        if (c >= p.Cout) continue;
        const float b = bias ? Num<T>::load(bias[g * p.Cout + c]) : 0.0f;
        out[o + Index(g * p.Cout + c) * Index(p.os.c)] = Num<T>::store(acc[i][j][2 * h + e] + b);
      }
    }
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
__global__ void __launch_bounds__(Cfg::kThreads)
    conv_pass_mma_tap_kernel(PassParams p, const T* __restrict__ in, const T* __restrict__ w,
                             const T* __restrict__ bias, T* __restrict__ out) {
  using S = typename std::conditional<sizeof(T) == 2, T, float>::type;
  constexpr MmaKind kKind = MmaOf<T>::kind;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, MI = Cfg::MI, NI = Cfg::NI;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kVec = 16 / int(sizeof(S));          // elements per 16-byte chunk
  constexpr int BK = kMmaRowBytes / int(sizeof(S));  // k per stage
  constexpr int kChunksA = BM * 4 / kThreads, kChunksB = BN * 4 / kThreads;
  constexpr int kBPitch = kBKMajor ? mma_k_major_pitch<S>(BN) : kMmaPitchBytes;
  static_assert(!kBKMajor || sizeof(S) == 2, "ldmatrix.trans splits 32-bit values");
  static_assert(!kBKMajor || BK * kBPitch <= BN * kMmaPitchBytes, "k-major B fits");
  static_assert(kChunksA <= 32 && kChunksB <= 32, "one mask bit per chunk");

  __shared__ __align__(16) unsigned char As[Cfg::kStages][BM * kMmaPitchBytes];
  __shared__ __align__(16) unsigned char Bs[Cfg::kStages][BN * kMmaPitchBytes];
  __shared__ int row_out[BM];  // per output row: out offset, -1 outside `out`

  const int tid = int(threadIdx.x), lane = lane_index(), warp = tid / 32;
  const int warp_m0 = (warp % Cfg::kWarpsM) * Cfg::kWarpRows;
  const int warp_n0 = (warp / Cfg::kWarpsM) * Cfg::kWarpCols;
  const int cin = int(p.Cin), w_ci = int(p.w_ci);

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
    const PassAxis ah = p.transposed ? transposed_axis(rho_h, p.stride_h, p.pad_top, p.dil_h, p.KH)
                                     : forward_axis(p.stride_h, p.pad_top, p.dil_h, p.KH);
    const PassAxis aw = p.transposed ? transposed_axis(rho_w, p.stride_w, p.pad_left, p.dil_w, p.KW)
                                     : forward_axis(p.stride_w, p.pad_left, p.dil_w, p.KW);
    const int64_t m0 = mt * BM, n0 = nt * BN;

    for (int r = tid; r < BM; r += kThreads) {
      const int64_t m = m0 + r;
      int64_t o = -1;
      if (m < p.M) {
        const int64_t v = m % p.V, u = (m / p.V) % p.U, n = m / (p.U * p.V);
        const int64_t oh = ah.out0 + u * ah.out_step, ow = aw.out0 + v * aw.out_step;
        if (oh < p.Hout && ow < p.Wout) o = n * p.os.n + oh * p.os.h + ow * p.os.w;
      }
      row_out[r] = int(o);
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
        const int64_t v = m % p.V, u = (m / p.V) % p.U, n = m / (p.U * p.V);
        const int64_t ih0 = u * ah.step + ah.off0, iw0 = v * aw.step + aw.off0;
        a_base[l] = int(n * p.is.n + ih0 * p.is.h + iw0 * p.is.w + g * p.Cin + (e % 4) * kVec);
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
    const int a_dst = (tid / 4) * kMmaPitchBytes + (tid % 4) * 16;
    constexpr int kADstStep = (kThreads / 4) * kMmaPitchBytes;
    const int b_dst = kBKMajor ? (tid / (BN / 8)) * kBPitch + (tid % (BN / 8)) * 16 : a_dst;
    constexpr int kBDstStep = kBKMajor ? (kThreads / (BN / 8)) * kBPitch : kADstStep;
    static_assert(kThreads % (BN / 8) == 0, "B chunks a constant distance apart");
    auto load_stage = [&](int stage, int) {
      unsigned char* a_stage = As[stage] + a_dst;
      unsigned char* b_stage = Bs[stage] + b_dst;
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
    mma_mainloop<kKind, Cfg, MmaOperands<false, kMmaPitchBytes, kBKMajor, kBPitch>>(
        acc, steps, load_stage, As[0], Bs[0], warp_m0, warp_n0, lane);

    // Epilogue: accumulator q of tile (i, j) is D[g + 8 * (q / 2)][2t + q % 2] (lane = 4g + t).
    const int grp = lane / 4, t4 = lane % 4;
    JAXCONV_UNROLL
    for (int i = 0; i < MI; ++i) JAXCONV_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int o = row_out[warp_m0 + i * 16 + grp + 8 * h];
      if (o < 0) continue;
      JAXCONV_UNROLL
      for (int j = 0; j < NI; ++j) JAXCONV_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int64_t c = n0 + warp_n0 + j * 8 + 2 * t4 + e;
        if (c >= p.Cout) continue;
        const float b = bias ? Num<T>::load(bias[g * p.Cout + c]) : 0.0f;
        out[o + int(g * p.Cout + c)] = Num<T>::store(acc[i][j][2 * h + e] + b);
      }
    }
    __syncthreads();  // the next tile rewrites row_out and the stage buffers
  }
}

// bwd_filter on tensor cores: per group g, dW[o, k] = sum over positions p = (n, oh, ow) of
// dy[p, o] * im2col(x)[p, k], a GEMM with rows m = o (Og), columns k (Kg, dW's own order within a
// group: NCHW (ci, kh, kw), NHWC (kh, kw, ci)) and the reduction over the positions of one
// split [p_begin, p_end) (FilterParams; the split plan is conv2d_kernels.cuh's plan_filter). The
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
template <typename T, typename Cfg, int kLayout, typename Index>
__global__ void __launch_bounds__(Cfg::kThreads)
    conv_filter_mma_kernel(FilterParams p, MmaLoads loads, const T* __restrict__ x,
                           const T* __restrict__ dy, T* __restrict__ dw,
                           float* __restrict__ partial) {
  using S = typename std::conditional<sizeof(T) == 2, T, float>::type;
  using Bits = typename MmaOf<T>::Bits;
  constexpr MmaKind kKind = MmaOf<T>::kind;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, MI = Cfg::MI, NI = Cfg::NI;
  constexpr int kThreads = Cfg::kThreads;
  constexpr bool kKMajor = kLayout == kNHWC;         // both operands staged by position rows
  constexpr int kVec = 16 / int(sizeof(S));          // elements per 16-byte chunk
  constexpr int BK = kMmaRowBytes / int(sizeof(S));  // positions per stage
  constexpr int kChunksA = BM * 4 / kThreads, kChunksB = BN * 4 / kThreads;
  constexpr int kAPitch = kKMajor ? mma_k_major_pitch<S>(BM) : kMmaPitchBytes;
  constexpr int kBPitch = kKMajor ? mma_k_major_pitch<S>(BN) : kMmaPitchBytes;
  static_assert(BK * kAPitch <= BM * kMmaPitchBytes && BK * kBPitch <= BN * kMmaPitchBytes,
                "k-major tiles fit the stage buffers");
  static_assert(kChunksA <= 32 && kChunksB <= 32, "one mask bit per chunk");

  __shared__ __align__(16) unsigned char As[Cfg::kStages][BM * kMmaPitchBytes];
  __shared__ __align__(16) unsigned char Bs[Cfg::kStages][BN * kMmaPitchBytes];
  // Per tile, per column k: channel offset into x (-1 past Kg), the tap's offsets
  // kh * dilation_h - pad_top and kw * dilation_w - pad_left, and the offset within dW.
  __shared__ Index col_x[BN], col_dh[BN], col_dw[BN], col_w[BN];

  const int tid = int(threadIdx.x), lane = lane_index(), warp = tid / 32;
  const int warp_m0 = (warp % Cfg::kWarpsM) * Cfg::kWarpRows;
  const int warp_n0 = (warp / Cfg::kWarpsM) * Cfg::kWarpCols;
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
          unsigned char* dst = &As[stage][a_p0[l] * kAPitch + c * int(sizeof(S))];
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
          unsigned char* dst = &As[stage][r * kMmaPitchBytes + (e % 4) * 16];
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
          unsigned char* dst = &Bs[stage][b_p0[l] * kBPitch + c * int(sizeof(S))];
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
          unsigned char* dst = &Bs[stage][c * kMmaPitchBytes + (e % 4) * 16];
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
        acc, (p_end - p_begin + BK - 1) / BK, load_stage, As[0], Bs[0], warp_m0, warp_n0, lane);

    // Epilogue: accumulator q of tile (i, j) is D[g + 8 * (q / 2)][2t + q % 2] (lane = 4g + t).
    float* part = p.splits > 1 ? partial + split * p.dw_elems : nullptr;
    const int grp = lane / 4, t4 = lane % 4;
    JAXCONV_UNROLL
    for (int i = 0; i < MI; ++i) JAXCONV_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int64_t o = m0 + warp_m0 + i * 16 + grp + 8 * h;
      if (o >= p.Og) continue;
      JAXCONV_UNROLL
      for (int j = 0; j < NI; ++j) JAXCONV_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int c = warp_n0 + j * 8 + 2 * t4 + e;
        if (col_x[c] < 0) continue;
        const Index off = Index(g * p.Og + o) * Index(p.ws.n) + col_w[c];
        if (part)
          part[off] = acc[i][j][2 * h + e];
        else
          dw[off] = Num<T>::store(acc[i][j][2 * h + e]);
      }
    }
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
__global__ void __launch_bounds__(Cfg::kThreads)
    conv_filter_mma_pos_kernel(FilterParams p, const T* __restrict__ x, const T* __restrict__ dy,
                               T* __restrict__ dw, float* __restrict__ partial) {
  using S = typename std::conditional<sizeof(T) == 2, T, float>::type;
  constexpr MmaKind kKind = MmaOf<T>::kind;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, MI = Cfg::MI, NI = Cfg::NI;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kVec = 16 / int(sizeof(S));          // elements per 16-byte chunk
  constexpr int BK = kMmaRowBytes / int(sizeof(S));  // positions per stage
  constexpr int kChunksA = BM * 4 / kThreads, kChunksB = BN * 4 / kThreads;
  constexpr int kAPitch = mma_k_major_pitch<S>(BM), kBPitch = mma_k_major_pitch<S>(BN);
  constexpr int kARowChunks = BM / kVec, kBRowChunks = BN / kVec;  // chunks per position row
  static_assert(BK * kAPitch <= BM * kMmaPitchBytes && BK * kBPitch <= BN * kMmaPitchBytes,
                "k-major tiles fit the stage buffers");
  static_assert(kThreads % kARowChunks == 0 && kThreads % kBRowChunks == 0,
                "a thread's chunks share their columns");
  static_assert(kChunksA <= 32 && kChunksB <= 32, "one mask bit per chunk");

  __shared__ __align__(16) unsigned char As[Cfg::kStages][BM * kMmaPitchBytes];
  __shared__ __align__(16) unsigned char Bs[Cfg::kStages][BN * kMmaPitchBytes];
  __shared__ int col_x[BN], col_dh[BN], col_dw[BN], col_w[BN];

  const int tid = int(threadIdx.x), lane = lane_index(), warp = tid / 32;
  const int warp_m0 = (warp % Cfg::kWarpsM) * Cfg::kWarpRows;
  const int warp_n0 = (warp / Cfg::kWarpsM) * Cfg::kWarpCols;
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
    const int a_dst = (tid / kARowChunks) * kAPitch + (tid % kARowChunks) * 16;
    const int b_dst = (tid / kBRowChunks) * kBPitch + (tid % kBRowChunks) * 16;
    constexpr int kADstStep = (kThreads / kARowChunks) * kAPitch;
    constexpr int kBDstStep = (kThreads / kBRowChunks) * kBPitch;
    auto load_stage = [&](int stage, int) {
      unsigned char* a_stage = As[stage] + a_dst;
      unsigned char* b_stage = Bs[stage] + b_dst;
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
        acc, int((p_end - p_begin + BK - 1) / BK), load_stage, As[0], Bs[0], warp_m0, warp_n0,
        lane);

    // Epilogue: accumulator q of tile (i, j) is D[g + 8 * (q / 2)][2t + q % 2] (lane = 4g + t).
    float* part = p.splits > 1 ? partial + split * p.dw_elems : nullptr;
    const int grp = lane / 4, t4 = lane % 4;
    JAXCONV_UNROLL
    for (int i = 0; i < MI; ++i) JAXCONV_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int64_t o = m0 + warp_m0 + i * 16 + grp + 8 * h;
      if (o >= p.Og) continue;
      JAXCONV_UNROLL
      for (int j = 0; j < NI; ++j) JAXCONV_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int cc = warp_n0 + j * 8 + 2 * t4 + e;
        if (col_x[cc] < 0) continue;
        const int off = int((g * p.Og + o) * p.ws.n) + col_w[cc];
        if (part)
          part[off] = acc[i][j][2 * h + e];
        else
          dw[off] = Num<T>::store(acc[i][j][2 * h + e]);
      }
    }
    __syncthreads();  // the next tile rewrites the column tables and the stage buffers
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
  loads.a_vector = p.layout == kNHWC && multiple(p.Cin) && multiple(p.is.n) && multiple(p.is.h) &&
                   multiple(p.is.w) && aligned16(in);
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

// Whether conv_pass_mma_tap_kernel runs the pass (with int32 offsets): NHWC, every chunk of
// both operands one 16-byte copy, channels dense (is.c == 1) with B n-major reading ci
// contiguously (w_ci == 1), Cin a multiple of the stage's k so that a stage stays inside one
// tap, and fewer than 32 tap slots per axis (one mask bit each, and th = TH after the last tap
// still shifts by less than 32).
template <typename T>
bool mma_pass_tap_applies(const PassParams& p, const MmaLoads& loads) {
  const int64_t bk = kMmaRowBytes / (sizeof(T) == 2 ? 2 : 4);
  return p.layout == kNHWC && loads.a_vector && loads.b_vector && p.is.c == 1 &&
         (mma_b_k_major<T>(p) || p.w_ci == 1) && p.os.c == 1 && p.Cin % bk == 0 && p.TH < 32 &&
         p.TW < 32 && p.K / bk < (int64_t(1) << 31);
}

// bwd_filter: which chunks may be copied as 16 bytes (every chunk's kVec elements consecutive
// in memory and its first element's offset a multiple of kVec, with 16-byte-aligned buffers).
template <typename T>
MmaLoads mma_filter_loads(const FilterParams& p, const T* x, const T* dy) {
  const int64_t vec = sizeof(T) == 2 ? 8 : 4;
  auto multiple = [&](int64_t v) { return v % vec == 0; };
  MmaLoads loads{0, 0};
  if (p.layout == kNHWC) {
    // dy chunk: output channels (g * Og + o .. + vec) of one position; x chunk: channels
    // (g * Cg + ci .. + vec) of one tap of one position (k = (kh, kw, ci), ci innermost).
    loads.a_vector = p.ys.c == 1 && multiple(p.Og) && multiple(p.ys.n) && multiple(p.ys.h) &&
                     multiple(p.ys.w) && aligned16(dy);
    loads.b_vector = p.xs.c == 1 && multiple(p.Cg) && multiple(p.xs.n) && multiple(p.xs.h) &&
                     multiple(p.xs.w) && aligned16(x);
  } else {
    // dy chunk: vec positions of one output channel, starting at a multiple of vec; they stay in
    // one image (and are consecutive there) when OH * OW is a multiple of vec.
    loads.a_vector = p.ys.w == 1 && p.ys.h == p.OW && multiple(p.OH * p.OW) && multiple(p.ys.c) &&
                     multiple(p.ys.n) && aligned16(dy);
    loads.b_vector = 0;  // im2col(x) along positions is strided: gathered
  }
  return loads;
}

// Whether conv_filter_mma_pos_kernel runs bwd_filter (with int32 offsets): NHWC, every chunk
// of both operands one 16-byte copy, and dy dense along positions (its offset is then linear in
// the position index).
inline bool mma_filter_pos_applies(const FilterParams& p, const MmaLoads& loads) {
  return p.layout == kNHWC && loads.a_vector && loads.b_vector && p.ys.h == p.OW * p.ys.w &&
         p.ys.n == p.OH * p.ys.h;
}

// Launches conv_filter_mma_kernel over p's plan (plan_filter with this tile) into dw, or into
// the float32 partial sums when p.splits > 1 (the caller then adds them); index32 as for the
// pass.
template <typename T, typename Cfg>
cudaError_t launch_filter_mma(const FilterParams& p, const T* x, const T* dy, T* dw, float* partial,
                              bool index32, cudaStream_t stream) {
  const MmaLoads loads = mma_filter_loads(p, x, dy);
  if (index32 && mma_filter_pos_applies(p, loads))
    return launch(conv_filter_mma_pos_kernel<T, Cfg>, dim3(grid_blocks(p.tiles)),
                  dim3(Cfg::kThreads), stream, p, x, dy, dw, partial);
  void (*kernel)(FilterParams, MmaLoads, const T*, const T*, T*, float*);
  if (p.layout == kNHWC)
    kernel = index32 ? conv_filter_mma_kernel<T, Cfg, kNHWC, int32_t>
                     : conv_filter_mma_kernel<T, Cfg, kNHWC, int64_t>;
  else
    kernel = index32 ? conv_filter_mma_kernel<T, Cfg, kNCHW, int32_t>
                     : conv_filter_mma_kernel<T, Cfg, kNCHW, int64_t>;
  return launch(kernel, dim3(grid_blocks(p.tiles)), dim3(Cfg::kThreads), stream, p, loads, x, dy,
                dw, partial);
}

// The pass kernel instantiation for one layout / B staging, by index width.
template <typename T, typename Cfg, int kLayout, bool kBKMajor>
auto pass_mma_kernel(bool index32) {
  return index32 ? conv_pass_mma_kernel<T, Cfg, kLayout, kBKMajor, int32_t>
                 : conv_pass_mma_kernel<T, Cfg, kLayout, kBKMajor, int64_t>;
}

// index32: offsets in int32 (choose_mma_index32 in conv2d_kernels.cuh says when that is exact).
template <typename T, typename Cfg>
cudaError_t launch_pass_mma(PassParams p, const T* in, const T* w, const T* bias, T* out,
                            bool index32, cudaStream_t stream) {
  p.m_tiles = ceil_div_pos(p.M, Cfg::BM);
  p.n_tiles = ceil_div_pos(p.Cout, Cfg::BN);
  p.tiles = p.phases_h * p.phases_w * p.G * p.n_tiles * p.m_tiles;
  if (p.tiles == 0) return cudaSuccess;
  const MmaLoads loads = mma_pass_loads(p, in, w);
  if (index32 && mma_pass_tap_applies<T>(p, loads)) {
    void (*tap_kernel)(PassParams, const T*, const T*, const T*, T*);
    if constexpr (sizeof(T) == 2)
      tap_kernel = mma_b_k_major<T>(p) ? conv_pass_mma_tap_kernel<T, Cfg, true>
                                       : conv_pass_mma_tap_kernel<T, Cfg, false>;
    else
      tap_kernel = conv_pass_mma_tap_kernel<T, Cfg, false>;
    return launch(tap_kernel, dim3(grid_blocks(p.tiles)), dim3(Cfg::kThreads), stream, p, in, w,
                  bias, out);
  }
  void (*kernel)(PassParams, MmaLoads, const T*, const T*, const T*, T*);
  if (p.layout == kNHWC) {
    if constexpr (sizeof(T) == 2)
      kernel = mma_b_k_major<T>(p) ? pass_mma_kernel<T, Cfg, kNHWC, true>(index32)
                                   : pass_mma_kernel<T, Cfg, kNHWC, false>(index32);
    else
      kernel = pass_mma_kernel<T, Cfg, kNHWC, false>(index32);
  } else {
    kernel = pass_mma_kernel<T, Cfg, kNCHW, false>(index32);
  }
  return launch(kernel, dim3(grid_blocks(p.tiles)), dim3(Cfg::kThreads), stream, p, loads, in, w,
                bias, out);
}

}  // namespace jaxconv::cuda
