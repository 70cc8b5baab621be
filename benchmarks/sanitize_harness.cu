// The sanitizer harness of benchmarks/gpu_check.sh: calls every kernel family's launcher
// (ffi/cuda/launchers.h, the module's own kernel objects) on small shapes, each tensor in its
// own cudaMalloc buffer of exactly its size, so that compute-sanitizer sees every access
// against the tensor's true bounds. Under XLA the buffers are sub-allocated from one pool and
// an overrun into a neighbouring buffer goes unseen; here it is an error. No JAX, no Python:
// compute-sanitizer instruments only these launches, in seconds.
//
// Families reached (the kernel choice is the launchers' own, by shape, as in the handlers):
//   direct (C <= 4, depthwise), SIMT pass (wide and tall tiles), tensor-core pass (64 x 64 and,
//   with 256 output tiles, 128 x 128), bwd_data phases (stride 2, 3), SIMT and tensor-core
//   bwd_filter (both tiles, 16 x 16 SIMT, split reductions with a workspace), max pooling
//   forward (indexed, values-only) and backward, both layouts; float32 with and without TF32,
//   float64, float16, bfloat16. Tensor-core kernels run where the device has them (sm_80+).
//   Not reached: the int64-offset instantiations (they need a tensor of 2^31 elements).
//
// Usage: jaxconv_sanitize_harness [--dtypes f32,tf32,f64,f16,bf16] [--cases a,b] [--skip-large]
//                                 [--list]
//   --list prints each case's buffers and their element counts without running anything
//   (tests/test_sanitize_harness.py compares them with the ops' shapes from JAX).
// Exit status: 0 all launches and synchronizations succeeded, 1 a CUDA error (printed), 2 usage.
//
// Built by CMake (target jaxconv_sanitize_harness, EXCLUDE_FROM_ALL) with the same kernel
// objects as the module; under JAXCONV_CUDA_EMULATION (tests/cuda_emulation/emulate.h included
// first) the same source runs on the host emulation, with malloc for cudaMalloc, so that
// AddressSanitizer checks the same exact-size buffers without a GPU.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/fft_conv_choice.h"
#include "cuda/launchers.h"

using namespace jaxconv;
using namespace jaxconv::cuda;

namespace {

// ---- Device memory: CUDA, or plain host memory under the emulation ------------------------------
#if defined(JAXCONV_CUDA_EMULATION)
void* device_alloc(size_t bytes) { return std::malloc(bytes == 0 ? 1 : bytes); }
void device_free(void* p) { std::free(p); }
void to_device(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
cudaError_t device_sync() { return cudaSuccess; }
const char* error_name(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "error"; }
bool device_has_tensor_cores() { return true; }  // the emulation runs the mma kernels too
#else
void* device_alloc(size_t bytes) {
  void* p = nullptr;
  if (cudaMalloc(&p, bytes == 0 ? 1 : bytes) != cudaSuccess) {
    std::fprintf(stderr, "cudaMalloc(%zu) failed\n", bytes);
    std::exit(1);
  }
  return p;
}
void device_free(void* p) { cudaFree(p); }
void to_device(void* dst, const void* src, size_t bytes) {
  cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
}
cudaError_t device_sync() { return cudaDeviceSynchronize(); }
const char* error_name(cudaError_t e) { return cudaGetErrorName(e); }
bool device_has_tensor_cores() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return false;
  return major >= 8;
}
#endif

// One tensor in its own exact-size allocation. Inputs (seed > 0) hold deterministic values in
// (-1, 1); outputs (seed 0) are left unwritten, so that initcheck reports any read of an
// element before a kernel wrote it.
template <typename T>
struct Buffer {
  T* ptr = nullptr;
  int64_t elems = 0;
  explicit Buffer(int64_t n, uint32_t seed = 0) : elems(n) {
    ptr = static_cast<T*>(device_alloc(size_t(n) * sizeof(T)));
    if (seed == 0) return;
    std::vector<T> host(static_cast<size_t>(n));
    uint32_t s = seed * 2654435761u + 1u;
    for (auto& v : host) {
      s = s * 1664525u + 1013904223u;
      v = T(float(int32_t(s >> 8) % 4096) / 4096.0f);
    }
    to_device(ptr, host.data(), size_t(n) * sizeof(T));
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { device_free(ptr); }
};

struct ConvCase {
  const char* name;
  int64_t n, c, h, w, o, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
  bool large;  // slow under the emulation (--skip-large)
};

// Each case names the family it is there for (with tensor cores; float64 and float32 without
// TF32 take the SIMT kernels on the same shapes).
const ConvCase kConvCases[] = {
    // C = 3 <= 4: the direct kernels, all three directions.
    {"stem_c3", 2, 3, 9, 9, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1, false},
    // depthwise with channel multiplier 2: direct kernels.
    {"depthwise_m2", 2, 16, 10, 10, 32, 3, 3, 2, 2, 1, 1, 1, 1, 16, false},
    // 70 outputs: pass 64 x 64 (mma) / SIMT wide; bwd_data stride-2 phases with 8 channels
    // (SIMT tall); bwd_filter Og = 70, Kg = 72: the 128 x 128 tensor-core filter tile.
    {"wide_strided", 1, 8, 11, 10, 70, 3, 3, 2, 2, 1, 1, 1, 1, 1, false},
    // groups, dilation, asymmetric kernel, stride 3 phases: 64 x 64 tiles everywhere.
    {"grouped_dilated", 2, 32, 13, 11, 48, 3, 2, 3, 1, 2, 1, 1, 2, 2, false},
    // a reduction long enough for bwd_filter to split into partial sums (workspace).
    {"split_filter", 4, 8, 32, 32, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1, false},
    // 1x1, 16 x 16 per group: SIMT 16 x 16 filter tile (float64), mma elsewhere.
    {"pointwise_16", 2, 16, 8, 8, 16, 1, 1, 1, 1, 0, 0, 1, 1, 1, false},
    // 256 output tiles of 128 x 128 with 96 > 64 channels: the 128 x 128 tensor-core pass.
    {"large_pass", 2, 16, 128, 128, 96, 1, 1, 1, 1, 0, 0, 1, 1, 1, true},
};

struct PoolCase {
  const char* name;
  int64_t n, c, h, w, kh, kw, stride, pad, dil, ceil_mode;
};
const PoolCase kPoolCases[] = {
    {"pool_c8", 2, 8, 9, 11, 3, 3, 2, 1, 1, 1},  // 16-byte NHWC lanes
    {"pool_c5", 2, 5, 9, 11, 3, 3, 2, 1, 1, 1},  // element lanes
    {"pool_dilated", 1, 3, 10, 9, 2, 3, 1, 0, 2, 0},
};

struct Options {
  std::vector<std::string> dtypes{"f32", "tf32", "f64", "f16", "bf16"};
  std::vector<std::string> cases;  // empty: all
  bool skip_large = false, list = false;
};

bool wanted(const std::vector<std::string>& list, const char* name) {
  if (list.empty()) return true;
  for (const auto& s : list)
    if (s == name) return true;
  return false;
}

std::vector<std::string> split_commas(const char* s) {
  std::vector<std::string> out;
  std::string cur;
  for (const char* p = s;; ++p) {
    if (*p == ',' || *p == '\0') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
      if (*p == '\0') break;
    } else {
      cur += *p;
    }
  }
  return out;
}

int failures = 0;

void report(const char* what, const char* name, const char* dtype, const char* layout,
            cudaError_t launch_err) {
  cudaError_t err = launch_err != cudaSuccess ? launch_err : device_sync();
  if (err != cudaSuccess) {
    ++failures;
    std::printf("FAILED %s %s %s %s: %s\n", name, dtype, layout, what, error_name(err));
  }
}

template <typename T>
void run_conv(const ConvCase& k, int64_t layout, bool tf32, const char* dtype, bool mma,
              bool list) {
  const char* lname = layout == kNHWC ? "NHWC" : "NCHW";
  ConvParams p{k.stride_h, k.stride_w, k.dil_h,  k.dil_w, k.pad_h,     k.pad_h,
               k.pad_w,    k.pad_w,    k.groups, layout,  tf32 ? 1 : 0};
  ConvGeometry g;
  if (const char* e = make_conv_geometry(p, Dims4{k.n, k.c, k.h, k.w},
                                         Dims4{k.o, k.c / k.groups, k.kh, k.kw}, &g)) {
    std::printf("FAILED %s: bad geometry: %s\n", k.name, e);
    ++failures;
    return;
  }
  const int64_t x_elems = g.N * g.C * g.H * g.W, w_elems = g.O * (g.C / k.groups) * g.KH * g.KW;
  const int64_t y_elems = g.N * g.O * g.OH * g.OW;
  if (list) {
    std::printf("conv %s %s x=%lld w=%lld y=%lld bias_y=%lld bias_x=%lld\n", k.name, lname,
                (long long)x_elems, (long long)w_elems, (long long)y_elems, (long long)g.O,
                (long long)g.C);
    return;
  }
  Buffer<T> x(x_elems, 1), w(w_elems, 2), dy(y_elems, 3), bias_y(g.O, 4), bias_x(g.C, 5);
  Buffer<T> y(y_elems), dx(x_elems), dw(w_elems);
  const bool direct = conv_takes_direct_kernels(g);
  if (direct) {
    report("direct forward", k.name, dtype, lname,
           launch_conv_direct<T>(g, 0, x.ptr, w.ptr, bias_y.ptr, y.ptr, nullptr));
    report("direct bwd_data", k.name, dtype, lname,
           launch_conv_direct<T>(g, 1, dy.ptr, w.ptr, bias_x.ptr, dx.ptr, nullptr));
  } else {
    report("forward", k.name, dtype, lname,
           launch_conv_forward<T>(g, x.ptr, w.ptr, bias_y.ptr, y.ptr, mma, nullptr));
    report("forward (no bias)", k.name, dtype, lname,
           launch_conv_forward<T>(g, x.ptr, w.ptr, nullptr, y.ptr, mma, nullptr));
    report("bwd_data", k.name, dtype, lname,
           launch_conv_bwd_data<T>(g, dy.ptr, w.ptr, bias_x.ptr, dx.ptr, mma, nullptr));
  }
  // The dense FFT (fft_conv_dense.cuh) on the stride-1 dense / grouped cases, all three
  // directions, with the plan the choice would use and its workspace exactly as the handler asks
  // XLA for it (float64 never runs it; the large case is left out, slow under the emulation).
  if constexpr (!std::is_same_v<T, double>) {
    for (int which = 0; which < 3 && !k.large && k.groups != k.c; ++which) {
      const ConvDirection dir = which == 2   ? ConvDirection::kBackwardFilter
                                : which == 1 ? ConvDirection::kBackwardData
                                             : ConvDirection::kForward;
      if (cuda_fft_dense_inapplicable(g, dir, false)) break;
      double cost;
      bool fits;
      const FftPlan pl = cuda_fft_dense_plan(g, dir, &cost, &fits);
      void* fws = device_alloc(size_t(cuda_dense_workspace(g, dir, pl).bytes));
      cudaError_t err;
      if (which == 0)
        err = launch_conv_fft_dense<T>(g, 0, pl, x.ptr, w.ptr, bias_y.ptr, y.ptr, fws, nullptr);
      else if (which == 1)
        err = launch_conv_fft_dense<T>(g, 1, pl, dy.ptr, w.ptr, bias_x.ptr, dx.ptr, fws, nullptr);
      else
        err = launch_conv_fft_dense<T>(g, 2, pl, x.ptr, dy.ptr, nullptr, dw.ptr, fws, nullptr);
      const char* names[] = {"fft dense forward", "fft dense bwd_data", "fft dense bwd_filter"};
      report(names[which], k.name, dtype, lname, err);
      device_free(fws);
    }
  }
  // bwd_filter of both kinds goes through the plan (direct shapes: the direct kernel, split).
  const FilterPlanSize plan = conv_bwd_filter_plan<T>(g, mma);
  // The workspace exactly as the handler asks XLA for it.
  void* ws = plan.workspace_bytes > 0 ? device_alloc(size_t(plan.workspace_bytes)) : nullptr;
  const char* what = direct ? (plan.splits > 1 ? "direct bwd_filter (split)" : "direct bwd_filter")
                            : (plan.splits > 1 ? "bwd_filter (split)" : "bwd_filter");
  report(what, k.name, dtype, lname,
         launch_conv_bwd_filter<T>(g, x.ptr, dy.ptr, dw.ptr, ws, mma, nullptr));
  if (ws) device_free(ws);
}

template <typename T>
void run_pool(const PoolCase& k, int64_t layout, const char* dtype, bool list) {
  const char* lname = layout == kNHWC ? "NHWC" : "NCHW";
  PoolParams p{k.kh,  k.kw,  k.stride, k.stride, k.dil,       k.dil,
               k.pad, k.pad, k.pad,    k.pad,    k.ceil_mode, layout};
  PoolGeometry g;
  if (const char* e = make_pool_geometry(p, Dims4{k.n, k.c, k.h, k.w}, &g)) {
    std::printf("FAILED %s: bad geometry: %s\n", k.name, e);
    ++failures;
    return;
  }
  const int64_t x_elems = g.N * g.C * g.H * g.W, y_elems = g.N * g.C * g.OH * g.OW;
  if (list) {
    std::printf("pool %s %s x=%lld y=%lld\n", k.name, lname, (long long)x_elems,
                (long long)y_elems);
    return;
  }
  Buffer<T> x(x_elems, 11), dy(y_elems, 12);
  Buffer<T> y(y_elems), dx(x_elems);
  Buffer<int32_t> idx(y_elems);
  report("pool forward", k.name, dtype, lname,
         launch_max_pool_forward<T>(g, x.ptr, y.ptr, idx.ptr, nullptr));
  report("pool forward values", k.name, dtype, lname,
         launch_max_pool_forward_values<T>(g, x.ptr, y.ptr, nullptr));
  // Indices from the forward just run: every one inside its plane (or -1).
  report("pool backward", k.name, dtype, lname,
         launch_max_pool_backward<T>(g, dy.ptr, idx.ptr, dx.ptr, nullptr));
}

template <typename T>
void run_dtype(const Options& o, const char* dtype, bool tf32, bool mma) {
  for (int64_t layout : {int64_t(kNCHW), int64_t(kNHWC)}) {
    for (const ConvCase& k : kConvCases)
      if (wanted(o.cases, k.name) && !(o.skip_large && k.large))
        run_conv<T>(k, layout, tf32, dtype, mma, o.list);
    if (!tf32)
      for (const PoolCase& k : kPoolCases)
        if (wanted(o.cases, k.name)) run_pool<T>(k, layout, dtype, o.list);
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--dtypes" && i + 1 < argc) {
      o.dtypes = split_commas(argv[++i]);
    } else if (a == "--cases" && i + 1 < argc) {
      o.cases = split_commas(argv[++i]);
    } else if (a == "--skip-large") {
      o.skip_large = true;
    } else if (a == "--list") {
      o.list = true;
      o.dtypes = {"f32"};
    } else {
      std::fprintf(stderr,
                   "usage: %s [--dtypes f32,tf32,f64,f16,bf16] [--cases a,b] [--skip-large] "
                   "[--list]\n",
                   argv[0]);
      return 2;
    }
  }
  const bool mma = device_has_tensor_cores();
  for (const std::string& d : o.dtypes) {
    if (d == "f32")
      run_dtype<float>(o, "f32", false, mma);
    else if (d == "tf32")
      run_dtype<float>(o, "tf32", true, mma);
    else if (d == "f64")
      run_dtype<double>(o, "f64", false, mma);
    else if (d == "f16")
      run_dtype<__half>(o, "f16", false, mma);
    else if (d == "bf16")
      run_dtype<__nv_bfloat16>(o, "bf16", false, mma);
    else {
      std::fprintf(stderr, "unknown dtype %s\n", d.c_str());
      return 2;
    }
    if (!o.list)
      std::printf("sanitize_harness: %s done (%d failures so far)\n", d.c_str(), failures);
  }
  if (!o.list)
    std::printf("sanitize_harness: %s, tensor cores %s\n", failures ? "FAILED" : "all launches ok",
                mma ? "on" : "off");
  return failures ? 1 : 0;
}
