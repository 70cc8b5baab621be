// The FFI target names, one constant per target. module_cpu.cc and module_cuda.cc register their
// handlers under these names (registrations() returns {name: capsule}); the handlers put the same
// name at the front of every error message; Python takes the names from registrations(), so a
// name is written exactly once.
#pragma once

namespace jaxconv::targets {

inline constexpr char kConv2dFwd[] = "jaxconv_conv2d_fwd";
inline constexpr char kConv2dBwdData[] = "jaxconv_conv2d_bwd_data";
inline constexpr char kConv2dBwdFilter[] = "jaxconv_conv2d_bwd_filter";
inline constexpr char kMaxPool2dFwd[] = "jaxconv_max_pool2d_fwd";
// The forward without indices (y only): max_pool2d's primal when no gradient is taken.
inline constexpr char kMaxPool2dFwdValues[] = "jaxconv_max_pool2d_fwd_values";
inline constexpr char kMaxPool2dBwd[] = "jaxconv_max_pool2d_bwd";

}  // namespace jaxconv::targets
