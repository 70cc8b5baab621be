// C entry points for tests/test_determinism.py: bwd_filter under the host emulation of
// emulate.h, run the way ffi/cuda/conv2d.cu's handler runs it (plan from the shape, workspace
// from an allocator, launch), to show that its bits do not depend on the GPU and that a failed
// workspace allocation is an error rather than another summation order.
//
// Buffer dims and attrs as in kernels.cc (x NCHW or NHWC, dw OIHW or HWIO; stride_h, stride_w,
// dilation_h, dilation_w, pad_top, pad_bottom, pad_left, pad_right, groups, layout); float32
// only (the rule is dtype-independent; float32 is where summation order shows in the bits, on
// tensor cores as TF32).
#include "emulate.h"

#include <cstdio>
#include <string>
#include <vector>

#include "cuda/conv2d_kernels.cuh"

namespace {

using namespace jaxconv;
using namespace jaxconv::cuda;

bool geometry(const int64_t* x_dims, const int64_t* w_dims, const int64_t* attrs, ConvGeometry* g) {
  ConvParams p{attrs[0], attrs[1], attrs[2], attrs[3], attrs[4],
               attrs[5], attrs[6], attrs[7], attrs[8], attrs[9]};
  return make_conv_geometry(p, activation_dims(p.layout, x_dims), weight_dims(p.layout, w_dims),
                            g) == nullptr;
}

}  // namespace

extern "C" {

// bwd_filter with `resident_blocks` blocks of the grid running (the emulation's stand-in for
// the GPU's size: a GPU with fewer SMs runs the same tiles in more waves, here each block loops
// over more tiles), under the handler's PassOptions {tensor_cores, allow_tf32} (tensor cores:
// the TF32 kernel where the shape qualifies). allocate_ok == 0 makes the workspace allocation
// fail as XLA's allocator would: the handler's message is copied into `message` and 3
// returned. Otherwise 0 on success, 1 for an invalid geometry, 2 for a launch error. plan
// receives {splits, kernel (FilterKernel)}.
int emu_filter_handler(const int64_t* x_dims, const int64_t* w_dims, const int64_t* attrs,
                       const float* x, const float* dy, float* dw, unsigned resident_blocks,
                       int allocate_ok, int tensor_cores, int allow_tf32, int64_t* plan,
                       char* message, size_t message_size) {
  ConvGeometry g;
  if (!geometry(x_dims, w_dims, attrs, &g)) return 1;
  emu::max_blocks = resident_blocks;
  FilterLauncher<float> launcher(g, PassOptions{tensor_cores != 0, allow_tf32 != 0});
  plan[0] = launcher.p.splits;
  plan[1] = int64_t(launcher.kind);
  std::vector<float> workspace;
  if (int64_t bytes = launcher.workspace_bytes()) {
    if (!allocate_ok) {
      const std::string text =
          filter_workspace_error("jaxconv_conv2d_bwd_filter", bytes, launcher.p.splits);
      std::snprintf(message, message_size, "%s", text.c_str());
      return 3;
    }
    workspace.resize(size_t(bytes) / sizeof(float));
  }
  const cudaError_t err =
      launcher.run(x, dy, dw, workspace.empty() ? nullptr : workspace.data(), nullptr);
  return err == cudaSuccess ? 0 : 2;
}

// FilterLauncher::run called without the workspace its plan needs: the cudaError_t it returns
// (it must refuse rather than write through a null pointer or sum another way).
int emu_filter_run_without_workspace(const int64_t* x_dims, const int64_t* w_dims,
                                     const int64_t* attrs, const float* x, const float* dy,
                                     float* dw) {
  ConvGeometry g;
  if (!geometry(x_dims, w_dims, attrs, &g)) return -1;
  emu::max_blocks = 3;
  FilterLauncher<float> launcher(g);
  return int(launcher.run(x, dy, dw, nullptr, nullptr));
}

}  // extern "C"
