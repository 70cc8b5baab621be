// Tensor-core kernels, level 3: the staged main loop (cp.async pipeline over Cfg::kStages
// shared buffers, one barrier per stage) that every tensor-core kernel runs, and the epilogue's
// walk over a warp's accumulators.
#pragma once

#include "conv2d_mma_fragment.cuh"

namespace jaxconv::cuda {

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
// Stage s lives in buffer s % kStages; the loop runs kStages stages per iteration, unrolled, so
// that every buffer offset (of the stage multiplied and of the one loaded) is a constant and
// the shared addresses of the fragments are per-lane registers plus immediates.
template <MmaKind kKind, typename Cfg, typename Ops, typename Step, typename LoadStage>
__device__ __forceinline__ void mma_mainloop(float (&acc)[Cfg::MI][Cfg::NI][4], Step steps,
                                             LoadStage&& load_stage, const unsigned char* As,
                                             const unsigned char* Bs, int warp_m0, int warp_n0,
                                             int lane) {
  constexpr int MI = Cfg::MI, NI = Cfg::NI;
  constexpr int kAStageBytes = Cfg::kAStageBytes, kBStageBytes = Cfg::kBStageBytes;
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
  for (Step s0 = 0; s0 < steps; s0 += kStages) {
    JAXCONV_UNROLL
    for (int u = 0; u < kStages; ++u) {
      const Step s = s0 + u;
      if (s >= steps) break;
      cp_async_wait<kStages - 2>();
      __syncthreads();  // stage s is in shared memory; stage s - 1 is read by every warp
      if (s + (kStages - 1) < steps) load_stage((u + kStages - 1) % kStages, s + (kStages - 1));
      cp_async_commit();  // possibly empty, as above

      const unsigned char* a_tile = As + u * kAStageBytes;
      const unsigned char* b_tile = Bs + u * kBStageBytes;
      // Fragments double-buffered: k-step 1's are read from shared memory before k-step 0's
      // multiplies are issued, so the ldmatrix latency overlaps the tensor-core work.
      uint32_t a[2][MI][4], b[2][NI][2];
      load_a_fragments<kKind, MI, Ops::kAKMajor, Ops::kAPitch>(a[0], a_tile, warp_m0, 0, lane);
      load_b_fragments<kKind, NI, Ops::kBKMajor, Ops::kBPitch>(b[0], b_tile, warp_n0, 0, lane);
      JAXCONV_UNROLL
      for (int ks = 0; ks < 2; ++ks) {  // two mma k-steps of 32 bytes
        if (ks + 1 < 2) {
          load_a_fragments<kKind, MI, Ops::kAKMajor, Ops::kAPitch>(a[(ks + 1) & 1], a_tile, warp_m0,
                                                                   ks + 1, lane);
          load_b_fragments<kKind, NI, Ops::kBKMajor, Ops::kBPitch>(b[(ks + 1) & 1], b_tile, warp_n0,
                                                                   ks + 1, lane);
        }
        if constexpr (kKind == MmaKind::kTf32) {
          JAXCONV_UNROLL
          for (int i = 0; i < MI; ++i) JAXCONV_UNROLL
          for (int q = 0; q < 4; ++q) a[ks][i][q] = to_tf32(a[ks][i][q]);
          JAXCONV_UNROLL
          for (int j = 0; j < NI; ++j) JAXCONV_UNROLL
          for (int q = 0; q < 2; ++q) b[ks][j][q] = to_tf32(b[ks][j][q]);
        }
        JAXCONV_UNROLL
        for (int i = 0; i < MI; ++i) JAXCONV_UNROLL
        for (int j = 0; j < NI; ++j) mma<kKind>(acc[i][j], a[ks][i], b[ks][j]);
      }
    }
  }
  cp_async_wait<0>();  // the trailing empty groups
}

// The epilogue's walk over a warp's accumulators: accumulator q of tile (i, j) is
// D[g + 8 * (q / 2)][2t + q % 2] (lane = 4g + t) of the warp's piece at (warp_m0, warp_n0).
// row(r) gives the base offset of block-tile row r (negative: the row is not written);
// store(base, c, v) writes v to block-tile column c of that row (and checks the column).
template <typename Cfg, typename Row, typename Store>
__device__ __forceinline__ void mma_store_accumulators(const float (&acc)[Cfg::MI][Cfg::NI][4],
                                                       int warp_m0, int warp_n0, int lane,
                                                       Row&& row, Store&& store) {
  const int grp = lane / 4, t4 = lane % 4;
  JAXCONV_UNROLL
  for (int i = 0; i < Cfg::MI; ++i) JAXCONV_UNROLL
  for (int h = 0; h < 2; ++h) {
    const auto base = row(warp_m0 + i * 16 + grp + 8 * h);
    if (base < 0) continue;
    JAXCONV_UNROLL
    for (int j = 0; j < Cfg::NI; ++j) JAXCONV_UNROLL
    for (int e = 0; e < 2; ++e) store(base, warp_n0 + j * 8 + 2 * t4 + e, acc[i][j][2 * h + e]);
  }
}

}  // namespace jaxconv::cuda
