// Host emulation of the little of CUDA that jaxconv's kernels use, so that the kernels in
// ffi/cuda/*_kernels.cuh can run on a machine without a GPU (tests/emulation.py builds them).
//
// A launch runs its blocks one after another; the threads of a block are real std::threads, so
// __syncthreads is a real barrier and a missing one shows up as a race. `__shared__` becomes
// `static`: one array per kernel instantiation, shared by the threads of the running block,
// which is exactly CUDA's scope since only one block runs at a time. The grid is capped at
// emu::max_blocks blocks (the kernels' grid-stride loops then give each block several tiles).
//
// Warp-level operations (mma.sync, ldmatrix, cp.async, shuffles) are emulated in warp.h: the
// threads t = 32w .. 32w + 31 of a block form warp w and meet at a per-warp barrier in each
// such operation.
//
// __syncthreads_or is two barriers around an atomic OR (below).
//
// What this cannot check: timing, coalescing, bank conflicts, occupancy, register limits,
// divergence within a warp outside the warp operations, and device numerics such as FMA
// contraction or the tensor cores' internal summation order.
#pragma once

#define JAXCONV_CUDA_EMULATION 1

#include <cuda_bf16.h>  // host-side __half / __nv_bfloat16 and dim3, cudaStream_t, cudaError_t
#include <cuda_fp16.h>

#include <barrier>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "warp.h"

// CUDA's headers, compiled by a host compiler, define these as nothing; the kernels need
// __shared__ to mean "one per block".
#undef __global__
#define __global__
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace emu {
struct Index {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Index thread_index, block_index;
inline Index grid_size;
inline std::barrier<>* block_barrier = nullptr;
inline unsigned max_blocks = 3;
}  // namespace emu

#define threadIdx (::emu::thread_index)
#define blockIdx (::emu::block_index)
#define gridDim (::emu::grid_size)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

// __syncthreads_or(p): a barrier that returns non-zero to every thread iff some thread of the
// block passed a non-zero p. Call k of a block ORs into slot k % 2; between the two barriers
// (every thread has ORed, none has started call k + 1) thread 0 clears the other slot, which
// every thread finished reading before call k's first barrier. launch() clears both slots
// before each block; each block's threads are new, so their call counts start at 0.
namespace emu {
inline std::atomic<int> block_or[2];
inline thread_local unsigned block_or_calls = 0;
}  // namespace emu
inline int __syncthreads_or(int predicate) {
  const unsigned slot = emu::block_or_calls++ & 1;
  if (predicate) emu::block_or[slot].fetch_or(1);
  emu::block_barrier->arrive_and_wait();
  const int any = emu::block_or[slot].load();
  if (threadIdx.x == 0) emu::block_or[slot ^ 1].store(0);
  emu::block_barrier->arrive_and_wait();
  return any;
}

namespace jaxconv::cuda {

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, Args... args) {
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1 || block.x == 0 || grid.x == 0)
    return cudaErrorInvalidConfiguration;  // the kernels only use 1-d launches
  const unsigned blocks = grid.x < emu::max_blocks ? grid.x : emu::max_blocks;
  emu::grid_size = {blocks, 1, 1};
  std::barrier<> barrier(block.x);
  emu::block_barrier = &barrier;
  emu::kernel_errors = 0;
  for (unsigned b = 0; b < blocks; ++b) {
    emu::block_or[0].store(0);
    emu::block_or[1].store(0);
    std::vector<std::unique_ptr<emu::Warp>> warps;
    for (unsigned first = 0; first < block.x; first += emu::kWarpSize)
      warps.push_back(std::make_unique<emu::Warp>(
          int(block.x - first < unsigned(emu::kWarpSize) ? block.x - first : emu::kWarpSize)));
    std::vector<std::thread> threads;
    threads.reserve(block.x);
    for (unsigned t = 0; t < block.x; ++t)
      threads.emplace_back([&, b, t] {
        emu::block_index = {b, 0, 0};
        emu::thread_index = {t, 0, 0};
        emu::this_warp = warps[t / emu::kWarpSize].get();
        emu::this_lane = int(t % emu::kWarpSize);
        kernel(args...);
        emu::end_thread();
      });
    for (std::thread& th : threads) th.join();
  }
  emu::block_barrier = nullptr;
  return emu::kernel_errors ? cudaErrorLaunchFailure : cudaSuccess;
}

}  // namespace jaxconv::cuda
