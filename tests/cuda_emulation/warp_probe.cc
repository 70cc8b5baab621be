// C entry points that run the warp-level operations of ffi/cuda/kernel_common.cuh on one
// emulated warp (tests/cuda_emulation/warp.h), for tests/test_cuda_warp.py: each lane's
// registers come back so the test can compare them with the PTX ISA's layouts.
#include "emulate.h"

#include <cstring>

#include "cuda/kernel_common.cuh"

namespace {

using namespace jaxconv::cuda;

// ldmatrix: `rows` holds 32 rows of 8 16-bit values; lane l gives the address of row
// (l * row_step) % 32. out[l * 4 + j]: register j of lane l.
__global__ void ldmatrix_kernel(int matrices, int trans, int row_step, const uint16_t* rows,
                                uint32_t* out) {
  __shared__ __align__(16) uint16_t tile[32 * 8];
  const int l = lane_index();
  for (int i = 0; i < 8; ++i) tile[l * 8 + i] = rows[l * 8 + i];
  __syncthreads();
  uint32_t r[4] = {0, 0, 0, 0};
  const uint16_t* row = &tile[((l * row_step) % 32) * 8];
  uint32_t r1[1], r2[2], r4[4];
  if (matrices == 1) {
    if (trans)
      ldmatrix<1, true>(r1, row);
    else
      ldmatrix<1>(r1, row);
    r[0] = r1[0];
  } else if (matrices == 2) {
    if (trans)
      ldmatrix<2, true>(r2, row);
    else
      ldmatrix<2>(r2, row);
    r[0] = r2[0];
    r[1] = r2[1];
  } else {
    if (trans)
      ldmatrix<4, true>(r4, row);
    else
      ldmatrix<4>(r4, row);
    for (int j = 0; j < 4; ++j) r[j] = r4[j];
  }
  for (int j = 0; j < 4; ++j) out[l * 4 + j] = r[j];
}

// mma: lane l passes a[l*4 .. +4), b[l*2 .. +2), c[l*4 .. +4) (raw registers) and gets d.
__global__ void mma_kernel(int kind, const uint32_t* a, const uint32_t* b, const float* c,
                           float* d) {
  const int l = lane_index();
  uint32_t ra[4], rb[2];
  float acc[4];
  for (int i = 0; i < 4; ++i) ra[i] = a[l * 4 + i], acc[i] = c[l * 4 + i];
  for (int i = 0; i < 2; ++i) rb[i] = b[l * 2 + i];
  if (kind == 0)
    mma<MmaKind::kBf16>(acc, ra, rb);
  else if (kind == 1)
    mma<MmaKind::kF16>(acc, ra, rb);
  else
    mma<MmaKind::kTf32>(acc, ra, rb);
  for (int i = 0; i < 4; ++i) d[l * 4 + i] = acc[i];
}

// shuffles: out[l] = value of lane l ^ mask, out[32 + l] = value of lane (l * 7 + 3) % 32.
__global__ void shfl_kernel(int mask, const float* v, float* out) {
  const int l = lane_index();
  out[l] = shfl_xor(v[l], mask);
  out[32 + l] = shfl(v[l], (l * 7 + 3) % 32);
}

// cp.async: each lane copies 16 bytes (4 floats) of src in two groups (lanes' first and second
// halves of src), reading its shared destination before any wait, after wait_group 1 and after
// wait_group 0. Shared memory starts as -1. out: 3 snapshots of this lane's 8 floats.
__global__ void cp_async_kernel(const float* src, float* out) {
  __shared__ __align__(16) float tile[32 * 8];
  const int l = lane_index();
  for (int i = 0; i < 8; ++i) tile[l * 8 + i] = -1.0f;
  cp_async_16(&tile[l * 8], &src[l * 8], true);
  cp_async_commit();
  cp_async_16(&tile[l * 8 + 4], &src[l * 8 + 4], l % 2 == 0);  // odd lanes: zero fill
  cp_async_commit();
  for (int i = 0; i < 8; ++i) out[l * 24 + i] = tile[l * 8 + i];
  cp_async_wait<1>();
  for (int i = 0; i < 8; ++i) out[l * 24 + 8 + i] = tile[l * 8 + i];
  cp_async_wait<0>();
  for (int i = 0; i < 8; ++i) out[l * 24 + 16 + i] = tile[l * 8 + i];
}

// A thread that leaves with a committed group it never waited for.
__global__ void cp_async_unwaited_kernel(const float* src, float* out) {
  __shared__ __align__(16) float tile[32 * 4];
  const int l = lane_index();
  cp_async_16(&tile[l * 4], &src[l * 4], true);
  cp_async_commit();
  out[l] = 0.0f;
}

// Dynamic shared memory: the block's 32 threads fill its first `bytes` bytes from src (mode 0:
// cp.async, mode 1: plain stores, mode 2: cp.async then an ldmatrix of the last 128 bytes per
// lane group), then copy them back to out.
__global__ void dynamic_shared_kernel(int mode, int bytes, const float* src, float* out) {
  JAXCONV_DYNAMIC_SHARED(smem);
  const int l = lane_index();
  for (int off = l * 16; off < bytes; off += 32 * 16) {
    if (mode == 1)
      for (int i = 0; i < 4; ++i) reinterpret_cast<float*>(smem + off)[i] = src[off / 4 + i];
    else
      cp_async_16(smem + off, src + off / 4, true);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  if (mode == 2) {
    uint32_t r[4];
    ldmatrix<4>(r, smem + bytes - 128 + (l % 8) * 16);
  }
  for (int off = l * 16; off < bytes; off += 32 * 16)
    for (int i = 0; i < 4; ++i) out[off / 4 + i] = reinterpret_cast<const float*>(smem + off)[i];
}

int status(cudaError_t err) {
  return err == cudaSuccess ? 0 : err == cudaErrorInvalidValue ? 1 : 2;
}

}  // namespace

extern "C" {

int probe_ldmatrix(int matrices, int trans, int row_step, const uint16_t* rows, uint32_t* out) {
  return status(
      launch(ldmatrix_kernel, dim3(1), dim3(32), nullptr, matrices, trans, row_step, rows, out));
}

int probe_mma(int kind, const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  return status(launch(mma_kernel, dim3(1), dim3(32), nullptr, kind, a, b, c, d));
}

int probe_shfl(int mask, const float* v, float* out) {
  return status(launch(shfl_kernel, dim3(1), dim3(32), nullptr, mask, v, out));
}

int probe_cp_async(const float* src, float* out) {
  return status(launch(cp_async_kernel, dim3(1), dim3(32), nullptr, src, out));
}

int probe_cp_async_unwaited(const float* src, float* out) {
  return status(launch(cp_async_unwaited_kernel, dim3(1), dim3(32), nullptr, src, out));
}

// A warp-wide operation in a block of 48 threads (a partial second warp) is a launch error.
int probe_partial_warp(const float* v, float* out) {
  return status(launch(shfl_kernel, dim3(1), dim3(48), nullptr, 1, v, out));
}

// dynamic_shared_kernel filling `bytes` in a launch of `launch_bytes` dynamic shared memory,
// after cudaFuncSetAttribute(MaxDynamicSharedMemorySize, opt_in) where opt_in > 0 (-> 1 if the
// attribute is refused). 0: ran, 1: refused (cudaErrorInvalidValue), 2: the kernel failed.
int probe_dynamic_shared(int mode, int bytes, int launch_bytes, int opt_in, const float* src,
                         float* out) {
  if (opt_in > 0 &&
      cudaFuncSetAttribute(reinterpret_cast<const void*>(dynamic_shared_kernel),
                           cudaFuncAttributeMaxDynamicSharedMemorySize, opt_in) != cudaSuccess)
    return 1;
  const int s = status(launch_with_shared(dynamic_shared_kernel, dim3(1), dim3(32), launch_bytes,
                                          nullptr, mode, bytes, src, out));
  cudaFuncSetAttribute(reinterpret_cast<const void*>(dynamic_shared_kernel),
                       cudaFuncAttributeMaxDynamicSharedMemorySize, 0);  // the next probe's own
  return s;
}

// launch_dynamic_shared, the kernels' helper, which opts in above 48 KB by itself.
int probe_launch_dynamic_shared(int bytes, int launch_bytes, const float* src, float* out) {
  const int s = status(launch_dynamic_shared(dynamic_shared_kernel, dim3(1), dim3(32), launch_bytes,
                                             nullptr, 0, bytes, src, out));
  cudaFuncSetAttribute(reinterpret_cast<const void*>(dynamic_shared_kernel),
                       cudaFuncAttributeMaxDynamicSharedMemorySize, 0);
  return s;
}

}  // extern "C"
