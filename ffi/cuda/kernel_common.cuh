// Building blocks of the CUDA kernels: storage/accumulation types, the launch helper, the grid
// size rule.
//
// The kernel headers (this one, conv2d_*.cuh, depthwise_kernels.cuh, max_pool2d_kernels.cuh)
// contain no XLA code, so they compile in two ways:
//   - with nvcc, for the real module (conv2d.cu, max_pool2d.cu include them);
//   - with a host C++ compiler under JAXCONV_CUDA_EMULATION, where tests/cuda_emulation/emulate.h
//     has already defined dim3, threadIdx/blockIdx, __syncthreads and `launch` (blocks run one
//     after another, the threads of a block as real threads). tests/emulation.py builds them
//     so, and the test files run the kernels against the oracles on machines without a GPU.
// Kernels therefore use only: __global__/__device__/__forceinline__, __shared__ arrays of fixed
// size, dynamic shared memory through JAXCONV_DYNAMIC_SHARED, __syncthreads,
// threadIdx.x/blockIdx.x/gridDim.x, and the warp-level operations defined at the end of this file
// (mma.sync, ldmatrix, cp.async, shuffles): inline PTX on the device, tests/cuda_emulation/warp.h
// on the host. No atomics.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../geometry.h"

// Unroll a loop with a compile-time trip count (nvcc); nothing on the host emulation.
#if !defined(JAXCONV_UNROLL)
#if defined(__CUDACC__)
#define JAXCONV_UNROLL _Pragma("unroll")
#else
#define JAXCONV_UNROLL
#endif
#endif

#if !defined(JAXCONV_CUDA_EMULATION)
#include <cuda_runtime.h>

namespace jaxconv::cuda {
// Launches kernel<<<grid, block, smem_bytes, stream>>>(args...) (smem_bytes: dynamic shared
// memory per block) and returns the launch error (bad configuration, no device, no kernel image
// for this GPU, more shared memory than the kernel may have, ...). Errors of the kernel itself
// surface at the next synchronization, which XLA performs.
template <typename... Params, typename... Args>
cudaError_t launch_with_shared(void (*kernel)(Params...), dim3 grid, dim3 block, int smem_bytes,
                               cudaStream_t stream, Args... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(args...);
  return cudaGetLastError();
}
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                   Args... args) {
  return launch_with_shared(kernel, grid, block, 0, stream, args...);
}
}  // namespace jaxconv::cuda

// The block's dynamic shared memory as `unsigned char name[]`, 16-byte aligned, of the size the
// launch gives (launch_dynamic_shared). The emulation's version is a pointer to the running
// block's buffer (emulate.h), whose size it checks.
#define JAXCONV_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#else
#define JAXCONV_DYNAMIC_SHARED(name) unsigned char* const name = ::emu::dynamic_shared()
#endif

namespace jaxconv::cuda {

// Launches with smem_bytes of dynamic shared memory, after opting the kernel in to that size
// (cudaFuncAttributeMaxDynamicSharedMemorySize; sm_80 allows up to 163 KB, sm_90 227 KB, per
// block). Without the opt-in a kernel gets 48 KB less its static shared memory.
template <typename... Params, typename... Args>
cudaError_t launch_dynamic_shared(void (*kernel)(Params...), dim3 grid, dim3 block, int smem_bytes,
                                  cudaStream_t stream, Args... args) {
  if (smem_bytes > 0) {
    const cudaError_t err =
        cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                             cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
  }
  return launch_with_shared(kernel, grid, block, smem_bytes, stream, args...);
}
}  // namespace jaxconv::cuda

namespace jaxconv::cuda {

// Host side: whether a buffer may be read and written with 16-byte (128-bit) vector accesses.
inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// Num<T>: the accumulation type of storage type T and conversions in and out of it. Half types
// accumulate in float32 and round once, to nearest even, when stored.
template <typename T>
struct Num;
template <>
struct Num<float> {
  using acc = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Num<double> {
  using acc = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};
template <>
struct Num<__half> {
  using acc = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// Every kernel walks its work items (tiles or elements) with a grid-stride loop, so any problem
// size runs with a bounded grid; this caps the grid well inside CUDA's 2^31 - 1 limit on x.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

inline unsigned grid_blocks(int64_t items) {
  if (items < 1) return 1;
  return unsigned(items < kMaxBlocks ? items : kMaxBlocks);
}

inline int64_t ceil_div_pos(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Warp-level operations (sm_80+). Each is one PTX instruction on the device and a call into the
// warp emulation (tests/cuda_emulation/warp.h) on the host, which implements the same operand
// and fragment layouts from the PTX ISA with 32 real threads per warp. Every lane of the warp
// must execute them together (the .sync.aligned forms); the kernels call them only from
// warp-uniform control flow.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16 / mma.m16n8k8"); lane = 4*g + t
// (g = groupID = lane / 4, t = lane % 4):
//   m16n8k16 (bf16/f16): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
//                        a[3] = A[g+8][2t+8..]; b[0] = B[2t..2t+1][g], b[1] = B[2t+8..][g]
//                        (two 16-bit values per register, the lower k in the low half).
//   m16n8k8 (tf32):      a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4];
//                        b[0] = B[t][g], b[1] = B[t+4][g].
//   accumulators:        d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1].
// ldmatrix .x1/.x2/.x4 loads 1/2/4 8x8 matrices of 16-bit values: lanes 8j..8j+7 give the
// addresses of the 8 rows (16 bytes each) of matrix j, and register j of lane l receives row
// l/4, columns 2(l%4) and 2(l%4)+1 of matrix j (.trans: rows 2(l%4), 2(l%4)+1 of column l/4).
// Applied to rows of 32-bit values it hands lane l the word [l/4][l%4]: the tf32 layout above.

// The PTX below needs sm_80 (mma.sync bf16/tf32, cp.async); device code compiled for an older
// architecture traps instead, and the handlers never launch it there.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define JAXCONV_SM80 1
#else
#define JAXCONV_SM80 0
#endif

__device__ __forceinline__ int lane_index() { return int(threadIdx.x) & 31; }

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// Registers of `kMatrices` 8x8 b16 matrices whose row addresses (shared memory, 16-byte
// aligned) this lane provides as described above.
template <int kMatrices, bool kTrans = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[kMatrices], const void* row) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4, "ldmatrix .x1/.x2/.x4");
#if JAXCONV_SM80
  const uint32_t a = shared_address(row);
  if constexpr (kMatrices == 1) {
    if constexpr (kTrans)
      asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                   : "=r"(r[0])
                   : "r"(a));
    else
      asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  } else if constexpr (kMatrices == 2) {
    if constexpr (kTrans)
      asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                   : "=r"(r[0]), "=r"(r[1])
                   : "r"(a));
    else
      asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                   : "=r"(r[0]), "=r"(r[1])
                   : "r"(a));
  } else {
    if constexpr (kTrans)
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(a));
    else
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(a));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched below sm_80 (the host checks the compute capability)
#elif defined(JAXCONV_CUDA_EMULATION)
  emu::warp_ldmatrix(r, kMatrices, kTrans, row);
#endif
}

enum class MmaKind { kBf16, kF16, kTf32 };

// d = A * B + d for one 16 x 8 tile (k = 16 for the 16-bit kinds, 8 for tf32), float32
// accumulation.
template <MmaKind kKind>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if JAXCONV_SM80
  if constexpr (kKind == MmaKind::kBf16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else if constexpr (kKind == MmaKind::kF16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched below sm_80 (the host checks the compute capability)
#elif defined(JAXCONV_CUDA_EMULATION)
  emu::warp_mma(d, a, b, int(kKind));
#endif
}

// float32 bits -> tf32 (round to nearest, ties away from zero, as cuBLAS does), still in a
// 32-bit register with the 13 low mantissa bits zero.
__device__ __forceinline__ uint32_t to_tf32(uint32_t f32_bits) {
#if JAXCONV_SM80
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(__uint_as_float(f32_bits)));
  return r;
#else
  if ((f32_bits & 0x7f800000u) == 0x7f800000u) return f32_bits;  // inf/nan unchanged
  return (f32_bits + 0x1000u) & 0xffffe000u;
#endif
}

// Asynchronous 16-byte copy global -> shared (both 16-byte aligned); with !full the 16 shared
// bytes are zero-filled and nothing is read. Completes at a cp_async_wait that covers the group
// it was committed in; its shared bytes must not be read before that (and a __syncthreads for
// other threads).
__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src, bool full) {
#if JAXCONV_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared_dst)),
               "l"(global_src), "r"(full ? 16 : 0));
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched below sm_80 (the host checks the compute capability)
#elif defined(JAXCONV_CUDA_EMULATION)
  emu::cp_async(shared_dst, global_src, full ? 16 : 0);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if JAXCONV_SM80
  asm volatile("cp.async.commit_group;\n" ::);
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched below sm_80 (the host checks the compute capability)
#elif defined(JAXCONV_CUDA_EMULATION)
  emu::cp_async_commit();
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if JAXCONV_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched below sm_80 (the host checks the compute capability)
#elif defined(JAXCONV_CUDA_EMULATION)
  emu::cp_async_wait(kPending);
#endif
}

// Value of `v` in lane `lane ^ mask` / in lane `src` (all 32 lanes take part).
__device__ __forceinline__ float shfl_xor(float v, int mask) {
#if defined(__CUDA_ARCH__)
  return __shfl_xor_sync(0xffffffffu, v, mask);
#elif defined(JAXCONV_CUDA_EMULATION)
  return emu::warp_shfl(v, lane_index() ^ mask);
#else
  return v;
#endif
}

__device__ __forceinline__ float shfl(float v, int src) {
#if defined(__CUDA_ARCH__)
  return __shfl_sync(0xffffffffu, v, src);
#elif defined(JAXCONV_CUDA_EMULATION)
  return emu::warp_shfl(v, src & 31);
#else
  return v;
#endif
}

}  // namespace jaxconv::cuda
