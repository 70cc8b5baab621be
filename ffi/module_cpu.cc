// nanobind module exposing the CPU FFI handlers: registrations() -> {target name: capsule}.
// jaxconv/_ffi.py registers each capsule with XLA for platform "cpu".
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "cpu/kernel_table.h"

#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

namespace jaxconv {
XLA_FFI_DECLARE_HANDLER_SYMBOL(Conv2dFwdCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Conv2dBwdDataCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Conv2dBwdFilterCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(MaxPool2dFwdCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(MaxPool2dFwdValuesCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(MaxPool2dBwdCpu);
}  // namespace jaxconv

namespace {

template <typename Fn>
nb::capsule handler_capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

// The single table from FFI target name to CPU handler.
struct Target {
  const char* name;
  XLA_FFI_Handler* handler;
};
const Target kTargets[] = {
    {jaxconv::targets::kConv2dFwd, jaxconv::Conv2dFwdCpu},
    {jaxconv::targets::kConv2dBwdData, jaxconv::Conv2dBwdDataCpu},
    {jaxconv::targets::kConv2dBwdFilter, jaxconv::Conv2dBwdFilterCpu},
    {jaxconv::targets::kMaxPool2dFwd, jaxconv::MaxPool2dFwdCpu},
    {jaxconv::targets::kMaxPool2dFwdValues, jaxconv::MaxPool2dFwdValuesCpu},
    {jaxconv::targets::kMaxPool2dBwd, jaxconv::MaxPool2dBwdCpu},
};

}  // namespace

NB_MODULE(_jaxconv_cpu, m) {
  m.def("registrations", []() {
    nb::dict d;
    for (const Target& t : kTargets) d[t.name] = handler_capsule(t.handler);
    return d;
  });
  // The instruction-set capability whose kernels run (kernel_table.h): "baseline", "avx2" or
  // "avx512". Raises ValueError when JAXCONV_CPU_CAPABILITY is not a capability this CPU has.
  m.def("cpu_capability", []() -> std::string {
    const std::string& err = jaxconv::cpu_capability_error();
    if (!err.empty()) throw nb::value_error(err.c_str());
    return jaxconv::kernels().capability;
  });
  // Every capability this CPU and build can run, lowest first.
  m.def("cpu_capabilities", []() {
    std::vector<std::string> names;
    for (const char* n : jaxconv::cpu_capabilities()) names.emplace_back(n);
    return names;
  });
}
