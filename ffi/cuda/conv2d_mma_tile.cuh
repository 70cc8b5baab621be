// Tensor-core kernels, level 1: the block tile configurations and the shared-memory layouts of
// one stage (the umbrella conv2d_mma.cuh says how the levels fit together).
//
// Block tile BM x BN (output rows x output channels of one group), split over
// kWarpsM x kWarpsN warps; each warp owns a (BM / kWarpsM) x (BN / kWarpsN) piece as MI x NI
// tiles of 16 x 8 accumulators. The reduction advances one stage of 64 bytes of k per row at a
// time (32 16-bit values or 16 floats: two mma k-steps), through Cfg::kStages shared-memory
// buffers filled with cp.async, so the loads of stages s + 1 .. s + kStages - 1 run while stage
// s is multiplied. The buffers are the block's dynamic shared memory (Cfg::kSharedBytes: every
// A stage, then every B stage), so that they may exceed the 48 KB of static shared memory.
//
// Shared layouts, unpadded and XOR-swizzled in 16-byte chunks (mma_tile_offset), so that the 8
// row addresses of each ldmatrix matrix, and the 8 chunks that each quarter warp's cp.async
// writes, fall into the 8 distinct groups of 4 banks (no bank conflicts):
//   A: [BM][64 bytes], row m holds the stage's k values of output row m (k contiguous).
//   B, n-major: [BN][64 bytes], row n holds the stage's k values of output channel n; read with
//      ldmatrix (the mma's "col" B operand is exactly B^T rows).
//   B, k-major (16-bit types with weights contiguous along output channels, i.e. HWIO forward):
//      [32][BN * 2 bytes], row k holds BN channels; read with ldmatrix.trans.
//   bwd_filter NHWC stages both operands k-major (rows of one position); TF32 k-major
//      fragments are read as single shared words ([16][BX * 4 bytes]).
// Every stage tile of BX rows or columns is BX * 64 bytes.
#pragma once

#include <type_traits>

#include "kernel_common.cuh"

namespace jaxconv::cuda {

constexpr int kMmaRowBytes = 64;  // k bytes per row and stage

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

// What every tensor-core kernel derives from its dtype T and tile Cfg: the staged type S (T, or
// float32 rounded to TF32 in the multiply), the mma kind, bytes per staged value, values per
// 16-byte chunk, k per stage (kMmaRowBytes of k), and the 16-byte chunks of A and B each thread
// copies per stage.
template <typename T, typename Cfg>
struct MmaKernelTypes {
  using S = typename std::conditional<sizeof(T) == 2, T, float>::type;
  using Bits = typename MmaOf<T>::Bits;
  static constexpr MmaKind kKind = MmaOf<T>::kind;
  static constexpr int kE = int(sizeof(S)), kVec = 16 / kE, BK = kMmaRowBytes / kE;
  static constexpr int kChunksA = Cfg::BM * 4 / Cfg::kThreads;
  static constexpr int kChunksB = Cfg::BN * 4 / Cfg::kThreads;
  static_assert(kChunksA <= 32 && kChunksB <= 32, "one mask bit per chunk");
};

// A thread's place in the block tile: its lane, and the first row / column of its warp's piece.
struct MmaThread {
  int tid, lane, warp_m0, warp_n0;
};
template <typename Cfg>
__device__ __forceinline__ MmaThread mma_thread() {
  const int tid = int(threadIdx.x), warp = tid / 32;
  return {tid, lane_index(), (warp % Cfg::kWarpsM) * Cfg::kWarpRows,
          (warp / Cfg::kWarpsM) * Cfg::kWarpCols};
}

template <int BM_, int BN_, int kWarpsM_, int kWarpsN_, int kStages_, int kMinBlocks_>
struct MmaTile {
  static constexpr int BM = BM_, BN = BN_, kWarpsM = kWarpsM_, kWarpsN = kWarpsN_;
  static constexpr int kStages = kStages_;  // shared-memory buffers of the cp.async pipeline
  // Blocks per SM the iterator kernels are compiled for (__launch_bounds__; the general kernels,
  // whose int64 offsets need more registers, keep 1): registers per thread at
  // most 65536 / (kThreads * kMinBlocks), rounded down to ptxas's granule.
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWarpRows = BM / kWarpsM, kWarpCols = BN / kWarpsN;
  static constexpr int MI = kWarpRows / 16, NI = kWarpCols / 8;
  static_assert(kWarpRows % 16 == 0 && kWarpCols % 16 == 0, "B fragments load in pairs");
  static_assert((BM * 4) % kThreads == 0 && (BN * 4) % kThreads == 0,
                "each thread copies the same number of 16-byte chunks");
  static_assert(kStages >= 2, "a stage loads while another is multiplied");
  static constexpr int kAStageBytes = BM * 64, kBStageBytes = BN * 64;          // kMmaRowBytes of k
  static constexpr int kSharedBytes = kStages * (kAStageBytes + kBStageBytes);  // dynamic
};

// Large layers: 8 warps of 64 x 32, 4 stages (64 KB of dynamic shared memory, opted in above
// 48 KB), one block per SM (two would need at most 128 registers a thread). Small layers (few
// output rows or channels, where 128-wide tiles would leave most SMs idle or compute padding):
// 4 warps of 32 x 32, 4 stages (32 KB), three blocks per SM (at most 168 registers). Three
// loads are in flight while a stage is multiplied.
using MmaLargeTile = MmaTile<128, 128, 2, 4, 4, 1>;
using MmaSmallTile = MmaTile<64, 64, 2, 2, 4, 3>;

// How the loads of one launch run; decided on the host (mma_pass_loads, mma_filter_loads).
struct MmaLoads {
  int a_vector;  // A chunks as one 16-byte copy (NHWC, channels per group % vector == 0)
  int b_vector;  // B chunks as one 16-byte copy
};

// Pitch in bytes of a k-major operand tile (rows of one k, `cols` m or n values each): no
// padding (the swizzle below keeps ldmatrix.trans conflict-free); a multiple of 128 bytes.
template <typename S>
constexpr int mma_k_major_pitch(int cols) {
  return cols * int(sizeof(S));
}

// Byte offset of logical 16-byte chunk `chunk` of row `row` in a stage tile with rows of kPitch
// bytes holding kElemBytes-byte values. The physical chunk is chunk XOR a function of the row,
// chosen so that the accesses that run together hit 8 distinct groups of 4 banks (a 128-byte
// row of banks is 8 chunks; bank group of a chunk = (row * kPitch / 16 + physical chunk) % 8):
//   kPitch == 64 (m/n-major, 4 chunks a row): chunk ^ ((row / 2) % 4). An ldmatrix matrix reads
//     one chunk of 8 consecutive rows: group (row % 2) * 4 + (chunk ^ (row / 2) % 4), all 8
//     distinct; a quarter warp's cp.async writes the 4 chunks of 2 consecutive rows: distinct.
//   kPitch a multiple of 128, 16-bit (k-major, ldmatrix.trans): chunk ^ (row % 8): 8 consecutive
//     rows at one chunk hit 8 groups; a quarter warp writes 8 chunks of one row: distinct.
//   kPitch a multiple of 128, 32-bit (TF32 k-major, single words): chunk ^ 2 (row % 4). A
//     fragment's words (row t or t + 4, columns c0 + g for g < 8, c0 % 8 == 0) lie in chunks
//     c0 / 4 + g / 4: group ((c0 / 4 + g / 4) ^ 2t) % 8, 8 distinct for t < 4, g / 4 < 2, and
//     word g % 4 within: 32 distinct banks.
// Under the emulation, emu::plain_shared_layout (a test switch) lays rows out plainly instead,
// so that a test can show that the emulation's bank conflict counts see the difference.
template <int kPitch, int kElemBytes>
JAXCONV_HD int mma_tile_offset(int row, int chunk) {
#if defined(JAXCONV_CUDA_EMULATION)
  if (::emu::plain_shared_layout) return row * kPitch + chunk * 16;
#endif
  static_assert(kPitch == kMmaRowBytes || kPitch % 128 == 0, "a swizzle of this pitch");
  if constexpr (kPitch == kMmaRowBytes)
    return row * kPitch + ((chunk ^ ((row >> 1) & 3)) << 4);
  else if constexpr (kElemBytes == 2)
    return row * kPitch + ((chunk ^ (row & 7)) << 4);
  else
    return row * kPitch + ((chunk ^ ((row & 3) << 1)) << 4);
}

// The operand layouts of one kernel instantiation: whether A (B) is staged k-major and the
// byte pitch of its rows.
template <bool kAKMajor_, int kAPitch_, bool kBKMajor_, int kBPitch_>
struct MmaOperands {
  static constexpr bool kAKMajor = kAKMajor_, kBKMajor = kBKMajor_;
  static constexpr int kAPitch = kAPitch_, kBPitch = kBPitch_;
};

}  // namespace jaxconv::cuda
