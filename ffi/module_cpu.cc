// nanobind module exposing the CPU FFI handlers: registrations() -> {target name: capsule}.
// jaxconv/_ffi.py registers each capsule with XLA for platform "cpu".
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/conv_algo.h"
#include "cpu/kernel_table.h"
#include "geometry.h"
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

// The algorithm a CPU conv call takes (conv_algo.h), for the benchmark's rows: direction
// "fwd", "bwd_data" or "bwd_filter"; x and w dims logical (N, C, H, W) and (O, C/groups, KH,
// KW); attrs as the FFI attributes (stride_h, stride_w, dilation_h, dilation_w, pad_top,
// pad_bottom, pad_left, pad_right, groups, layout). Reads JAXCONV_CPU_CONV_ALGO like a call.
std::string conv_algorithm(const std::string& direction, bool float64,
                           const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                           const std::vector<int64_t>& attrs, bool bfloat16) {
  using namespace jaxconv;
  if (x.size() != 4 || w.size() != 4 || attrs.size() != 10)
    throw std::invalid_argument("conv_algorithm: x and w need 4 dims, attrs 10 values");
  ConvDirection dir;
  if (direction == "fwd")
    dir = ConvDirection::kForward;
  else if (direction == "bwd_data")
    dir = ConvDirection::kBackwardData;
  else if (direction == "bwd_filter")
    dir = ConvDirection::kBackwardFilter;
  else
    throw std::invalid_argument("conv_algorithm: direction must be fwd, bwd_data or bwd_filter");
  ConvParams p{attrs[0], attrs[1], attrs[2], attrs[3], attrs[4], attrs[5],
               attrs[6], attrs[7], attrs[8], attrs[9], 0};
  ConvGeometry g;
  if (const char* err =
          make_conv_geometry(p, {x[0], x[1], x[2], x[3]}, {w[0], w[1], w[2], w[3]}, &g))
    throw std::invalid_argument(std::string("conv_algorithm: ") + err);
  if (conv_algo() == ConvAlgo::kInvalid)
    throw std::invalid_argument("conv_algorithm: JAXCONV_CPU_CONV_ALGO has an unknown value");
  if (conv_algo() == ConvAlgo::kFft)
    if (const char* why = fft_inapplicable(g, dir, float64))
      throw std::invalid_argument(std::string("conv_algorithm: ") + why);
  return algo_name(choose_conv_algo(g, dir, float64, bfloat16));
}

}  // namespace

NB_MODULE(_jaxconv_cpu, m) {
  m.def("registrations", []() {
    nb::dict d;
    for (const Target& t : kTargets) d[t.name] = handler_capsule(t.handler);
    return d;
  });
  m.def("conv_algorithm", &conv_algorithm, nb::arg("direction"), nb::arg("float64"), nb::arg("x"),
        nb::arg("w"), nb::arg("attrs"), nb::arg("bfloat16") = false);
  // The instruction-set capability whose kernels run (kernel_table.h): "baseline", "avx2",
  // "avx512" or "avx512_bf16". Raises ValueError when JAXCONV_CPU_CAPABILITY is not a
  // capability this CPU has.
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
  // The GEMM each storage type's direct convolutions run on under the active capability:
  // "float32" / "float64" (the packed micro-kernel of gemm.cc; half types widened to float32)
  // or "vdpbf16ps" (gemm_bf16.cc).
  m.def("cpu_gemm_kernels", []() {
    nb::dict d;
    d["float32"] = "float32";
    d["float64"] = "float64";
    d["float16"] = "float32";
    d["bfloat16"] = jaxconv::kernels().gemm_bf16 ? "vdpbf16ps" : "float32";
    return d;
  });
}
