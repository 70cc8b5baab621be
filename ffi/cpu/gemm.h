// The GEMM that the implicit-GEMM convolutions reduce to: C[M x N] (+)= A[M x K] * Bp, A read
// in place (row-major, leading dimension lda), B packed. The kernel is gemm.cc, compiled once
// per capability; these entry points call the one chosen for this CPU (kernel_table.h).
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernel_table.h"

namespace jaxconv {

// B packed for the micro-kernel: panels of kPanelWidth<S> columns; panel j holds
// B[k, j*NR + c] at Bp[j * panel_stride + k * NR + c] for k in [0, K), zeros past column N.
// (NR = two 256-bit vectors: 16 floats or 8 doubles.) The convolutions pack B themselves
// straight from their tensors (that packing is the im2col); A is always read in place.
template <typename S>
constexpr int64_t kPanelWidth = 64 / sizeof(S);

inline void gemm_packed(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                        const float* Bp, int64_t panel_stride, float* C, int64_t ldc,
                        bool accumulate) {
  kernels().gemm_f32(M, N, K, A, lda, Bp, panel_stride, C, ldc, accumulate);
}

inline void gemm_packed(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                        const double* Bp, int64_t panel_stride, double* C, int64_t ldc,
                        bool accumulate) {
  kernels().gemm_f64(M, N, K, A, lda, Bp, panel_stride, C, ldc, accumulate);
}

// C[M x N] (+)= A * Bp with A[r][k] = rows[r][koff[k]]: the forward convolution's im2col read
// straight from the activations (rows[r]: output position r's first input cell, koff[k]: where
// reduction index k lies from it), for passes whose taps all land inside the input (conv_fwd.cc).
inline void gemm_indirect(int64_t M, int64_t N, int64_t K, const float* const* rows,
                          const int64_t* koff, const float* Bp, int64_t panel_stride, float* C,
                          int64_t ldc, bool accumulate) {
  kernels().gemm_indirect_f32(M, N, K, rows, koff, Bp, panel_stride, C, ldc, accumulate);
}

inline void gemm_indirect(int64_t M, int64_t N, int64_t K, const double* const* rows,
                          const int64_t* koff, const double* Bp, int64_t panel_stride, double* C,
                          int64_t ldc, bool accumulate) {
  kernels().gemm_indirect_f64(M, N, K, rows, koff, Bp, panel_stride, C, ldc, accumulate);
}

// The GEMM of a convolution of storage type T, on operands packed from T's values (widened to
// float32 exactly, for the half types): bfloat16 runs on vdpbf16ps where the CPU has it (the
// avx512_bf16 table, gemm_bf16.cc); everything else on gemm_packed. Only operands that hold
// T's values may come here (not Winograd's transformed tiles, which a bf16 pair would round).
template <typename T, typename S>
inline void gemm_packed_for(int64_t M, int64_t N, int64_t K, const S* A, int64_t lda, const S* Bp,
                            int64_t panel_stride, S* C, int64_t ldc, bool accumulate) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    if (const GemmPacked<float> bf16 = kernels().gemm_bf16) {
      bf16(M, N, K, A, lda, Bp, panel_stride, C, ldc, accumulate);
      return;
    }
  }
  gemm_packed(M, N, K, A, lda, Bp, panel_stride, C, ldc, accumulate);
}

}  // namespace jaxconv
