// nanobind module exposing the CUDA FFI handlers: registrations() -> {target name: capsule}.
// jaxconv/_ffi.py registers each capsule with XLA for platform "CUDA". Importing this module
// needs no GPU and no driver: the CUDA runtime is linked statically and touches the driver only
// when a handler first runs.
//
// runtime_version() and driver_version() let jaxconv/_cuda_driver.py warn at import when the
// installed driver is too old for the runtime linked here (every call would otherwise fail with
// cudaErrorInsufficientDriver). Both are CUDA's encoding, 1000 * major + 10 * minor.
//
// cuda_architectures() and device_capabilities() let it warn when a visible GPU can run none of
// the module's code (every call would fail with cudaErrorNoKernelImageForDevice): the first is
// what ffi/CMakeLists.txt compiled (JAXCONV_CUDA_ARCHITECTURES), the second asks the driver.
#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>

#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <utility>
#include <vector>

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

// The architectures of ffi/CMakeLists.txt as "80,90": SASS (machine code) and PTX entries.
#if !defined(JAXCONV_CUDA_SASS) || !defined(JAXCONV_CUDA_PTX)
#error "ffi/CMakeLists.txt defines JAXCONV_CUDA_SASS and JAXCONV_CUDA_PTX for this file"
#endif
std::vector<std::string> split_csv(const std::string& csv) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start < csv.size()) {
    size_t end = csv.find(',', start);
    if (end == std::string::npos) end = csv.size();
    if (end > start) out.push_back(csv.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

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
  // {"sass": ["80", "90"], "ptx": ["80"]}: what this module holds code for.
  m.def("cuda_architectures", []() {
    nb::dict d;
    d["sass"] = split_csv(JAXCONV_CUDA_SASS);
    d["ptx"] = split_csv(JAXCONV_CUDA_PTX);
    return d;
  });
  // (major, minor) of each GPU the CUDA runtime sees (CUDA_VISIBLE_DEVICES applies); empty
  // without a driver or a GPU. Initializes the driver (cuInit) but creates no context.
  m.def("device_capabilities", []() {
    std::vector<std::pair<int, int>> caps;
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
      cudaGetLastError();
      return caps;
    }
    for (int d = 0; d < count; ++d) {
      int major = 0, minor = 0;
      if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d) != cudaSuccess ||
          cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d) != cudaSuccess) {
        cudaGetLastError();
        continue;
      }
      caps.emplace_back(major, minor);
    }
    return caps;
  });
}
