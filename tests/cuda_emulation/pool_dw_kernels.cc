// C entry points for tests/test_cuda_dw_pool.py: the memory-bound CUDA kernels (max pooling,
// depthwise convolution) and their index helpers (fast_divmod.cuh) run under the host emulation
// of emulate.h. Geometry comes from geometry.h exactly as the FFI handlers build it.
//
// dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16. Return value: 0 on success, 1 for an
// invalid geometry or argument, 2 for a launch error.
#include "emulate.h"

#include <cstring>
#include <vector>

#include "cuda/depthwise_kernels.cuh"
#include "cuda/max_pool2d_kernels.cuh"

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

int status(cudaError_t err) { return err == cudaSuccess ? 0 : 2; }

}  // namespace

extern "C" {

// FastDivmod(d) applied to n[0..count): q[i] = n / d, r[i] = n % d.
int emu_fast_divmod(uint32_t d, const uint32_t* n, int64_t count, uint32_t* q, uint32_t* r) {
  if (d == 0 || d >= (uint32_t(1) << 31)) return 1;
  const FastDivmod f(d);
  for (int64_t i = 0; i < count; ++i) f.divmod(n[i], q[i], r[i]);
  return 0;
}

// FastDivmod64(d) applied to n[0..count) (numerators below 2^62).
int emu_fast_divmod64(uint64_t d, const uint64_t* n, int64_t count, uint64_t* q) {
  if (d == 0 || d >= (uint64_t(1) << 31)) return 1;
  const FastDivmod64 f(d);
  for (int64_t i = 0; i < count; ++i) {
    if (n[i] >= (uint64_t(1) << 62)) return 1;
    q[i] = f.div(n[i]);
  }
  return 0;
}

// The index-width helpers against geometry.h's int64 originals: for output/input position i
// of one axis, out = {window_taps_div lo, hi, covering_outputs_div lo, hi} with I = int32_t.
int emu_tap_helpers(int64_t i, int64_t stride, int64_t pad, int64_t dilation, int64_t k, int64_t in,
                    int64_t out_size, int64_t* out) {
  const TapSpan<int32_t> t = window_taps_div<int32_t>(int32_t(i), int32_t(stride), int32_t(pad),
                                                      Divider<int32_t>(dilation), int32_t(dilation),
                                                      int32_t(k), int32_t(in));
  const TapSpan<int32_t> c =
      covering_outputs_div<int32_t>(int32_t(i), Divider<int32_t>(stride), int32_t(stride),
                                    int32_t(pad), int32_t(dilation), int32_t(k), int32_t(out_size));
  out[0] = t.lo;
  out[1] = t.hi;
  out[2] = c.lo;
  out[3] = c.hi;
  return 0;
}

// which: 0 forward (a = x, out0 = y, out1 = int32 indices), 1 backward (a = dy, b = indices,
// out0 = dx), 2 values-only forward (a = x, out0 = y; out1 unused). x_dims: the shape of x (dx for
// backward). attrs: kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w, pad_top,
// pad_bottom, pad_left, pad_right, ceil_mode, layout. index_bits: 0 as the handler picks, 32 or 64
// to force that instantiation (64 is the path of tensors with 2^30 elements or more). The pointers
// may be offset from 16-byte alignment by the caller to reach the element-wise lanes.
int emu_pool_kernel(int which, int dtype, const int64_t* x_dims, const int64_t* attrs,
                    const void* a, const void* b, void* out0, void* out1, int index_bits,
                    unsigned max_blocks) {
  PoolParams p{attrs[0], attrs[1], attrs[2], attrs[3], attrs[4],  attrs[5],
               attrs[6], attrs[7], attrs[8], attrs[9], attrs[10], attrs[11]};
  PoolGeometry g;
  if (make_pool_geometry(p, activation_dims(p.layout, x_dims), &g)) return 1;
  if (index_bits == 32 && !pool_fits_int32(g)) return 1;
  emu::max_blocks = max_blocks;
  return dispatch(dtype, [&](auto zero) -> int {
    using T = decltype(zero);
    const T* in = static_cast<const T*>(a);
    T* out = static_cast<T*>(out0);
    if (index_bits == 0) {
      if (which == 0)
        return status(max_pool2d_forward<T>(g, in, out, static_cast<int32_t*>(out1), nullptr));
      if (which == 2) return status(max_pool2d_forward_values<T>(g, in, out, nullptr));
      return status(max_pool2d_backward<T>(g, in, static_cast<const int32_t*>(b), out, nullptr));
    }
    auto run = [&](auto layout_tag, auto index_tag) {
      constexpr int L = decltype(layout_tag)::value;
      using I = decltype(index_tag);
      if (which == 0)
        return status(launch_pool_fwd<T, L, I>(g, in, out, static_cast<int32_t*>(out1), nullptr));
      if (which == 2) return status(launch_pool_fwd<T, L, I, false>(g, in, out, nullptr, nullptr));
      return status(launch_pool_bwd<T, L, I>(g, in, static_cast<const int32_t*>(b), out, nullptr));
    };
    using NCHW = std::integral_constant<int, kNCHW>;
    using NHWC = std::integral_constant<int, kNHWC>;
    if (g.p.layout == kNHWC)
      return index_bits == 32 ? run(NHWC{}, int32_t{}) : run(NHWC{}, int64_t{});
    return index_bits == 32 ? run(NCHW{}, int32_t{}) : run(NCHW{}, int64_t{});
  });
}

// The direct (depthwise / few-channel) convolution kernels. which: 0 forward (a = x, b = w,
// out = y), 1 bwd_data (a = dy, b = w, out = dx), 2 bwd_filter (a = x, b = dy, out = dw).
// x_dims / w_dims: the shapes of x (dx) and w (dw); attrs: stride_h, stride_w, dilation_h,
// dilation_w, pad_top, pad_bottom, pad_left, pad_right, groups, layout. bias may be null.
// index_bits: 0 as the handler picks, 32 or 64 forced. Returns 3 when conv2d.cu would not
// send this geometry to the direct kernels.
int emu_direct_conv(int which, int dtype, const int64_t* x_dims, const int64_t* w_dims,
                    const int64_t* attrs, const void* a, const void* b, const void* bias, void* out,
                    int index_bits, unsigned max_blocks) {
  ConvParams p{attrs[0], attrs[1], attrs[2], attrs[3], attrs[4],
               attrs[5], attrs[6], attrs[7], attrs[8], attrs[9]};
  ConvGeometry g;
  if (make_conv_geometry(p, activation_dims(p.layout, x_dims), weight_dims(p.layout, w_dims), &g))
    return 1;
  if (!direct_conv_applies(g)) return 3;
  if (index_bits == 32 && !direct_fits_int32(g)) return 1;
  emu::max_blocks = max_blocks;
  return dispatch(dtype, [&](auto zero) -> int {
    using T = decltype(zero);
    if (g.N == 0) {  // the handlers return early (bwd_filter zeroes dw)
      if (which == 2) std::memset(out, 0, size_t(g.O * g.gemm_k()) * sizeof(T));
      return 0;
    }
    if (which == 2) {  // as the handler: the plan's workspace, then the launch
      using Acc = typename Num<T>::acc;
      std::vector<Acc> workspace(size_t(direct_filter_workspace_bytes<T>(g)) / sizeof(Acc));
      return status(direct_conv_bwd_filter<T>(
          g, static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(out),
          workspace.empty() ? nullptr : workspace.data(), nullptr, index_bits));
    }
    return status(direct_conv<T>(g, which, static_cast<const T*>(a), static_cast<const T*>(b),
                                 static_cast<const T*>(bias), static_cast<T*>(out), nullptr,
                                 index_bits));
  });
}

// The direct bwd_filter's plan (plan_direct_filter, as the launch uses it) for dtype:
// out = {channel_lanes, items, splits, chunk, blocks, workspace bytes}. Returns 3 when the
// geometry does not take the direct kernels.
int emu_direct_filter_plan(int dtype, const int64_t* x_dims, const int64_t* w_dims,
                           const int64_t* attrs, int64_t* out) {
  ConvParams p{attrs[0], attrs[1], attrs[2], attrs[3], attrs[4],
               attrs[5], attrs[6], attrs[7], attrs[8], attrs[9]};
  ConvGeometry g;
  if (make_conv_geometry(p, activation_dims(p.layout, x_dims), weight_dims(p.layout, w_dims), &g))
    return 1;
  if (!direct_conv_applies(g)) return 3;
  return dispatch(dtype, [&](auto zero) -> int {
    using T = decltype(zero);
    const DirectFilterPlan f = plan_direct_filter(g, sizeof(typename Num<T>::acc));
    const int64_t v[] = {f.channel_lanes, f.items,  f.splits,
                         f.chunk,         f.blocks, direct_filter_workspace_bytes<T>(g)};
    for (int i = 0; i < 6; ++i) out[i] = v[i];
    return 0;
  });
}

}  // extern "C"
