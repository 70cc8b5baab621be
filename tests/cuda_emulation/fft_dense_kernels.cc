// C entry points for tests/test_cuda_fft_dense.py: the CUDA dense / grouped FFT convolution
// (ffi/cuda/fft_conv_dense.cuh) and its choice (fft_conv_choice.h) under the host emulation of
// emulate.h.
//
// dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16. Return value: 0 on success, 1 for an
// invalid geometry or argument, 2 for a launch error, 3 where the dense FFT cannot run.
#include "emulate.h"

#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda/fft_conv_dense.cuh"

namespace {

using namespace jaxconv;
using namespace jaxconv::cuda;

bool geometry(const int64_t* x_dims, const int64_t* w_dims, const int64_t* attrs, ConvGeometry* g) {
  ConvParams p{attrs[0], attrs[1], attrs[2], attrs[3], attrs[4],
               attrs[5], attrs[6], attrs[7], attrs[8], attrs[9]};
  return make_conv_geometry(p, activation_dims(p.layout, x_dims), weight_dims(p.layout, w_dims),
                            g) == nullptr;
}

ConvDirection direction(int which) {
  return which == 0   ? ConvDirection::kForward
         : which == 1 ? ConvDirection::kBackwardData
                      : ConvDirection::kBackwardFilter;
}

}  // namespace

extern "C" {

// The CUDA choice under the current JAXCONV_CUDA_CONV_ALGO: 0 direct, 1 depthwise FFT, 4 dense
// FFT (plan_out = P, Q, TH, TW, workspace bytes), 2 an error (msg), -1 an invalid geometry.
int emu_dense_choice(int which, int dtype, const int64_t* x_dims, const int64_t* w_dims,
                     const int64_t* attrs, int64_t* plan_out, char* msg, int64_t msg_len) {
  ConvGeometry g;
  if (!geometry(x_dims, w_dims, attrs, &g)) return -1;
  const CudaAlgoChoice c = choose_cuda_conv_algo(g, direction(which), dtype == 1);
  if (!c.error.empty()) {
    std::strncpy(msg, c.error.c_str(), size_t(msg_len - 1));
    msg[msg_len - 1] = '\0';
    return 2;
  }
  if (!c.fft.valid()) return 0;
  plan_out[0] = c.fft.P;
  plan_out[1] = c.fft.Q;
  plan_out[2] = c.fft.TH;
  plan_out[3] = c.fft.TW;
  plan_out[4] = c.workspace_bytes;
  return c.dense ? 4 : 1;
}

// The dense FFT for direction `which` (0 forward: a = x, b = w, out = y; 1 bwd_data: a = dy,
// b = w, out = dx; 2 bwd_filter: a = x, b = dy, out = dw), bias null or per result channel. plan:
// P, Q, TH, TW, or all zero for the plan the choice would use (cuda_fft_dense_plan). The workspace
// is allocated here and filled with NaN, so that a spectrum read before it is written fails the
// comparison.
int emu_fft_dense_conv(int which, int dtype, const int64_t* x_dims, const int64_t* w_dims,
                       const int64_t* attrs, const int64_t* plan, const void* a, const void* b,
                       const void* bias, void* out, unsigned max_blocks) {
  ConvGeometry g;
  if (!geometry(x_dims, w_dims, attrs, &g) || which < 0 || which > 2) return 1;
  if (cuda_fft_dense_inapplicable(g, direction(which), dtype == 1)) return 3;
  FftPlan pl;
  if (plan[0] == 0) {
    double cost;
    bool fits;
    pl = cuda_fft_dense_plan(g, direction(which), &cost, &fits);
  } else {
    pl = {plan[0], plan[1], plan[2], plan[3]};
    const auto pow2 = [](int64_t n) {
      return n >= 2 && n <= kCudaFftMaxSide && (n & (n - 1)) == 0;
    };
    if (!pow2(pl.P) || !pow2(pl.Q) || pl.TH < 1 || pl.TW < 1 ||
        pl.TH > pl.P - effective_kernel(g.KH, g.p.dilation_h) + 1 ||
        pl.TW > pl.Q - effective_kernel(g.KW, g.p.dilation_w) + 1)
      return 1;
  }
  emu::max_blocks = max_blocks;
  const int64_t bytes = cuda_dense_workspace(g, direction(which), pl).bytes;
  std::vector<float> workspace(size_t(bytes / 4) + 64, std::numeric_limits<float>::quiet_NaN());
  // 256-byte aligned, as XLA's allocation is asked to be.
  auto addr = reinterpret_cast<uintptr_t>(workspace.data());
  void* ws = reinterpret_cast<void*>((addr + 255) / 256 * 256);
  const auto run = [&](auto zero) -> int {
    using T = decltype(zero);
    const cudaError_t err =
        fft_dense_conv<T>(g, which, pl, static_cast<const T*>(a), static_cast<const T*>(b),
                          static_cast<const T*>(bias), static_cast<T*>(out), ws, nullptr);
    return err == cudaSuccess ? 0 : 2;
  };
  if (g.N == 0) return 0;
  switch (dtype) {
    case 0: return run(float{});
    case 2: return run(__half{});
    case 3: return run(__nv_bfloat16{});
    default: return 1;
  }
}

}  // extern "C"
