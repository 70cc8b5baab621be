// The FFT kernels of one capability in the kernel table (fft.h): depthwise layers (one input
// and one output channel per group) take fft_depthwise.cc's kernels, every other layer
// fft_dense.cc's (a complex GEMM per frequency). float64 stays direct (null entries).
#include "fft.h"

#include "fft_kernels.h"
#include "kernel_table.h"

namespace jaxconv::JAXCONV_CPU_CAPABILITY {
namespace {

bool depthwise(const ConvGeometry& g) { return g.in_per_group() == 1 && g.out_per_group() == 1; }

template <typename T>
bool fft_forward(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl, const T* x,
                 const T* w, const T* bias, T* y) {
  return depthwise(g) ? fft::depthwise_fft_forward(pr, g, pl, x, w, bias, y)
                      : fft::dense_fft_forward(pr, g, pl, x, w, bias, y);
}

template <typename T>
bool fft_backward_data(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                       const T* dy, const T* w, const T* bias, T* dx) {
  return depthwise(g) ? fft::depthwise_fft_backward_data(pr, g, pl, dy, w, bias, dx)
                      : fft::dense_fft_backward_data(pr, g, pl, dy, w, bias, dx);
}

template <typename T>
bool fft_backward_filter(const ParallelRunner& pr, const ConvGeometry& g, const FftPlan& pl,
                         const T* x, const T* dy, T* dw) {
  return depthwise(g) ? fft::depthwise_fft_backward_filter(pr, g, pl, x, dy, dw)
                      : fft::dense_fft_backward_filter(pr, g, pl, x, dy, dw);
}

}  // namespace

void add_fft_kernels(KernelTable* t) {
  t->fft_f32 = {fft_forward<float>, fft_backward_data<float>, fft_backward_filter<float>};
  t->fft_f64 = {nullptr, nullptr, nullptr};
  t->fft_f16 = {fft_forward<f16_t>, fft_backward_data<f16_t>, fft_backward_filter<f16_t>};
  t->fft_bf16 = {fft_forward<bf16_t>, fft_backward_data<bf16_t>, fft_backward_filter<bf16_t>};
}

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY
