// C entry points for tests/test_cuda_fft.py: the CUDA FFT depthwise convolution
// (ffi/cuda/fft_conv.cuh) and its algorithm choice (fft_conv_choice.h) under the host emulation
// of emulate.h, plus a probe of the emulated __syncthreads_or the kernel relies on.
//
// dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16. Return value: 0 on success, 1 for an
// invalid geometry or argument, 2 for a launch error.
#include "emulate.h"

#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda/fft_conv.cuh"

namespace {

using namespace jaxconv;
using namespace jaxconv::cuda;

template <typename F>
int dispatch(int dtype, F&& fn) {
  switch (dtype) {
    case 0: return fn(float{});
    case 1: return fn(double{});
    case 2: return fn(__half{});
    case 3: return fn(__nv_bfloat16{});
    default: return 1;
  }
}

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

// Block-wide OR probe: thread t passes (t == hot[round]) in each round (hot < 0: nobody) and
// writes what it got back to out[round * threads + t].
void syncthreads_or_kernel(const int* hot, int rounds, int* out) {
  for (int r = 0; r < rounds; ++r)
    out[r * int(kFftThreads) + int(threadIdx.x)] = __syncthreads_or(int(threadIdx.x) == hot[r]);
}

}  // namespace

extern "C" {

// The CUDA choice for direction `which` (0 forward, 1 bwd_data, 2 bwd_filter) under the current
// JAXCONV_CUDA_CONV_ALGO: returns 0 direct, 1 FFT (plan_out = P, Q, TH, TW), 2 an error (its
// message in msg, truncated to msg_len - 1), or -1 for an invalid geometry.
int emu_cuda_conv_choice(int which, int dtype, const int64_t* x_dims, const int64_t* w_dims,
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
  return 1;
}

// The FFT kernels for direction `which` (0 forward: a = x, b = w, out = y; 1 bwd_data: a = dy,
// b = w, out = dx; 2 bwd_filter: a = x, b = dy, out = dw, with a workspace allocated here),
// bias null or per channel. plan: P, Q, TH, TW, or all zero for the plan the
// choice would use (cuda_fft_plan). Returns 3 when the FFT kernel cannot run this call
// (cuda_fft_inapplicable), 1 for a plan that does not fit the kernel.
int emu_fft_conv(int which, int dtype, const int64_t* x_dims, const int64_t* w_dims,
                 const int64_t* attrs, const int64_t* plan, const void* a, const void* b,
                 const void* bias, void* out, unsigned max_blocks) {
  ConvGeometry g;
  if (!geometry(x_dims, w_dims, attrs, &g) || which < 0 || which > 2) return 1;
  if (cuda_fft_inapplicable(g, direction(which), dtype == 1)) return 3;
  FftPlan pl;
  if (plan[0] == 0) {
    double cost;
    pl = cuda_fft_plan(g, direction(which), &cost);
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
  return dispatch(dtype, [&](auto zero) -> int {
    using T = decltype(zero);
    if (g.N == 0) return 0;
    // Filled with NaN: a tap sum read before it is written fails the comparison.
    std::vector<float> workspace(
        size_t(cuda_fft_workspace_bytes(g, direction(which), pl) / sizeof(float)) + 1,
        std::numeric_limits<float>::quiet_NaN());
    const cudaError_t err = fft_depthwise_conv<T>(
        g, which, pl, static_cast<const T*>(a), static_cast<const T*>(b),
        static_cast<const T*>(bias), static_cast<T*>(out), workspace.data(), nullptr);
    return err == cudaSuccess ? 0 : 2;
  });
}

// One block of kFftThreads threads runs `rounds` __syncthreads_or rounds (see the kernel above).
int emu_syncthreads_or(const int* hot, int rounds, int* out) {
  emu::max_blocks = 1;
  return launch(syncthreads_or_kernel, dim3(1), dim3(kFftThreads), nullptr, hot, rounds, out) ==
                 cudaSuccess
             ? 0
             : 2;
}

}  // extern "C"
