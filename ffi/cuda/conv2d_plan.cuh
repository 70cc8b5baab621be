// Kernel selection and the bwd_filter split plan (level 3 of the conv headers; see
// conv2d_kernels.cuh): host-side functions of the problem's shape, dtype, layout and
// PassOptions only, which decide which kernel and tile serve a launch (SIMT or tensor cores) and
// how bwd_filter's reduction over positions is split (split_reduce.cuh says why the split
// depends on nothing else).
#pragma once

#include <cstdint>

#include "conv2d_problem.cuh"
#include "split_reduce.cuh"

namespace jaxconv::cuda {

enum class PassTile { kWide, kTall };
enum class FilterTileKind { kWide, kSmall };

// The SIMT pass tile, by the number of output channels per group (the GEMM's N); a 64-wide
// tile would mostly compute padding below 16 channels. choose_pass_kernel below decides first
// whether the pass runs on tensor cores at all.
inline PassTile choose_pass_tile(int64_t cout_per_group) {
  return cout_per_group <= 16 ? PassTile::kTall : PassTile::kWide;
}

inline FilterTileKind choose_filter_tile(int64_t out_per_group, int64_t k_per_group) {
  return (out_per_group <= 16 && k_per_group <= 16) ? FilterTileKind::kSmall
                                                    : FilterTileKind::kWide;
}

enum class PassKernel { kSimtWide, kSimtTall, kMmaLarge, kMmaSmall };
enum class FilterKernel { kSimtWide, kSimtSmall, kMmaLarge, kMmaSmall };

// Output tiles of 128 x 128 below which the large tensor-core tile would leave SMs idle: about
// two waves of one block per SM on an H100 (132 SMs).
constexpr int64_t kMmaLargeMinTiles = 256;

// Whether a GEMM of T runs on tensor cores: sm_80+, a 16-bit type or float32 with TF32 allowed,
// and at least 16 values per group on both the output-channel side (`rows`) and the other
// (`cols`); below that (depthwise, tiny heads) a 16 x 8 x 16 mma would mostly multiply padding.
template <typename T>
bool mma_applies(const PassOptions& opts, int64_t rows, int64_t cols) {
  const bool mma_type = sizeof(T) == 2 || (sizeof(T) == 4 && opts.allow_tf32);
  return opts.tensor_cores && mma_type && rows >= 16 && cols >= 16;
}

// The one place that picks the kernels and tiles of all three directions, by shape class.
//
// Pass (forward, bwd_data per stride phase), a GEMM of M = N*U*V rows by Cout columns over
// K = Cin*TH*TW:
//   - tensor cores where mma_applies(Cout, K);
//   - the 128 x 128 tile where it still yields kMmaLargeMinTiles blocks, else 64 x 64;
//   - float64, and float32 without TF32, stay on the SIMT kernel (tall tile for <= 16
//     output channels per group).
template <typename T>
PassKernel choose_pass_kernel(const PassParams& p, const PassOptions& opts) {
  if (mma_applies<T>(opts, p.Cout, p.K)) {
    const int64_t large_tiles =
        p.phases_h * p.phases_w * p.G * ceil_div_pos(p.M, 128) * ceil_div_pos(p.Cout, 128);
    return large_tiles >= kMmaLargeMinTiles && p.Cout > 64 ? PassKernel::kMmaLarge
                                                           : PassKernel::kMmaSmall;
  }
  return choose_pass_tile(p.Cout) == PassTile::kTall ? PassKernel::kSimtTall
                                                     : PassKernel::kSimtWide;
}

// bwd_filter, a GEMM of Og rows by Kg = Cg*KH*KW columns per group over the P = N*OH*OW
// positions, split over P by plan_filter to fill the GPU (so the tile count alone does not
// decide the tile):
//   - tensor cores where mma_applies(Og, Kg); the 128 x 128 tile when both sides exceed 64
//     (a 64-wide side would leave half of it padding), else 64 x 64;
//   - otherwise SIMT, the 16 x 16 tile for a dW of at most 16 x 16 per group.
template <typename T>
FilterKernel choose_filter_kernel(const FilterParams& p, const PassOptions& opts) {
  if (mma_applies<T>(opts, p.Og, p.Kg))
    return p.Og > 64 && p.Kg > 64 ? FilterKernel::kMmaLarge : FilterKernel::kMmaSmall;
  return choose_filter_tile(p.Og, p.Kg) == FilterTileKind::kSmall ? FilterKernel::kSimtSmall
                                                                  : FilterKernel::kSimtWide;
}

// ---- bwd_filter's split plan: a function of the problem's shape only -----------------------
// Splits the reduction so that tiles * splits reaches kFilterSplitTargetBlocks, while each
// split keeps at least 4 steps of work and the partials fit the workspace cap. Tile bm x bn,
// bk positions per step. Fills m/n tiles, splits, chunk, tiles.
inline void plan_filter(FilterParams* p, int64_t acc_bytes, int64_t bm, int64_t bn, int64_t bk) {
  p->m_tiles = ceil_div_pos(p->Og, bm);
  p->n_tiles = ceil_div_pos(p->Kg, bn);
  const int64_t base = p->G * p->m_tiles * p->n_tiles;
  const int64_t steps = ceil_div_pos(p->P, bk);
  int64_t splits = ceil_div_pos(kFilterSplitTargetBlocks, base);
  if (splits > 64) splits = 64;
  if (splits > steps / 4) splits = steps / 4;
  const int64_t fit = kMaxFilterWorkspaceBytes / (p->dw_elems * acc_bytes);
  if (splits > fit) splits = fit;
  if (splits < 1) splits = 1;
  p->chunk = ceil_div_pos(steps, splits) * bk;
  p->splits = ceil_div_pos(p->P, p->chunk);  // no empty split
  if (p->splits < 1) p->splits = 1;
  p->tiles = base * p->splits;
}

// Host side of bwd_filter, in two calls so that the caller can allocate the workspace between
// them: workspace_bytes() says how many bytes of partial sums the plan needs (0: none), run()
// launches. The kernel comes from choose_filter_kernel (or is forced, for tests), and the plan

}  // namespace jaxconv::cuda
