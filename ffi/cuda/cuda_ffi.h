// What the CUDA handlers share: dtype dispatch to the CUDA storage types, and CUDA errors as
// ffi::Error (never an abort).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "../ffi_common.h"

namespace jaxconv::cuda {

namespace ffi = xla::ffi;

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) for the storage type of a float dtype (checked by the caller).
template <typename F>
ffi::Error dispatch_float(ffi::DataType t, F&& fn) {
  switch (t) {
    case ffi::DataType::F32: return fn(TypeTag<float>{});
    case ffi::DataType::F64: return fn(TypeTag<double>{});
    case ffi::DataType::F16: return fn(TypeTag<__half>{});
    case ffi::DataType::BF16: return fn(TypeTag<__nv_bfloat16>{});
    default: return ffi::Error::InvalidArgument("unsupported dtype");
  }
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

template <typename T>
const T* bias_or_null(const ffi::AnyBuffer& bias) {
  return bias.element_count() ? static_cast<const T*>(bias.untyped_data()) : nullptr;
}

}  // namespace jaxconv::cuda
