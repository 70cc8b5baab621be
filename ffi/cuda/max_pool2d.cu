// CUDA max-pooling handlers: forward (values + int32 indices), the values-only forward (y alone,
// for max_pool2d without a gradient) and backward.
//
// Same targets, attributes and validation as ffi/cpu/max_pool2d.cc; the kernels are in
// max_pool2d_kernels.cuh, reached through the launchers of launchers.h (instantiated in
// kernel_units.cu's pool units; this file compiles no kernel).
#include <cstdint>

#include "cuda_ffi.h"
#include "launchers.h"

namespace jaxconv::cuda {
namespace {

ffi::Error MaxPool2dFwdImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                            ffi::Result<ffi::AnyBuffer> idx, ffi::Dictionary attrs) {
  constexpr const char* kTarget = targets::kMaxPool2dFwd;
  PoolGeometry g;
  JAXCONV_RETURN_IF_ERROR(decode_pool_call(attrs, x, *y, *idx, kTarget, &g));
  return dispatch_float(x.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    return check_cuda(
        kTarget, launch_max_pool_forward<T>(g, static_cast<const T*>(x.untyped_data()),
                                            static_cast<T*>(y->untyped_data()),
                                            static_cast<int32_t*>(idx->untyped_data()), stream));
  });
}

ffi::Error MaxPool2dFwdValuesImpl(cudaStream_t stream, ffi::AnyBuffer x,
                                  ffi::Result<ffi::AnyBuffer> y, ffi::Dictionary attrs) {
  constexpr const char* kTarget = targets::kMaxPool2dFwdValues;
  PoolGeometry g;
  JAXCONV_RETURN_IF_ERROR(decode_pool_call(attrs, x, *y, kTarget, &g));
  return dispatch_float(x.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    return check_cuda(
        kTarget, launch_max_pool_forward_values<T>(g, static_cast<const T*>(x.untyped_data()),
                                                   static_cast<T*>(y->untyped_data()), stream));
  });
}

ffi::Error MaxPool2dBwdImpl(cudaStream_t stream, ffi::AnyBuffer dy, ffi::AnyBuffer idx,
                            ffi::Result<ffi::AnyBuffer> dx, ffi::Dictionary attrs) {
  constexpr const char* kTarget = targets::kMaxPool2dBwd;
  PoolGeometry g;
  JAXCONV_RETURN_IF_ERROR(decode_pool_call(attrs, *dx, dy, idx, kTarget, &g));
  return dispatch_float(dy.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    return check_cuda(kTarget,
                      launch_max_pool_backward<T>(g, static_cast<const T*>(dy.untyped_data()),
                                                  static_cast<const int32_t*>(idx.untyped_data()),
                                                  static_cast<T*>(dx->untyped_data()), stream));
  });
}

}  // namespace
}  // namespace jaxconv::cuda

namespace jaxconv {
namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPool2dFwdCuda, cuda::MaxPool2dFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>()  // indices (int32)
                                  .Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPool2dFwdValuesCuda, cuda::MaxPool2dFwdValuesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPool2dBwdCuda, cuda::MaxPool2dBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // indices (int32)
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Attrs());

}  // namespace jaxconv
