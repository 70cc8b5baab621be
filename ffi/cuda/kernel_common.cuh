// Building blocks of the CUDA kernels: storage/accumulation types, the launch helper, the grid
// size rule.
//
// The kernel headers (this one, conv2d_kernels.cuh, max_pool2d_kernels.cuh) contain no XLA code,
// so they compile in two ways:
//   - with nvcc, for the real module (conv2d.cu, max_pool2d.cu include them);
//   - with a host C++ compiler under JAXCONV_CUDA_EMULATION, where tests/cuda_emulation/emulate.h
//     has already defined dim3, threadIdx/blockIdx, __syncthreads and `launch` (blocks run one
//     after another, the threads of a block as real threads). tests/test_cuda_build.py runs the
//     kernels that way against the oracles on machines without a GPU.
// Kernels therefore use only: __global__/__device__/__forceinline__, __shared__ arrays of fixed
// size, __syncthreads, threadIdx.x/blockIdx.x/gridDim.x. No warp intrinsics, no atomics.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../geometry.h"

#if !defined(JAXCONV_CUDA_EMULATION)
#include <cuda_runtime.h>

namespace jaxconv::cuda {
// Launches kernel<<<grid, block, 0, stream>>>(args...) and returns the launch error (bad
// configuration, no device, no kernel image for this GPU, ...). Errors of the kernel itself
// surface at the next synchronization, which XLA performs.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                   Args... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
  return cudaGetLastError();
}
}  // namespace jaxconv::cuda
#endif

namespace jaxconv::cuda {

// Num<T>: the accumulation type of storage type T and conversions in and out of it. Half types
// accumulate in float32 and round once, to nearest even, when stored.
template <typename T>
struct Num;
template <>
struct Num<float> {
  using acc = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Num<double> {
  using acc = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};
template <>
struct Num<__half> {
  using acc = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// Every kernel walks its work items (tiles or elements) with a grid-stride loop, so any problem
// size runs with a bounded grid; this caps the grid well inside CUDA's 2^31 - 1 limit on x.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

inline unsigned grid_blocks(int64_t items) {
  if (items < 1) return 1;
  return unsigned(items < kMaxBlocks ? items : kMaxBlocks);
}

inline int64_t ceil_div_pos(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace jaxconv::cuda
