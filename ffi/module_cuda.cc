// nanobind module exposing the CUDA FFI handlers: registrations() -> {target name: capsule}.
// jaxconv/_ffi.py registers each capsule with XLA for platform "CUDA". Importing this module
// needs no GPU and no driver: the CUDA runtime is linked statically and touches the driver only
// when a handler first runs.
//
// runtime_version() and driver_version() let jaxconv/_cuda_driver.py warn at import when the
// installed driver is too old for the runtime linked here (every call would otherwise fail with
// cudaErrorInsufficientDriver). Both are CUDA's encoding, 1000 * major + 10 * minor.
#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>

#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

namespace jaxconv {
XLA_FFI_DECLARE_HANDLER_SYMBOL(Conv2dFwdCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Conv2dBwdDataCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Conv2dBwdFilterCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(MaxPool2dFwdCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(MaxPool2dFwdValuesCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(MaxPool2dBwdCuda);
}  // namespace jaxconv

namespace {

// The single table from FFI target name to CUDA handler (the same names as module_cpu.cc).
struct Target {
  const char* name;
  XLA_FFI_Handler* handler;
};
const Target kTargets[] = {
    {jaxconv::targets::kConv2dFwd, jaxconv::Conv2dFwdCuda},
    {jaxconv::targets::kConv2dBwdData, jaxconv::Conv2dBwdDataCuda},
    {jaxconv::targets::kConv2dBwdFilter, jaxconv::Conv2dBwdFilterCuda},
    {jaxconv::targets::kMaxPool2dFwd, jaxconv::MaxPool2dFwdCuda},
    {jaxconv::targets::kMaxPool2dFwdValues, jaxconv::MaxPool2dFwdValuesCuda},
    {jaxconv::targets::kMaxPool2dBwd, jaxconv::MaxPool2dBwdCuda},
};

}  // namespace

NB_MODULE(_jaxconv_cuda, m) {
  m.def("registrations", []() {
    nb::dict d;
    for (const Target& t : kTargets) d[t.name] = nb::capsule(reinterpret_cast<void*>(t.handler));
    return d;
  });
  // The CUDA runtime this module was compiled and statically linked with.
  m.def("runtime_version", []() { return int(CUDART_VERSION); });
  // The newest CUDA version the installed driver supports; 0 when no driver is installed.
  // cudaDriverGetVersion only asks libcuda for its version: it creates no context and needs
  // no GPU.
  m.def("driver_version", []() {
    int version = 0;
    if (cudaDriverGetVersion(&version) != cudaSuccess) {
      cudaGetLastError();  // clear it: the handlers' own error checks must not see it
      return 0;
    }
    return version;
  });
}
