// Tensor-core kernels, level 1: the block tile configurations and the shared-memory layouts of
// one stage (the umbrella conv2d_mma.cuh says how the levels fit together).
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
#pragma once

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

// The operand layouts of one kernel instantiation: whether A (B) is staged k-major and the
// byte pitch of its rows.
template <bool kAKMajor_, int kAPitch_, bool kBKMajor_, int kBPitch_>
struct MmaOperands {
  static constexpr bool kAKMajor = kAKMajor_, kBKMajor = kBKMajor_;
  static constexpr int kAPitch = kAPitch_, kBPitch = kBPitch_;
};


}  // namespace jaxconv::cuda
