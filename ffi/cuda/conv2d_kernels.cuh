// CUDA convolution kernels: forward, bwd_data (= transposed convolution) and bwd_filter, as
// shared-memory tiled implicit GEMMs on CUDA cores (SIMT) or tensor cores (mma.sync). This
// umbrella header includes the levels, each its own self-contained header, lowest first (as
// CUTLASS splits a convolution into problem, threadblock kernels, selection and device-level
// launch; tests/test_cuda_headers_conv.py compiles each one alone):
//   conv2d_problem.cuh  the problem and its parameters: the pass (forward, bwd_data by stride
//                       phase) and bwd_filter as GEMMs, built from a ConvGeometry; each tile's
//                       coordinates and axes; PassOptions; when offsets fit in int32;
//   conv2d_simt.cuh     the SIMT kernels: the pass and bwd_filter, one shared micro-tile;
//   conv2d_mma.cuh      the tensor-core kernels and their launchers (its own level headers);
//   split_reduce.cuh    bwd_filter's deterministic split reduction: the shape-only block target,
//                       the workspace cap, the partial-sum kernel (also used by the direct
//                       kernels of depthwise_kernels.cuh);
//   conv2d_plan.cuh     kernel selection (choose_pass_kernel, choose_filter_kernel) and
//                       bwd_filter's split plan (plan_filter), host functions of the shape;
//   conv2d_launch.cuh   the launchers: run_pass / conv2d_forward / conv2d_backward_data and
//                       FilterLauncher.
// The handlers reach all of it through launchers.h; kernel_units.cu instantiates it.
#pragma once

#include "conv2d_problem.cuh"
#include "conv2d_simt.cuh"
#include "split_reduce.cuh"
#include "conv2d_plan.cuh"
#include "conv2d_launch.cuh"
