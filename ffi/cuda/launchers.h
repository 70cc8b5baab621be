// Host-side entry points of jaxconv's CUDA kernels, one per kernel family and direction: what
// the FFI handlers (conv2d.cu, max_pool2d.cu) and the sanitizer harness
// (benchmarks/sanitize_harness.cu) call. Declarations only, no device code: each launcher is
// defined and explicitly instantiated in kernel_units.cu, which ffi/CMakeLists.txt compiles
// once per (kernel family, dtype), so that the kernels of one build are spread over many
// translation units that nvcc compiles in parallel (a single unit holding every instantiation
// took as long on 16 cores as on one).
//
// T is float, double, __half or __nv_bfloat16. Every launcher enqueues on `stream`, never
// synchronizes, and returns the launch error (cudaSuccess when there is nothing to do). The
// geometry comes from geometry.h (make_conv_geometry / make_pool_geometry), already validated.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "../fft_plan.h"
#include "../geometry.h"

namespace jaxconv::cuda {

// ---- Convolution ------------------------------------------------------------------------------
// `tensor_cores`: the device has mma.sync/cp.async (sm_80+). Whether float32 may round to TF32
// is the geometry's own attribute, g.p.allow_tf32. The kernel and tile follow from these and the
// shape (choose_pass_kernel / choose_filter_kernel in conv2d_plan.cuh).

// Depthwise (groups == C) and few-channel (C <= 4) convolutions take the direct kernels
// (depthwise_kernels.cuh) in all three directions; the others the implicit GEMMs below.
bool conv_takes_direct_kernels(const ConvGeometry& g);

// which: 0 forward (a = x, b = w, out = y), 1 bwd_data (a = dy, b = w, out = dx). Only where
// conv_takes_direct_kernels(g). Their bwd_filter, which needs a workspace for its split, goes
// through conv_bwd_filter_plan / launch_conv_bwd_filter like every other shape.
template <typename T>
cudaError_t launch_conv_direct(const ConvGeometry& g, int which, const T* a, const T* b,
                               const T* bias, T* out, cudaStream_t stream);

// FFT depthwise convolution (fft_conv.cuh), stride 1: which 0 forward, 1 bwd_data, 2
// bwd_filter, operands as launch_conv_direct, with the plan from choose_cuda_conv_algo
// (fft_conv_choice.h). bwd_filter needs a workspace of cuda_fft_workspace_bytes (256-byte
// aligned); the others take null. Float64 is never planned (returns cudaErrorInvalidValue).
template <typename T>
cudaError_t launch_conv_fft(const ConvGeometry& g, int which, const FftPlan& plan, const T* a,
                            const T* b, const T* bias, T* out, void* workspace,
                            cudaStream_t stream);

// Dense / grouped FFT convolution (fft_conv_dense.cuh), stride 1: which 0 forward, 1 bwd_data,
// 2 bwd_filter (a = x, b = dy, out = dw, bias null), otherwise operands as launch_conv_direct, with
// the plan from choose_cuda_conv_algo (its `dense` set) and a workspace of its workspace_bytes
// (256-byte aligned). Float64 is never planned.
template <typename T>
cudaError_t launch_conv_fft_dense(const ConvGeometry& g, int which, const FftPlan& plan, const T* a,
                                  const T* b, const T* bias, T* out, void* workspace,
                                  cudaStream_t stream);

// y = conv(x, w) + bias; bias (O,) or null.
template <typename T>
cudaError_t launch_conv_forward(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y,
                                bool tensor_cores, cudaStream_t stream);

// dx = conv_transpose(dy, w) + bias; bias (C,) or null.
template <typename T>
cudaError_t launch_conv_bwd_data(const ConvGeometry& g, const T* dy, const T* w, const T* bias,
                                 T* dx, bool tensor_cores, cudaStream_t stream);

// bwd_filter in two calls, so that the caller allocates the partial sums between them. The
// plan (kernel, split count) is a function of the shape, dtype, layout, allow_tf32 and
// tensor_cores only, so both calls see the same one. workspace_bytes == 0: no workspace.
// Direct shapes (conv_takes_direct_kernels) run the direct kernel, split the same way.
struct FilterPlanSize {
  int64_t workspace_bytes;
  int64_t splits;
};
template <typename T>
FilterPlanSize conv_bwd_filter_plan(const ConvGeometry& g, bool tensor_cores);
// Expects g.N > 0 (an empty reduction is a memset, done by the caller) and a workspace of
// conv_bwd_filter_plan's bytes (float32 for half types, else T's type), 256-byte aligned.
template <typename T>
cudaError_t launch_conv_bwd_filter(const ConvGeometry& g, const T* x, const T* dy, T* dw,
                                   void* workspace, bool tensor_cores, cudaStream_t stream);

// The handler's message when XLA's scratch allocator cannot give bwd_filter its workspace
// (split_reduce.cuh, filter_workspace_error).
std::string conv_bwd_filter_workspace_error(const char* target, int64_t bytes, int64_t splits);

// ---- Max pooling ------------------------------------------------------------------------------
// y and its int32 indices (flat h * W + w per plane).
template <typename T>
cudaError_t launch_max_pool_forward(const PoolGeometry& g, const T* x, T* y, int32_t* idx,
                                    cudaStream_t stream);
// y alone, bit for bit the y of launch_max_pool_forward.
template <typename T>
cudaError_t launch_max_pool_forward_values(const PoolGeometry& g, const T* x, T* y,
                                           cudaStream_t stream);
template <typename T>
cudaError_t launch_max_pool_backward(const PoolGeometry& g, const T* dy, const int32_t* idx, T* dx,
                                     cudaStream_t stream);

}  // namespace jaxconv::cuda
