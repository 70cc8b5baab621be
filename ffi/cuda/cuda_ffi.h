// What the CUDA handlers share: dtype dispatch to the CUDA storage types, and CUDA errors as
// ffi::Error (never an abort).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "../ffi_common.h"

namespace jaxconv::cuda {

namespace ffi = xla::ffi;

template <typename F>
ffi::Error dispatch_float(ffi::DataType t, F&& fn) {
  return dispatch_float_as<__half, __nv_bfloat16>(t, std::forward<F>(fn));
}

inline ffi::Error cuda_error(const char* target, const char* what, cudaError_t err) {
  return ffi::Error::Internal(std::string(target) + ": " + what + ": " + cudaGetErrorName(err) +
                              " (" + cudaGetErrorString(err) + ")");
}

// `err` is what the launch helper returned (cudaGetLastError right after the launch): a bad
// configuration, no usable device or driver, no kernel image for this GPU, or a sticky error
// of an earlier kernel. Our runtime is linked statically, so XLA's own CUDA calls never show
// up here.
inline ffi::Error check_cuda(const char* target, cudaError_t err) {
  if (err != cudaSuccess) return cuda_error(target, "kernel launch failed", err);
  return ffi::Error::Success();
}

}  // namespace jaxconv::cuda
