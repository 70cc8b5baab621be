// nanobind module exposing the CPU FFI handlers: registrations() -> {target name: capsule}.
// jaxconv/_ffi.py registers each capsule with XLA for platform "cpu".
#include <nanobind/nanobind.h>

#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

namespace jaxconv {
XLA_FFI_DECLARE_HANDLER_SYMBOL(Conv2dFwdCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Conv2dBwdDataCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Conv2dBwdFilterCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(MaxPool2dFwdCpu);
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
    {"jaxconv_conv2d_fwd", jaxconv::Conv2dFwdCpu},
    {"jaxconv_conv2d_bwd_data", jaxconv::Conv2dBwdDataCpu},
    {"jaxconv_conv2d_bwd_filter", jaxconv::Conv2dBwdFilterCpu},
    {"jaxconv_max_pool2d_fwd", jaxconv::MaxPool2dFwdCpu},
    {"jaxconv_max_pool2d_bwd", jaxconv::MaxPool2dBwdCpu},
};

}  // namespace

NB_MODULE(_jaxconv_cpu, m) {
  m.def("registrations", []() {
    nb::dict d;
    for (const Target& t : kTargets) d[t.name] = handler_capsule(t.handler);
    return d;
  });
}
