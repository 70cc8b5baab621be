// Tensor-core kernels (sm_80+): forward and bwd_data of conv2d_kernels.cuh's "pass", and
// bwd_filter, as implicit GEMMs on mma.sync, for bfloat16/float16 operands (m16n8k16) and
// float32 operands rounded to TF32 (m16n8k8), always accumulating in float32. Included by
// conv2d_launch.cuh.
//
// This umbrella header includes the levels, each its own header, lowest first (as CUTLASS
// splits a GEMM into threadblock configuration, warp-level iterators, the pipelined main loop,
// kernels and device-level launch):
//   conv2d_mma_tile.cuh      tile configurations (MmaTile), shared-memory stage layouts, the
//                            mma dtypes (MmaOf), the per-launch load plan (MmaLoads);
//   conv2d_mma_fragment.cuh  warp-level iterators: a warp's A / B fragments of one k-step out
//                            of a shared stage (ldmatrix / ldmatrix.trans / TF32 words);
//   conv2d_mma_mainloop.cuh  the cp.async pipeline over the stages and the multiply
//                            (mma_mainloop), and the walk over a warp's accumulators that
//                            every epilogue uses;
//   conv2d_mma_pass.cuh      the pass kernels (general; precomputed iterators for NHWC);
//   conv2d_mma_filter.cuh    the bwd_filter kernels (general; precomputed iterators for NHWC);
//   conv2d_mma_launch.cuh    host: which instantiation serves a launch, and the launchers.
// Each compiles alone (tests/test_cuda_headers.py checks it, under nvcc and under the host
// emulation); the last three take the conv problem types from conv2d_problem.cuh.
//
// Loads are 16-byte cp.async where 8 (16-bit) or 4 (float) consecutive elements of a chunk are
// consecutive and aligned in memory (NHWC activations with channels per group a multiple of the
// vector; weights along k or along output channels); every other case (NCHW activations, odd
// channel counts) gathers element by element into the same layout, so all geometries the SIMT
// kernel handles run here too.
#pragma once

#include "conv2d_mma_tile.cuh"
#include "conv2d_mma_fragment.cuh"
#include "conv2d_mma_mainloop.cuh"
#include "conv2d_mma_pass.cuh"
#include "conv2d_mma_filter.cuh"
#include "conv2d_mma_launch.cuh"
