// Max-pooling kernels of one capability (kernel_table.h): the table entries, which pick the
// layout's kernels. The semantics are in max_pool2d.cc; each layout's forward and backward sit
// side by side in max_pool2d_nchw.h and max_pool2d_nhwc.h, on the selection rule and window walk
// of max_pool2d_scan.h (the structure of ATen's MaxPoolKernel.cpp: one template per layout).
//
// A lane's running maximum is a chain of dependent compare+blend steps, one per tap. One such
// chain per register leaves the vector units idle most of the time, so the kernels scan up to
// Window::kChains registers side by side (consecutive output blocks in NCHW, channel blocks in
// NHWC).
#include <cstdint>

#include "cpu_common.h"
#include "kernel_table.h"
#include "max_pool2d_nchw.h"
#include "max_pool2d_nhwc.h"

namespace jaxconv::JAXCONV_CPU_CAPABILITY {
namespace {

using max_pool::Nchw;
using max_pool::Nhwc;

template <typename T, bool kIndices>
void forward_any(const ParallelRunner& pr, const PoolGeometry& g, const T* x, T* y, int32_t* idx) {
  if (g.N == 0 || g.C == 0) return;
  if (g.p.layout == kNHWC)
    Nhwc<T, kIndices>(g).forward(pr, x, y, idx);
  else
    Nchw<T, kIndices>(g).forward(pr, x, y, idx);
}

template <typename T>
void forward(const ParallelRunner& pr, const PoolGeometry& g, const T* x, T* y, int32_t* idx) {
  forward_any<T, true>(pr, g, x, y, idx);
}

template <typename T>
void forward_values(const ParallelRunner& pr, const PoolGeometry& g, const T* x, T* y) {
  forward_any<T, false>(pr, g, x, y, nullptr);
}

template <typename T>
void backward(const ParallelRunner& pr, const PoolGeometry& g, const T* dy, const int32_t* idx,
              T* dx) {
  if (g.N == 0 || g.C == 0) return;
  if (g.p.layout == kNHWC)
    Nhwc<T, true>(g).backward(pr, dy, idx, dx);
  else
    Nchw<T, true>(g).backward(pr, dy, idx, dx);
}

template <typename T>
PoolKernels<T> pool_kernels() {
  return {forward<T>, forward_values<T>, backward<T>};
}

}  // namespace

void add_pool_kernels(KernelTable* table) {
  table->pool_f32 = pool_kernels<float>();
  table->pool_f64 = pool_kernels<double>();
  table->pool_f16 = pool_kernels<f16_t>();
  table->pool_bf16 = pool_kernels<bf16_t>();
}

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY
