// Definitions of the launchers declared in launchers.h, and so every kernel instantiation of
// the CUDA module. ffi/CMakeLists.txt compiles this file once per unit, a (kernel family, dtype)
// pair given as -DJAXCONV_UNIT=<family> -DJAXCONV_UNIT_DTYPE=<dtype>, so that a build spreads
// the kernels over many translation units and nvcc compiles them in parallel:
//
//   family  what the unit instantiates                          kernels per dtype
//   1 pass           launch_conv_forward / _bwd_data: the SIMT    6 (2 tiles x 3 layout/weight
//                    pass; the tensor-core pass is extern here       orders)
//   2 pass_mma_large the tensor-core pass, 128 x 128 tile         4 (float32) or 6 (16-bit)
//   3 pass_mma_small the tensor-core pass, 64 x 64 tile           4 or 6
//   4 filter         conv_bwd_filter_plan / launch_conv_bwd_filter: the SIMT bwd_filter,
//                    the direct (depthwise / few-channel) bwd_filter and the
//                    partial-sum kernel; tensor-core bwd_filter extern          9
//   5 filter_mma_large  tensor-core bwd_filter, 128 x 128         4
//   6 filter_mma_small  tensor-core bwd_filter, 64 x 64           4
//   7 direct         launch_conv_direct (depthwise_kernels.cuh: forward and bwd_data) and
//                    launch_conv_fft (fft_conv.cuh), launch_conv_fft_dense
//                    (fft_conv_dense.cuh); with dtype 0 also the launchers'
//                    non-template functions               8 + 1 + 5 (FFT; none for f64)
//   8 pool           the three max-pool launchers                 12
//
// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16 (the emulation's codes). Families 2, 3, 5
// and 6 exist for the tensor-core types only (0, 2, 3): float64 never runs on tensor cores.
// JAXCONV_UNIT=0 instantiates everything in one unit (the emulated sanitizer harness,
// tests/test_sanitize_harness.py).
//
// The tensor-core launchers (conv2d_mma.cuh) are function templates that the pass and filter
// units would instantiate implicitly; an explicit instantiation declaration (`extern template`)
// below stops that, and the mma units hold the one explicit instantiation definition each.
// The kernel headers themselves are unchanged: this file only chooses where each instantiation
// is compiled.
//
// Under JAXCONV_CUDA_EMULATION (tests/cuda_emulation/emulate.h included first) the same file
// compiles with a host C++ compiler, so that the sanitizer harness can run on the emulation.
#include "launchers.h"

#include "conv2d_kernels.cuh"
#include "depthwise_kernels.cuh"
#include "fft_conv.cuh"
#include "fft_conv_dense.cuh"
#include "max_pool2d_kernels.cuh"

#if !defined(JAXCONV_UNIT) || !defined(JAXCONV_UNIT_DTYPE)
#error "kernel_units.cu is compiled once per unit: -DJAXCONV_UNIT=0..8 -DJAXCONV_UNIT_DTYPE=0..3"
#endif

#define JAXCONV_UNIT_PASS 1
#define JAXCONV_UNIT_PASS_MMA_LARGE 2
#define JAXCONV_UNIT_PASS_MMA_SMALL 3
#define JAXCONV_UNIT_FILTER 4
#define JAXCONV_UNIT_FILTER_MMA_LARGE 5
#define JAXCONV_UNIT_FILTER_MMA_SMALL 6
#define JAXCONV_UNIT_DIRECT 7
#define JAXCONV_UNIT_POOL 8

namespace jaxconv::cuda {

template <int kDtype>
struct UnitDtype;
template <>
struct UnitDtype<0> {
  using type = float;
};
template <>
struct UnitDtype<1> {
  using type = double;
};
template <>
struct UnitDtype<2> {
  using type = __half;
};
template <>
struct UnitDtype<3> {
  using type = __nv_bfloat16;
};
using UnitT = UnitDtype<JAXCONV_UNIT_DTYPE>::type;

// The tensor-core launchers of every type and tile: compiled in their own units only.
#define JAXCONV_MMA_LAUNCHERS(T, Tile)                                                            \
  extern template cudaError_t launch_pass_mma<T, Tile>(PassParams, const T*, const T*, const T*,  \
                                                       T*, bool, cudaStream_t);                   \
  extern template cudaError_t launch_filter_mma<T, Tile>(const FilterParams&, const T*, const T*, \
                                                         T*, float*, bool, cudaStream_t);
JAXCONV_MMA_LAUNCHERS(float, MmaLargeTile)
JAXCONV_MMA_LAUNCHERS(float, MmaSmallTile)
JAXCONV_MMA_LAUNCHERS(__half, MmaLargeTile)
JAXCONV_MMA_LAUNCHERS(__half, MmaSmallTile)
JAXCONV_MMA_LAUNCHERS(__nv_bfloat16, MmaLargeTile)
JAXCONV_MMA_LAUNCHERS(__nv_bfloat16, MmaSmallTile)
#undef JAXCONV_MMA_LAUNCHERS

// ---- The launchers (templates; each unit instantiates its own below) --------------------------
template <typename T>
cudaError_t launch_conv_forward(const ConvGeometry& g, const T* x, const T* w, const T* bias, T* y,
                                bool tensor_cores, cudaStream_t stream) {
  return conv2d_forward<T>(g, x, w, bias, y, stream,
                           PassOptions{tensor_cores, g.p.allow_tf32 != 0});
}
template <typename T>
cudaError_t launch_conv_bwd_data(const ConvGeometry& g, const T* dy, const T* w, const T* bias,
                                 T* dx, bool tensor_cores, cudaStream_t stream) {
  return conv2d_backward_data<T>(g, dy, w, bias, dx, stream,
                                 PassOptions{tensor_cores, g.p.allow_tf32 != 0});
}
// bwd_filter: the direct kernel (depthwise_kernels.cuh) where conv_takes_direct_kernels,
// else the implicit GEMMs; both split over positions by a shape-only plan.
template <typename T>
FilterPlanSize conv_bwd_filter_plan(const ConvGeometry& g, bool tensor_cores) {
  if (direct_conv_applies(g)) {
    using Acc = typename Num<T>::acc;
    return {direct_filter_workspace_bytes<T>(g), plan_direct_filter(g, sizeof(Acc)).splits};
  }
  const FilterLauncher<T> launcher(g, PassOptions{tensor_cores, g.p.allow_tf32 != 0});
  return {launcher.workspace_bytes(), launcher.p.splits};
}
template <typename T>
cudaError_t launch_conv_bwd_filter(const ConvGeometry& g, const T* x, const T* dy, T* dw,
                                   void* workspace, bool tensor_cores, cudaStream_t stream) {
  using Acc = typename Num<T>::acc;
  if (direct_conv_applies(g))
    return direct_conv_bwd_filter<T>(g, x, dy, dw, static_cast<Acc*>(workspace), stream);
  const FilterLauncher<T> launcher(g, PassOptions{tensor_cores, g.p.allow_tf32 != 0});
  return launcher.run(x, dy, dw, static_cast<Acc*>(workspace), stream);
}
template <typename T>
cudaError_t launch_conv_direct(const ConvGeometry& g, int which, const T* a, const T* b,
                               const T* bias, T* out, cudaStream_t stream) {
  return direct_conv<T>(g, which, a, b, bias, out, stream);
}
template <typename T>
cudaError_t launch_conv_fft(const ConvGeometry& g, int which, const FftPlan& plan, const T* a,
                            const T* b, const T* bias, T* out, void* workspace,
                            cudaStream_t stream) {
  return fft_depthwise_conv<T>(g, which, plan, a, b, bias, out, static_cast<float*>(workspace),
                               stream);
}
template <typename T>
cudaError_t launch_conv_fft_dense(const ConvGeometry& g, int which, const FftPlan& plan, const T* a,
                                  const T* b, const T* bias, T* out, void* workspace,
                                  cudaStream_t stream) {
  return fft_dense_conv<T>(g, which, plan, a, b, bias, out, workspace, stream);
}
template <typename T>
cudaError_t launch_max_pool_forward(const PoolGeometry& g, const T* x, T* y, int32_t* idx,
                                    cudaStream_t stream) {
  return max_pool2d_forward<T>(g, x, y, idx, stream);
}
template <typename T>
cudaError_t launch_max_pool_forward_values(const PoolGeometry& g, const T* x, T* y,
                                           cudaStream_t stream) {
  return max_pool2d_forward_values<T>(g, x, y, stream);
}
template <typename T>
cudaError_t launch_max_pool_backward(const PoolGeometry& g, const T* dy, const int32_t* idx, T* dx,
                                     cudaStream_t stream) {
  return max_pool2d_backward<T>(g, dy, idx, dx, stream);
}

// ---- Explicit instantiations, one family per macro ----------------------------------------------
#define JAXCONV_PASS(T)                                                                           \
  template cudaError_t launch_conv_forward<T>(const ConvGeometry&, const T*, const T*, const T*,  \
                                              T*, bool, cudaStream_t);                            \
  template cudaError_t launch_conv_bwd_data<T>(const ConvGeometry&, const T*, const T*, const T*, \
                                               T*, bool, cudaStream_t);
#define JAXCONV_PASS_MMA(T, Tile)                                                             \
  template cudaError_t launch_pass_mma<T, Tile>(PassParams, const T*, const T*, const T*, T*, \
                                                bool, cudaStream_t);
#define JAXCONV_FILTER(T)                                                                     \
  template FilterPlanSize conv_bwd_filter_plan<T>(const ConvGeometry&, bool);                 \
  template cudaError_t launch_conv_bwd_filter<T>(const ConvGeometry&, const T*, const T*, T*, \
                                                 void*, bool, cudaStream_t);
#define JAXCONV_FILTER_MMA(T, Tile)                                                            \
  template cudaError_t launch_filter_mma<T, Tile>(const FilterParams&, const T*, const T*, T*, \
                                                  float*, bool, cudaStream_t);
#define JAXCONV_DIRECT(T)                                                                     \
  template cudaError_t launch_conv_direct<T>(const ConvGeometry&, int, const T*, const T*,    \
                                             const T*, T*, cudaStream_t);                     \
  template cudaError_t launch_conv_fft<T>(const ConvGeometry&, int, const FftPlan&, const T*, \
                                          const T*, const T*, T*, void*, cudaStream_t);       \
  template cudaError_t launch_conv_fft_dense<T>(const ConvGeometry&, int, const FftPlan&,     \
                                                const T*, const T*, const T*, T*, void*,      \
                                                cudaStream_t);
#define JAXCONV_POOL(T)                                                                           \
  template cudaError_t launch_max_pool_forward<T>(const PoolGeometry&, const T*, T*, int32_t*,    \
                                                  cudaStream_t);                                  \
  template cudaError_t launch_max_pool_forward_values<T>(const PoolGeometry&, const T*, T*,       \
                                                         cudaStream_t);                           \
  template cudaError_t launch_max_pool_backward<T>(const PoolGeometry&, const T*, const int32_t*, \
                                                   T*, cudaStream_t);

#if JAXCONV_UNIT == 0 || (JAXCONV_UNIT == JAXCONV_UNIT_DIRECT && JAXCONV_UNIT_DTYPE == 0)
// The launchers' non-template functions: in exactly one unit.
bool conv_takes_direct_kernels(const ConvGeometry& g) { return direct_conv_applies(g); }
std::string conv_bwd_filter_workspace_error(const char* target, int64_t bytes, int64_t splits) {
  return filter_workspace_error(target, bytes, splits);
}
#endif

#if JAXCONV_UNIT == 0
#define JAXCONV_ALL_FAMILIES(T) JAXCONV_PASS(T) JAXCONV_FILTER(T) JAXCONV_DIRECT(T) JAXCONV_POOL(T)
#define JAXCONV_ALL_MMA(T)          \
  JAXCONV_PASS_MMA(T, MmaLargeTile) \
  JAXCONV_PASS_MMA(T, MmaSmallTile) \
  JAXCONV_FILTER_MMA(T, MmaLargeTile) JAXCONV_FILTER_MMA(T, MmaSmallTile)
JAXCONV_ALL_FAMILIES(float)
JAXCONV_ALL_FAMILIES(double)
JAXCONV_ALL_FAMILIES(__half)
JAXCONV_ALL_FAMILIES(__nv_bfloat16)
JAXCONV_ALL_MMA(float)
JAXCONV_ALL_MMA(__half)
JAXCONV_ALL_MMA(__nv_bfloat16)
#elif JAXCONV_UNIT == JAXCONV_UNIT_PASS
JAXCONV_PASS(UnitT)
#elif JAXCONV_UNIT == JAXCONV_UNIT_PASS_MMA_LARGE
JAXCONV_PASS_MMA(UnitT, MmaLargeTile)
#elif JAXCONV_UNIT == JAXCONV_UNIT_PASS_MMA_SMALL
JAXCONV_PASS_MMA(UnitT, MmaSmallTile)
#elif JAXCONV_UNIT == JAXCONV_UNIT_FILTER
JAXCONV_FILTER(UnitT)
#elif JAXCONV_UNIT == JAXCONV_UNIT_FILTER_MMA_LARGE
JAXCONV_FILTER_MMA(UnitT, MmaLargeTile)
#elif JAXCONV_UNIT == JAXCONV_UNIT_FILTER_MMA_SMALL
JAXCONV_FILTER_MMA(UnitT, MmaSmallTile)
#elif JAXCONV_UNIT == JAXCONV_UNIT_DIRECT
JAXCONV_DIRECT(UnitT)
#elif JAXCONV_UNIT == JAXCONV_UNIT_POOL
JAXCONV_POOL(UnitT)
#else
#error "unknown JAXCONV_UNIT"
#endif

}  // namespace jaxconv::cuda
