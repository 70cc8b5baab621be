// CPU convolution handlers: forward, bwd_data (= transposed convolution) and bwd_filter. Each
// decodes and checks its call (ffi_common.h), then runs Conv<T> (conv.h) for the dtype.
#include <cstdint>

#include "conv.h"
#include "cpu_common.h"
#include "conv_algo.h"
#include "kernel_table.h"

namespace jaxconv {
namespace {

ffi::Error Conv2dFwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                         ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                         ffi::Dictionary attrs) {
  constexpr const char* kTarget = targets::kConv2dFwd;
  ConvGeometry g;
  JAXCONV_RETURN_IF_ERROR(decode_conv_call(attrs, x, w, *y, bias, ConvBias::kForward, kTarget, &g));
  JAXCONV_RETURN_IF_ERROR(check_cpu_capability_env(kTarget));
  JAXCONV_RETURN_IF_ERROR(check_conv_algo_env(kTarget));
  JAXCONV_RETURN_IF_ERROR(check_forced_algo(kTarget, g, ConvDirection::kForward,
                                            x.element_type() == ffi::DataType::F64));
  if (g.N == 0) return ffi::Error::Success();
  ParallelRunner pr(&pool);
  return dispatch_float(x.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    Conv<T>(g).forward(pr, static_cast<const T*>(x.untyped_data()),
                       static_cast<const T*>(w.untyped_data()), bias_or_null<T>(bias),
                       static_cast<T*>(y->untyped_data()));
    return ffi::Error::Success();
  });
}

ffi::Error Conv2dBwdDataImpl(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer w,
                             ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> dx,
                             ffi::Dictionary attrs) {
  constexpr const char* kTarget = targets::kConv2dBwdData;
  ConvGeometry g;
  JAXCONV_RETURN_IF_ERROR(
      decode_conv_call(attrs, *dx, w, dy, bias, ConvBias::kBwdData, kTarget, &g));
  JAXCONV_RETURN_IF_ERROR(check_cpu_capability_env(kTarget));
  JAXCONV_RETURN_IF_ERROR(check_conv_algo_env(kTarget));
  JAXCONV_RETURN_IF_ERROR(check_forced_algo(kTarget, g, ConvDirection::kBackwardData,
                                            dy.element_type() == ffi::DataType::F64));
  if (g.N == 0) return ffi::Error::Success();
  ParallelRunner pr(&pool);
  return dispatch_float(dy.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    Conv<T>(g).backward_data(pr, static_cast<const T*>(dy.untyped_data()),
                             static_cast<const T*>(w.untyped_data()), bias_or_null<T>(bias),
                             static_cast<T*>(dx->untyped_data()));
    return ffi::Error::Success();
  });
}

ffi::Error Conv2dBwdFilterImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                               ffi::Result<ffi::AnyBuffer> dw, ffi::Dictionary attrs) {
  constexpr const char* kTarget = targets::kConv2dBwdFilter;
  ConvGeometry g;
  JAXCONV_RETURN_IF_ERROR(decode_conv_call(attrs, x, *dw, dy, kTarget, &g));
  JAXCONV_RETURN_IF_ERROR(check_cpu_capability_env(kTarget));
  JAXCONV_RETURN_IF_ERROR(check_conv_algo_env(kTarget));
  JAXCONV_RETURN_IF_ERROR(check_forced_algo(kTarget, g, ConvDirection::kBackwardFilter,
                                            x.element_type() == ffi::DataType::F64));
  ParallelRunner pr(&pool);
  return dispatch_float(x.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    Conv<T>(g).backward_filter(pr, static_cast<const T*>(x.untyped_data()),
                               static_cast<const T*>(dy.untyped_data()),
                               static_cast<T*>(dw->untyped_data()));
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv2dFwdCpu, Conv2dFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Arg<ffi::AnyBuffer>()  // bias, (O,) or (0,)
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv2dBwdDataCpu, Conv2dBwdDataImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Arg<ffi::AnyBuffer>()  // bias, (C,) or (0,)
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv2dBwdFilterCpu, Conv2dBwdFilterImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Ret<ffi::AnyBuffer>()  // dw
                                  .Attrs());

}  // namespace jaxconv
