// The GEMM engine behind every CPU convolution: C[M x N] (+)= A[M x K] * B[K x N].
//
// A is read in place (row-major, leading dimension lda); B arrives packed in panels of NR
// columns (see cpu_common.h), so the micro-kernel streams it with unit stride. The micro-kernel
// keeps an MR x NR tile of C in registers (MR = 6 rows x NR = two 256-bit vectors: 12
// accumulators + 2 B vectors + 1 broadcast A value = 15 of the 16 AVX registers) and runs the
// whole K of its call, per step loading one B row (2 vectors) and broadcasting MR values of A.
//
// Cache blocking is shared between this file and its callers: callers hand in K-slices of at
// most a few hundred steps, so that one packed B panel (K x NR) stays in L1 while the
// micro-kernel sweeps down an MC-row block of A held in L2; the loops here are
//   for each MC-row block of A:  for each B panel:  for each MR-row tile:  micro-kernel.
//
// Compiled once per capability (kernel_table.h): for baseline x86-64 GCC's vector extensions
// become SSE2 pairs; with AVX2+FMA one ymm register per vector, a*b+c contracted to vfmadd.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu_common.h"
#include "gemm.h"
#include "kernel_table.h"
#include "simd.h"

namespace jaxconv::JAXCONV_CPU_CAPABILITY {
namespace {

constexpr int kMR = 6;

// One MR x NR tile: C[0:MR, 0:nr] (+)= A[0:MR, 0:K] * Bpanel[0:K, 0:NR]. Rows past `mr` of A are
// never read: MR is the compile-time row count of this instantiation (mr == MR). Columns past nr
// are computed (the panel is zero-padded) but not stored.
template <typename S, int MR>
__attribute__((always_inline)) inline void micro_kernel(int64_t K, const S* A, int64_t lda,
                                                        const S* Bp, S* C, int64_t ldc,
                                                        bool accumulate, int64_t nr) {
  constexpr int L = kLanes<S>, NR = 2 * L;
  V<S> c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = V<S>{};
  const S* a[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) a[r] = A + r * lda;
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    V<S> b0 = load(Bp + k * NR), b1 = load(Bp + k * NR + L);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      S ar = a[r][k];
      c0[r] += b0 * ar;
      c1[r] += b1 * ar;
    }
  }
  if (nr == NR) {
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      S* cr = C + r * ldc;
      if (accumulate) {
        c0[r] += load(cr);
        c1[r] += load(cr + L);
      }
      store(cr, c0[r]);
      store(cr + L, c1[r]);
    }
    return;
  }
  S tile[MR][NR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    store(&tile[r][0], c0[r]);
    store(&tile[r][L], c1[r]);
  }
  for (int r = 0; r < MR; ++r)
    for (int64_t j = 0; j < nr; ++j) C[r * ldc + j] = (accumulate ? C[r * ldc + j] : S(0)) + tile[r][j];
}

template <typename S>
void gemm_packed_kernel(int64_t M, int64_t N, int64_t K, const S* A, int64_t lda, const S* Bp,
                        int64_t panel_stride, S* C, int64_t ldc, bool accumulate) {
  constexpr int64_t NR = 2 * kLanes<S>;
  // Rows of A per block: MC x K of A (K <= a few hundred) stays in L2 while every panel of B
  // passes over it.
  constexpr int64_t MC = 16 * kMR;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, sizeof(S) * N);
    return;
  }
  const int64_t panels = (N + NR - 1) / NR;
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t m1 = std::min(M, m0 + MC);
    for (int64_t p = 0; p < panels; ++p) {
      const S* bp = Bp + p * panel_stride;
      const int64_t nr = std::min(NR, N - p * NR);
      S* cp = C + p * NR;
      int64_t i = m0;
      for (; i + kMR <= m1; i += kMR)
        micro_kernel<S, kMR>(K, A + i * lda, lda, bp, cp + i * ldc, ldc, accumulate, nr);
      switch (m1 - i) {
        case 5: micro_kernel<S, 5>(K, A + i * lda, lda, bp, cp + i * ldc, ldc, accumulate, nr); break;
        case 4: micro_kernel<S, 4>(K, A + i * lda, lda, bp, cp + i * ldc, ldc, accumulate, nr); break;
        case 3: micro_kernel<S, 3>(K, A + i * lda, lda, bp, cp + i * ldc, ldc, accumulate, nr); break;
        case 2: micro_kernel<S, 2>(K, A + i * lda, lda, bp, cp + i * ldc, ldc, accumulate, nr); break;
        case 1: micro_kernel<S, 1>(K, A + i * lda, lda, bp, cp + i * ldc, ldc, accumulate, nr); break;
        default: break;
      }
    }
  }
}

}  // namespace

void add_gemm_kernels(KernelTable* table) {
  table->gemm_f32 = gemm_packed_kernel<float>;
  table->gemm_f64 = gemm_packed_kernel<double>;
}

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY
