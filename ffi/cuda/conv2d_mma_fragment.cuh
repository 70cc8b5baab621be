// Tensor-core kernels, level 2: the warp-level tile iterators, which read one mma k-step's A and
// B fragments of a warp out of a stage's shared tile (ldmatrix, ldmatrix.trans, or single words
// for TF32 k-major tiles), in the layouts of conv2d_mma_tile.cuh.
#pragma once

#include "conv2d_mma_tile.cuh"

namespace jaxconv::cuda {

// One 32-bit word of a k-major TF32 tile (rows of kPitch bytes): row k, column `col` (TF32
// fragments, which ldmatrix.trans cannot gather because it moves 16-bit halves).
template <int kPitch>
__device__ __forceinline__ uint32_t mma_tile_word(const unsigned char* tile, int k, int col) {
  return *reinterpret_cast<const uint32_t*>(tile + mma_tile_offset<kPitch, 4>(k, col / 4) +
                                            (col % 4) * 4);
}

// A fragments (MI tiles of 16 rows from row m0) for mma k-step ks (32 bytes of k) of one stage.
// Addresses through mma_tile_offset (row, 16-byte chunk); ldmatrix reads whole chunks.
//   m-major tile ([m][64 bytes], k contiguous): ldmatrix; lanes 0-15 give rows 0-15 at k chunk
//     2 ks, lanes 16-31 the same rows at chunk 2 ks + 1 (a[0..3] = rows 0-7 / 8-15 x k
//     low / high, the mma A layout; for 32-bit values the word [l/4][l%4], the TF32 layout).
//   k-major tile ([k][kPitch], m contiguous), 16-bit: ldmatrix.trans of the four 8 x 8 blocks
//     (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15); lane l gives row
//     k = 8(l/16) + l%8 of block l/8, whose transpose hands lane 4g + t A[g][2t..2t+1].
//   k-major, TF32: a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4],
//     one shared word each.
template <MmaKind kKind, int MI, bool kKMajor, int kPitch>
__device__ __forceinline__ void load_a_fragments(uint32_t (&a)[MI][4], const unsigned char* tile,
                                                 int m0, int ks, int lane) {
  constexpr int kElem = kKind == MmaKind::kTf32 ? 4 : 2;
  JAXCONV_UNROLL
  for (int i = 0; i < MI; ++i) {
    const int m = m0 + i * 16;
    if constexpr (!kKMajor) {
      ldmatrix<4>(a[i], tile + mma_tile_offset<kPitch, kElem>(m + lane % 16, ks * 2 + lane / 16));
    } else if constexpr (kKind != MmaKind::kTf32) {
      ldmatrix<4, true>(a[i],
                        tile + mma_tile_offset<kPitch, 2>(ks * 16 + (lane / 16) * 8 + lane % 8,
                                                          m / 8 + (lane / 8) % 2));
    } else {
      const int k = ks * 8 + lane % 4, r = m + lane / 4;
      a[i][0] = mma_tile_word<kPitch>(tile, k, r);
      a[i][1] = mma_tile_word<kPitch>(tile, k, r + 8);
      a[i][2] = mma_tile_word<kPitch>(tile, k + 4, r);
      a[i][3] = mma_tile_word<kPitch>(tile, k + 4, r + 8);
    }
  }
}

// B fragments (NI tiles of 8 columns from column n0) for mma k-step ks of one stage.
//   n-major tile ([n][64 bytes], k contiguous; the mma's "col" B operand is exactly B^T rows):
//     ldmatrix of (channels 0-7, k low), (0-7, k high), (8-15, low), (8-15, high) of the pair of
//     n8 tiles j, j + 1: registers b[j][0], b[j][1], b[j+1][0], b[j+1][1].
//   k-major tile ([k][kPitch], n contiguous), 16-bit: the same four blocks by ldmatrix.trans.
//   k-major, TF32: b[0] = B[t][g], b[1] = B[t+4][g], one shared word each.
template <MmaKind kKind, int NI, bool kKMajor, int kPitch>
__device__ __forceinline__ void load_b_fragments(uint32_t (&b)[NI][2], const unsigned char* tile,
                                                 int n0, int ks, int lane) {
  constexpr int kElem = kKind == MmaKind::kTf32 ? 4 : 2;
  if constexpr (kKMajor && kKind == MmaKind::kTf32) {
    JAXCONV_UNROLL
    for (int j = 0; j < NI; ++j) {
      const int k = ks * 8 + lane % 4, c = n0 + j * 8 + lane / 4;
      b[j][0] = mma_tile_word<kPitch>(tile, k, c);
      b[j][1] = mma_tile_word<kPitch>(tile, k + 4, c);
    }
  } else {
    JAXCONV_UNROLL
    for (int j = 0; j < NI; j += 2) {
      uint32_t r[4];
      if constexpr (kKMajor)
        ldmatrix<4, true>(
            r, tile + mma_tile_offset<kPitch, 2>(ks * 16 + ((lane / 8) % 2) * 8 + lane % 8,
                                                 (n0 + j * 8) / 8 + lane / 16));
      else
        ldmatrix<4>(r,
                    tile + mma_tile_offset<kPitch, kElem>(n0 + j * 8 + (lane / 16) * 8 + lane % 8,
                                                          ks * 2 + (lane / 8) % 2));
      b[j][0] = r[0];
      b[j][1] = r[1];
      b[j + 1][0] = r[2];
      b[j + 1][1] = r[3];
    }
  }
}

}  // namespace jaxconv::cuda
