// CPU max pooling: forward (values and int32 indices in one pass), the values-only forward
// (y alone, for max_pool2d without a gradient: the same y, no index bytes written) and backward,
// side by side.
//
// Forward, per output (oh, ow) and channel: scan the window's in-bounds taps (window_taps in
// geometry.h; padded cells are never candidates) in row-major order and keep the FIRST maximum.
// A NaN beats every number and the first NaN is kept, so NaN propagates with its index. The index
// is the flat offset h * W + w into the input plane, as in PyTorch. A window with no in-bounds tap
// (possible only with dilation) yields -inf and index -1.
//
// Backward: dx[n, c, idx] += dy[n, c, oh, ow] for every output cell. Each task owns whole
// (n, channel-block) slabs and walks its outputs in a fixed order, so the result is
// deterministic; half types accumulate in float32.
//
// The kernels are max_pool2d_kernels.cc, from the table chosen for this CPU (kernel_table.h).
#include <cstdint>

#include "cpu_common.h"
#include "kernel_table.h"

namespace jaxconv {
namespace {

ffi::Error MaxPool2dFwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                            ffi::Result<ffi::AnyBuffer> idx, ffi::Dictionary attrs) {
  constexpr const char* kTarget = targets::kMaxPool2dFwd;
  PoolGeometry g;
  JAXCONV_RETURN_IF_ERROR(decode_pool_call(attrs, x, *y, *idx, kTarget, &g));
  JAXCONV_RETURN_IF_ERROR(check_cpu_capability_env(kTarget));
  ParallelRunner pr(&pool);
  return dispatch_float(x.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    kernels().pool<T>().forward(pr, g, static_cast<const T*>(x.untyped_data()),
                                static_cast<T*>(y->untyped_data()),
                                static_cast<int32_t*>(idx->untyped_data()));
    return ffi::Error::Success();
  });
}

ffi::Error MaxPool2dFwdValuesImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                                  ffi::Result<ffi::AnyBuffer> y, ffi::Dictionary attrs) {
  constexpr const char* kTarget = targets::kMaxPool2dFwdValues;
  PoolGeometry g;
  JAXCONV_RETURN_IF_ERROR(decode_pool_call(attrs, x, *y, kTarget, &g));
  JAXCONV_RETURN_IF_ERROR(check_cpu_capability_env(kTarget));
  ParallelRunner pr(&pool);
  return dispatch_float(x.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    kernels().pool<T>().forward_values(pr, g, static_cast<const T*>(x.untyped_data()),
                                       static_cast<T*>(y->untyped_data()));
    return ffi::Error::Success();
  });
}

ffi::Error MaxPool2dBwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer idx,
                            ffi::Result<ffi::AnyBuffer> dx, ffi::Dictionary attrs) {
  constexpr const char* kTarget = targets::kMaxPool2dBwd;
  PoolGeometry g;
  JAXCONV_RETURN_IF_ERROR(decode_pool_call(attrs, *dx, dy, idx, kTarget, &g));
  JAXCONV_RETURN_IF_ERROR(check_cpu_capability_env(kTarget));
  ParallelRunner pr(&pool);
  return dispatch_float(dy.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    kernels().pool<T>().backward(pr, g, static_cast<const T*>(dy.untyped_data()),
                                 static_cast<const int32_t*>(idx.untyped_data()),
                                 static_cast<T*>(dx->untyped_data()));
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPool2dFwdCpu, MaxPool2dFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>()  // indices (int32)
                                  .Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPool2dFwdValuesCpu, MaxPool2dFwdValuesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPool2dBwdCpu, MaxPool2dBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // indices (int32)
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Attrs());

}  // namespace jaxconv
