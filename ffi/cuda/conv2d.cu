// CUDA convolution handlers: forward, bwd_data (= transposed convolution) and bwd_filter.
//
// Same targets, attributes and validation as ffi/cpu/conv2d.cc (ffi_common.h rebuilds and checks
// the geometry); the kernels are in conv2d_kernels.cuh (its level headers), conv2d_mma.cuh and
// depthwise_kernels.cuh, reached through the launchers of launchers.h, which kernel_units.cu
// instantiates in units of their own (this file compiles no kernel). Work is enqueued on the
// stream XLA gives the call and never synchronized here.
#include <cstdint>

#include <type_traits>

#include "cuda_ffi.h"
#include "fft_conv_choice.h"
#include "launchers.h"

namespace jaxconv::cuda {
namespace {

// Whether the current device has mma.sync/cp.async (sm_80+), for the tensor-core kernels. A
// failed query keeps the SIMT kernels.
bool has_tensor_cores() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major >= 8;
}

// The dense FFT's workspace (fft_conv_choice.h, cuda_dense_workspace; bounded by
// kCudaFftDenseMaxWorkspace when planned) from XLA's allocator, released when the call returns,
// like bwd_filter's partial sums below. Without it the call fails rather than switching to the
// direct kernels, which would sum in another order.
ffi::Error dense_fft_workspace(ffi::ScratchAllocator& scratch, const CudaAlgoChoice& algo,
                               const char* target, void** ws) {
  auto mem = scratch.Allocate(size_t(algo.workspace_bytes), 256);
  if (!mem.has_value())
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      std::string(target) + ": cannot allocate the dense FFT workspace (" +
                          std::to_string(algo.workspace_bytes) +
                          " bytes); JAXCONV_CUDA_CONV_ALGO=direct avoids it");
  *ws = *mem;
  return ffi::Error::Success();
}

ffi::Error Conv2dFwdImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                         ffi::AnyBuffer w, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                         ffi::Dictionary attrs) {
  constexpr const char* kTarget = targets::kConv2dFwd;
  ConvGeometry g;
  JAXCONV_RETURN_IF_ERROR(decode_conv_call(attrs, x, w, *y, bias, ConvBias::kForward, kTarget, &g));
  if (g.N == 0) return ffi::Error::Success();
  return dispatch_float(x.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    // FFT (depthwise, stride 1) where the choice takes it, or an error where it is forced and
    // cannot run (fft_conv_choice.h).
    const CudaAlgoChoice algo =
        choose_cuda_conv_algo(g, ConvDirection::kForward, std::is_same_v<T, double>);
    if (!algo.error.empty()) return invalid(kTarget, algo.error);
    if (algo.fft.valid() && algo.dense) {
      void* ws = nullptr;
      JAXCONV_RETURN_IF_ERROR(dense_fft_workspace(scratch, algo, kTarget, &ws));
      return check_cuda(kTarget, launch_conv_fft_dense<T>(
                                     g, 0, algo.fft, static_cast<const T*>(x.untyped_data()),
                                     static_cast<const T*>(w.untyped_data()), bias_or_null<T>(bias),
                                     static_cast<T*>(y->untyped_data()), ws, stream));
    }
    if (algo.fft.valid())
      return check_cuda(kTarget, launch_conv_fft<T>(
                                     g, 0, algo.fft, static_cast<const T*>(x.untyped_data()),
                                     static_cast<const T*>(w.untyped_data()), bias_or_null<T>(bias),
                                     static_cast<T*>(y->untyped_data()), nullptr, stream));
    if (conv_takes_direct_kernels(g))  // depthwise or <= 4 input channels
      return check_cuda(kTarget, launch_conv_direct<T>(
                                     g, 0, static_cast<const T*>(x.untyped_data()),
                                     static_cast<const T*>(w.untyped_data()), bias_or_null<T>(bias),
                                     static_cast<T*>(y->untyped_data()), stream));
    return check_cuda(kTarget, launch_conv_forward<T>(
                                   g, static_cast<const T*>(x.untyped_data()),
                                   static_cast<const T*>(w.untyped_data()), bias_or_null<T>(bias),
                                   static_cast<T*>(y->untyped_data()), has_tensor_cores(), stream));
  });
}

ffi::Error Conv2dBwdDataImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer dy,
                             ffi::AnyBuffer w, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> dx,
                             ffi::Dictionary attrs) {
  constexpr const char* kTarget = targets::kConv2dBwdData;
  ConvGeometry g;
  JAXCONV_RETURN_IF_ERROR(
      decode_conv_call(attrs, *dx, w, dy, bias, ConvBias::kBwdData, kTarget, &g));
  if (g.N == 0) return ffi::Error::Success();
  return dispatch_float(dy.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const CudaAlgoChoice algo =
        choose_cuda_conv_algo(g, ConvDirection::kBackwardData, std::is_same_v<T, double>);
    if (!algo.error.empty()) return invalid(kTarget, algo.error);
    if (algo.fft.valid() && algo.dense) {
      void* ws = nullptr;
      JAXCONV_RETURN_IF_ERROR(dense_fft_workspace(scratch, algo, kTarget, &ws));
      return check_cuda(kTarget, launch_conv_fft_dense<T>(
                                     g, 1, algo.fft, static_cast<const T*>(dy.untyped_data()),
                                     static_cast<const T*>(w.untyped_data()), bias_or_null<T>(bias),
                                     static_cast<T*>(dx->untyped_data()), ws, stream));
    }
    if (algo.fft.valid())
      return check_cuda(kTarget, launch_conv_fft<T>(
                                     g, 1, algo.fft, static_cast<const T*>(dy.untyped_data()),
                                     static_cast<const T*>(w.untyped_data()), bias_or_null<T>(bias),
                                     static_cast<T*>(dx->untyped_data()), nullptr, stream));
    if (conv_takes_direct_kernels(g))
      return check_cuda(kTarget, launch_conv_direct<T>(
                                     g, 1, static_cast<const T*>(dy.untyped_data()),
                                     static_cast<const T*>(w.untyped_data()), bias_or_null<T>(bias),
                                     static_cast<T*>(dx->untyped_data()), stream));
    return check_cuda(
        kTarget,
        launch_conv_bwd_data<T>(g, static_cast<const T*>(dy.untyped_data()),
                                static_cast<const T*>(w.untyped_data()), bias_or_null<T>(bias),
                                static_cast<T*>(dx->untyped_data()), has_tensor_cores(), stream));
  });
}

ffi::Error Conv2dBwdFilterImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                               ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                               ffi::Dictionary attrs) {
  constexpr const char* kTarget = targets::kConv2dBwdFilter;
  ConvGeometry g;
  JAXCONV_RETURN_IF_ERROR(decode_conv_call(attrs, x, *dw, dy, kTarget, &g));
  if (g.N == 0) {
    // A sum over no positions: zero bits are 0.0 in all four float formats.
    cudaError_t err = cudaMemsetAsync(dw->untyped_data(), 0, dw->size_bytes(), stream);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return cuda_error(kTarget, "cudaMemsetAsync failed", err);
    }
    return ffi::Error::Success();
  }
  return dispatch_float(x.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const CudaAlgoChoice algo =
        choose_cuda_conv_algo(g, ConvDirection::kBackwardFilter, std::is_same_v<T, double>);
    if (!algo.error.empty()) return invalid(kTarget, algo.error);
    if (algo.fft.valid() && algo.dense) {
      void* ws = nullptr;
      JAXCONV_RETURN_IF_ERROR(dense_fft_workspace(scratch, algo, kTarget, &ws));
      return check_cuda(
          kTarget, launch_conv_fft_dense<T>(g, 2, algo.fft, static_cast<const T*>(x.untyped_data()),
                                            static_cast<const T*>(dy.untyped_data()), nullptr,
                                            static_cast<T*>(dw->untyped_data()), ws, stream));
    }
    if (algo.fft.valid()) {
      // The per-tile tap sums (fft_conv.cuh), from XLA's allocator like the split plan's partial
      // sums below; without them the call fails (another algorithm would sum in another order).
      const int64_t bytes = cuda_fft_workspace_bytes(g, ConvDirection::kBackwardFilter, algo.fft);
      auto mem = scratch.Allocate(size_t(bytes), 256);
      if (!mem.has_value())
        return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                          std::string(kTarget) +
                              ": cannot allocate the FFT bwd_filter workspace (" +
                              std::to_string(bytes) + " bytes)");
      return check_cuda(kTarget,
                        launch_conv_fft<T>(g, 2, algo.fft, static_cast<const T*>(x.untyped_data()),
                                           static_cast<const T*>(dy.untyped_data()), nullptr,
                                           static_cast<T*>(dw->untyped_data()), *mem, stream));
    }
    // Kernel (direct for depthwise / few channels, else an implicit GEMM) and split plan:
    // functions of the shape, dtype, layout, allow_tf32 and tensor_cores only.
    const bool tensor_cores = has_tensor_cores();
    const FilterPlanSize plan = conv_bwd_filter_plan<T>(g, tensor_cores);
    void* workspace = nullptr;
    if (plan.workspace_bytes > 0) {
      // Device memory from XLA's allocator, released when this call returns; XLA orders later
      // users of it after the work enqueued here on the same stream. Without it, fail: another
      // plan would sum in another order (split_reduce.cuh).
      auto mem = scratch.Allocate(size_t(plan.workspace_bytes), 256);
      if (!mem.has_value())
        return ffi::Error(
            ffi::ErrorCode::kResourceExhausted,
            conv_bwd_filter_workspace_error(kTarget, plan.workspace_bytes, plan.splits));
      workspace = *mem;
    }
    return check_cuda(kTarget, launch_conv_bwd_filter<T>(g, static_cast<const T*>(x.untyped_data()),
                                                         static_cast<const T*>(dy.untyped_data()),
                                                         static_cast<T*>(dw->untyped_data()),
                                                         workspace, tensor_cores, stream));
  });
}

}  // namespace
}  // namespace jaxconv::cuda

namespace jaxconv {
namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv2dFwdCuda, cuda::Conv2dFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()  // dense FFT workspace
                                  .Arg<ffi::AnyBuffer>()         // x
                                  .Arg<ffi::AnyBuffer>()         // w
                                  .Arg<ffi::AnyBuffer>()         // bias, (O,) or (0,)
                                  .Ret<ffi::AnyBuffer>()         // y
                                  .Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv2dBwdDataCuda, cuda::Conv2dBwdDataImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()  // dense FFT workspace
                                  .Arg<ffi::AnyBuffer>()         // dy
                                  .Arg<ffi::AnyBuffer>()         // w
                                  .Arg<ffi::AnyBuffer>()         // bias, (C,) or (0,)
                                  .Ret<ffi::AnyBuffer>()         // dx
                                  .Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv2dBwdFilterCuda, cuda::Conv2dBwdFilterImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()  // bwd_filter partial sums
                                  .Arg<ffi::AnyBuffer>()         // x
                                  .Arg<ffi::AnyBuffer>()         // dy
                                  .Ret<ffi::AnyBuffer>()         // dw
                                  .Attrs());

}  // namespace jaxconv
