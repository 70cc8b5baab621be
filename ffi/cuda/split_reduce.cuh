// bwd_filter's deterministic split reduction, shared by the implicit GEMMs (conv2d_plan.cuh's
// plan_filter) and the direct depthwise / few-channel kernel (depthwise_kernels.cuh): the
// shape-only block target every split plan aims at, the workspace cap of the partial sums, the
// handler's message when that workspace cannot be had, and the second pass that adds the
// partial sums in split order.
//
// A split plan cuts the reduction over positions into `splits` chunks whose partial sums
// partial[split] (laid out like dw, in the accumulation type) are added by sum_partials_kernel
// in split order, so the plan fixes the summation order. It must therefore not depend on the
// GPU (SM count, MIG slice) nor on how much memory is free: the same shape, dtype and layout
// give the same bits on every GPU that runs the same build. kFilterSplitTargetBlocks stands in
// for "about 4 blocks per SM" on a typical large GPU (132 SMs: an H100 SXM); smaller GPUs simply
// run the blocks in more waves. When the workspace for the partial sums cannot be had, the
// handler fails with an error instead of changing order. No atomics anywhere.
#pragma once

#include <cstdint>
#include <string>

#include "kernel_common.cuh"

namespace jaxconv::cuda {

constexpr int64_t kFilterSplitTargetBlocks = 4 * 132;
// Workspace cap for the partial sums of bwd_filter (bounds the splits of very large filters).
constexpr int64_t kMaxFilterWorkspaceBytes = int64_t(256) << 20;

// The handler's error when XLA's scratch allocator cannot give the workspace (here so that the
// emulation tests check the same text).
inline std::string filter_workspace_error(const char* target, int64_t bytes, int64_t splits) {
  return std::string(target) + ": could not allocate " + std::to_string(bytes) +
         " bytes of device scratch for the partial sums of its " + std::to_string(splits) +
         "-way split reduction. The split is fixed by the problem's shape so that results are "
         "reproducible, hence no fallback to another summation order; free device memory "
         "(smaller batch, fewer live arrays) or give XLA's allocator more "
         "(XLA_PYTHON_CLIENT_MEM_FRACTION)";
}

template <typename T>
__global__ void __launch_bounds__(256)
    sum_partials_kernel(const typename Num<T>::acc* __restrict__ partial, int64_t splits,
                        int64_t elems, T* __restrict__ dw) {
  using Acc = typename Num<T>::acc;
  const int64_t stride = int64_t(gridDim.x) * 256;
  for (int64_t i = int64_t(blockIdx.x) * 256 + threadIdx.x; i < elems; i += stride) {
    Acc s = Acc(0);
    for (int64_t k = 0; k < splits; ++k) s += partial[k * elems + i];
    dw[i] = Num<T>::store(s);
  }
}

}  // namespace jaxconv::cuda
