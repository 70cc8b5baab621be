// C entry points that run jaxconv's CUDA kernels (ffi/cuda/*_kernels.cuh) under the host
// emulation of emulate.h, for tests/test_cuda_emulation.py and tests/test_cuda_mma.py (loaded
// with ctypes through tests/emulation.py). Each entry point builds the geometry with
// geometry.h exactly as the FFI handlers do, then calls the same host-side planning and
// launch code as ffi/cuda/conv2d.cu and max_pool2d.cu.
//
// Buffer dims are the arrays' own shapes (layout order); dtype codes: 0 float32, 1 float64,
// 2 float16, 3 bfloat16. Return value: 0 on success, 1 for an invalid geometry, 2 for a launch
// error.
#include "emulate.h"

#include <cstring>
#include <vector>

#include "cuda/conv2d_kernels.cuh"
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

// which: 0 forward (a = x, b = w, out = y), 1 bwd_data (a = dy, b = w, out = dx),
// 2 bwd_filter (a = x, b = dy, out = dw). x_dims / w_dims: the shapes of x (dx for bwd_data)
// and w (dw for bwd_filter). attrs: stride_h, stride_w, dilation_h, dilation_w, pad_top,
// pad_bottom, pad_left, pad_right, groups, layout. bias may be null.
// tensor_cores / allow_tf32: the PassOptions of all three directions (the handlers set
// tensor_cores on sm_80+); force_mma_tile (2 or 3, else ignored) runs the direction on that
// tensor-core tile (128 x 128 / 64 x 64) whatever the shape, with the offset width
// mma_index32 picks (int32 for every emulated size); 4 and 5: the same tiles with int64
// offsets.
int emu_conv(int which, int dtype, const int64_t* x_dims, const int64_t* w_dims,
             const int64_t* attrs, const void* a, const void* b, const void* bias, void* out,
             unsigned max_blocks, int tensor_cores, int allow_tf32, int force_mma_tile) {
  ConvParams p{attrs[0], attrs[1], attrs[2], attrs[3], attrs[4],
               attrs[5], attrs[6], attrs[7], attrs[8], attrs[9]};
  ConvGeometry g;
  if (make_conv_geometry(p, activation_dims(p.layout, x_dims), weight_dims(p.layout, w_dims), &g))
    return 1;
  emu::max_blocks = max_blocks;
  return dispatch(dtype, [&](auto zero) -> int {
    using T = decltype(zero);
    using Acc = typename Num<T>::acc;
    const T* ta = static_cast<const T*>(a);
    const T* tb = static_cast<const T*>(b);
    const T* tbias = static_cast<const T*>(bias);
    T* tout = static_cast<T*>(out);
    const PassOptions opts{tensor_cores != 0, allow_tf32 != 0};
    const bool forced = force_mma_tile >= 2 && force_mma_tile <= 5;
    const bool large = force_mma_tile == 2 || force_mma_tile == 4;
    const bool force_int64 = force_mma_tile >= 4;
    if constexpr (sizeof(T) <= 4) {
      // The large tile is chosen only for layers too big to emulate, hence the forcing.
      if (forced && which != 2) {
        if (g.N == 0) return 1;
        const PassParams pp = which == 0 ? forward_pass(g) : bwd_data_pass(g);
        if (pp.M == 0) return 0;
        const bool index32 = !force_int64 && mma_index32(pp);
        return status(
            large ? launch_pass_mma<T, MmaLargeTile>(pp, ta, tb, tbias, tout, index32, nullptr)
                  : launch_pass_mma<T, MmaSmallTile>(pp, ta, tb, tbias, tout, index32, nullptr));
      }
    } else {
      if (forced) return 1;  // float64 has no tensor-core kernel
    }
    if (which == 0)
      return g.N == 0 ? 0 : status(conv2d_forward<T>(g, ta, tb, tbias, tout, nullptr, opts));
    if (which == 1)
      return g.N == 0 ? 0 : status(conv2d_backward_data<T>(g, ta, tb, tbias, tout, nullptr, opts));
    if (g.N == 0) {  // the handler zeroes dw with cudaMemsetAsync
      std::memset(out, 0, size_t(g.O * g.gemm_k()) * sizeof(T));
      return 0;
    }
    const FilterLauncher<T> launcher =
        forced ? FilterLauncher<T>(g, large ? FilterKernel::kMmaLarge : FilterKernel::kMmaSmall,
                                   force_int64)
               : FilterLauncher<T>(g, opts);
    std::vector<Acc> workspace(size_t(launcher.workspace_bytes() / int64_t(sizeof(Acc))));
    return status(
        launcher.run(ta, tb, tout, workspace.empty() ? nullptr : workspace.data(), nullptr));
  });
}

// The bwd_filter plan for a geometry under PassOptions {tensor_cores, allow_tf32}:
// {splits, chunk, tiles, workspace bytes, kernel (FilterKernel: 0 SIMT wide, 1 SIMT small,
// 2 tensor cores 128 x 128, 3 tensor cores 64 x 64)}.
int emu_filter_plan(const int64_t* x_dims, const int64_t* w_dims, const int64_t* attrs, int dtype,
                    int tensor_cores, int allow_tf32, int64_t* plan) {
  ConvParams p{attrs[0], attrs[1], attrs[2], attrs[3], attrs[4],
               attrs[5], attrs[6], attrs[7], attrs[8], attrs[9]};
  ConvGeometry g;
  if (make_conv_geometry(p, activation_dims(p.layout, x_dims), weight_dims(p.layout, w_dims), &g))
    return 1;
  const PassOptions opts{tensor_cores != 0, allow_tf32 != 0};
  return dispatch(dtype, [&](auto zero) -> int {
    FilterLauncher<decltype(zero)> launcher(g, opts);
    plan[0] = launcher.p.splits;
    plan[1] = launcher.p.chunk;
    plan[2] = launcher.p.tiles;
    plan[3] = launcher.workspace_bytes();
    plan[4] = int64_t(launcher.kind);
    return 0;
  });
}

// The pass kernel forward (which = 0) or bwd_data (1) would use: 0 SIMT wide, 1 SIMT tall,
// 2 tensor cores 128 x 128, 3 tensor cores 64 x 64; -1 for an invalid geometry.
int emu_pass_kernel(int which, int dtype, const int64_t* x_dims, const int64_t* w_dims,
                    const int64_t* attrs, int tensor_cores, int allow_tf32) {
  ConvParams p{attrs[0], attrs[1], attrs[2], attrs[3], attrs[4],
               attrs[5], attrs[6], attrs[7], attrs[8], attrs[9]};
  ConvGeometry g;
  if (make_conv_geometry(p, activation_dims(p.layout, x_dims), weight_dims(p.layout, w_dims), &g))
    return -1;
  const PassParams pp = which == 0 ? forward_pass(g) : bwd_data_pass(g);
  const PassOptions opts{tensor_cores != 0, allow_tf32 != 0};
  int kind = -1;
  dispatch(dtype, [&](auto zero) -> int {
    kind = int(choose_pass_kernel<decltype(zero)>(pp, opts));
    return 0;
  });
  return kind;
}

// Whether forward (which = 0) or bwd_data (1) of this geometry on tensor cores runs the
// precomputed-iterator kernel (conv_pass_mma_tap_kernel; mma_pass_tap_applies with 16-byte
// aligned buffers and int32 offsets): 1 yes, 0 no (conv_pass_mma_kernel), -1 invalid.
int emu_mma_pass_tap(int which, int dtype, const int64_t* x_dims, const int64_t* w_dims,
                     const int64_t* attrs) {
  ConvParams p{attrs[0], attrs[1], attrs[2], attrs[3], attrs[4],
               attrs[5], attrs[6], attrs[7], attrs[8], attrs[9]};
  ConvGeometry g;
  if (make_conv_geometry(p, activation_dims(p.layout, x_dims), weight_dims(p.layout, w_dims), &g))
    return -1;
  const PassParams pp = which == 0 ? forward_pass(g) : bwd_data_pass(g);
  return dispatch(dtype, [&](auto zero) -> int {
    using T = decltype(zero);
    if constexpr (sizeof(T) > 4) {
      return 0;
    } else {
      const MmaLoads loads = mma_pass_loads<T>(pp, nullptr, nullptr);  // null: 16-byte aligned
      return int(mma_index32(pp) && mma_pass_tap_applies<T>(pp, loads));
    }
  });
}

// Whether bwd_filter of this geometry on a tensor-core tile runs the precomputed-iterator
// kernel (conv_filter_mma_pos_kernel; mma_filter_pos_applies with 16-byte aligned buffers and
// int32 offsets): 1 yes, 0 no (conv_filter_mma_kernel), -1 invalid.
int emu_mma_filter_pos(int dtype, const int64_t* x_dims, const int64_t* w_dims,
                       const int64_t* attrs) {
  ConvParams p{attrs[0], attrs[1], attrs[2], attrs[3], attrs[4],
               attrs[5], attrs[6], attrs[7], attrs[8], attrs[9]};
  ConvGeometry g;
  if (make_conv_geometry(p, activation_dims(p.layout, x_dims), weight_dims(p.layout, w_dims), &g))
    return -1;
  const FilterParams fp = filter_params(g);
  return dispatch(dtype, [&](auto zero) -> int {
    using T = decltype(zero);
    if constexpr (sizeof(T) > 4) {
      return 0;
    } else {
      const MmaLoads loads = mma_filter_loads<T>(fp, nullptr, nullptr);  // null: aligned
      return int(mma_index32(fp) && mma_filter_pos_applies(fp, loads));
    }
  });
}

// Whether the tensor-core kernel of direction `which` (0 forward, 1 bwd_data, 2 bwd_filter)
// would form int32 offsets (mma_index32): 1 yes, 0 no (int64), -1 for an invalid geometry.
// Needs only the shapes, so sizes past 2^31 elements can be asked about.
int emu_mma_index32(int which, const int64_t* x_dims, const int64_t* w_dims, const int64_t* attrs) {
  ConvParams p{attrs[0], attrs[1], attrs[2], attrs[3], attrs[4],
               attrs[5], attrs[6], attrs[7], attrs[8], attrs[9]};
  ConvGeometry g;
  if (make_conv_geometry(p, activation_dims(p.layout, x_dims), weight_dims(p.layout, w_dims), &g))
    return -1;
  if (which == 2) return int(mma_index32(filter_params(g)));
  return int(mma_index32(which == 0 ? forward_pass(g) : bwd_data_pass(g)));
}

// which: 0 forward (a = x, out0 = y, out1 = int32 indices), 1 backward (a = dy, b = int32
// indices, out0 = dx). x_dims: the shape of x (dx for backward). attrs: kernel_h, kernel_w,
// stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_bottom, pad_left, pad_right,
// ceil_mode, layout.
int emu_pool(int which, int dtype, const int64_t* x_dims, const int64_t* attrs, const void* a,
             const void* b, void* out0, void* out1, unsigned max_blocks) {
  PoolParams p{attrs[0], attrs[1], attrs[2], attrs[3], attrs[4],  attrs[5],
               attrs[6], attrs[7], attrs[8], attrs[9], attrs[10], attrs[11]};
  PoolGeometry g;
  if (make_pool_geometry(p, activation_dims(p.layout, x_dims), &g)) return 1;
  emu::max_blocks = max_blocks;
  return dispatch(dtype, [&](auto zero) -> int {
    using T = decltype(zero);
    if (which == 0)
      return status(max_pool2d_forward<T>(g, static_cast<const T*>(a), static_cast<T*>(out0),
                                          static_cast<int32_t*>(out1), nullptr));
    return status(max_pool2d_backward<T>(g, static_cast<const T*>(a),
                                         static_cast<const int32_t*>(b), static_cast<T*>(out0),
                                         nullptr));
  });
}

// Bank conflict counting (warp.h): emu_bank_counting(enable, plain_layout) resets the counts and
// sets the switches; emu_bank_counts(out) gives ldmatrix instructions, their extra wavefronts,
// warp-wide cp.async stores, their extra wavefronts.
void emu_bank_counting(int enable, int plain_layout) {
  emu::count_banks = enable != 0;
  emu::plain_shared_layout = plain_layout != 0;
  emu::bank_counts.ldmatrix = 0;
  emu::bank_counts.ldmatrix_conflicts = 0;
  emu::bank_counts.stores = 0;
  emu::bank_counts.store_conflicts = 0;
}
void emu_bank_counts(int64_t* out) {
  out[0] = emu::bank_counts.ldmatrix;
  out[1] = emu::bank_counts.ldmatrix_conflicts;
  out[2] = emu::bank_counts.stores;
  out[3] = emu::bank_counts.store_conflicts;
}

}  // extern "C"
