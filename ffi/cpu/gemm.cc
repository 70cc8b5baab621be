// Row-major GEMM used by every CPU convolution: C[M x N] (+)= A[M x K] * B[K x N].
//
// Register-blocked: an MR x NR tile of C lives in registers while k runs over the whole
// reduction, reading one row of A's tile (MR scalars) and one NR-wide strip of B per step.
// The same source is compiled twice: once for baseline x86-64 and once with AVX2+FMA enabled;
// `gemm` picks one at run time, so a default build runs on any x86-64 CPU.
#include <cstdint>

#include "cpu_common.h"

namespace jaxconv {
namespace {

template <typename T, int MR, int NR>
__attribute__((always_inline)) inline void micro_tile(int64_t K, const T* A, int64_t lda,
                                                      const T* B, int64_t ldb, T* C, int64_t ldc,
                                                      bool accumulate) {
  T acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = accumulate ? C[r * ldc + c] : T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    for (int r = 0; r < MR; ++r) {
      T a = A[r * lda + k];
      for (int c = 0; c < NR; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) C[r * ldc + c] = acc[r][c];
}

// Edge tiles (fewer than MR rows or NR columns): same arithmetic, runtime bounds.
template <typename T>
__attribute__((always_inline)) inline void edge_tile(int64_t mr, int64_t nr, int64_t K, const T* A,
                                                     int64_t lda, const T* B, int64_t ldb, T* C,
                                                     int64_t ldc, bool accumulate) {
  for (int64_t r = 0; r < mr; ++r) {
    T* c = C + r * ldc;
    if (!accumulate)
      for (int64_t j = 0; j < nr; ++j) c[j] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      T a = A[r * lda + k];
      const T* b = B + k * ldb;
      for (int64_t j = 0; j < nr; ++j) c[j] += a * b[j];
    }
  }
}

template <typename T, int MR, int NR>
__attribute__((always_inline)) inline void gemm_body(int64_t M, int64_t N, int64_t K, const T* A,
                                                     int64_t lda, const T* B, int64_t ldb, T* C,
                                                     int64_t ldc, bool accumulate) {
  // Columns in blocks so that the K x NB strip of B stays in cache across the row tiles.
  constexpr int64_t NB = 256;
  for (int64_t j0 = 0; j0 < N; j0 += NB) {
    int64_t jn = std::min(N, j0 + NB);
    int64_t i = 0;
    for (; i + MR <= M; i += MR) {
      int64_t j = j0;
      for (; j + NR <= jn; j += NR)
        micro_tile<T, MR, NR>(K, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate);
      if (j < jn)
        edge_tile<T>(MR, jn - j, K, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc,
                     accumulate);
    }
    if (i < M)
      edge_tile<T>(M - i, jn - j0, K, A + i * lda, lda, B + j0, ldb, C + i * ldc + j0, ldc,
                   accumulate);
  }
}

// 4 x 16 floats = 8 AVX registers of accumulators; 4 x 8 doubles likewise.
void gemm_f32_generic(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float* C, int64_t ldc, bool acc) {
  gemm_body<float, 4, 16>(M, N, K, A, lda, B, ldb, C, ldc, acc);
}
__attribute__((target("avx2,fma"))) void gemm_f32_avx2(int64_t M, int64_t N, int64_t K,
                                                        const float* A, int64_t lda,
                                                        const float* B, int64_t ldb, float* C,
                                                        int64_t ldc, bool acc) {
  gemm_body<float, 4, 16>(M, N, K, A, lda, B, ldb, C, ldc, acc);
}
void gemm_f64_generic(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                      const double* B, int64_t ldb, double* C, int64_t ldc, bool acc) {
  gemm_body<double, 4, 8>(M, N, K, A, lda, B, ldb, C, ldc, acc);
}
__attribute__((target("avx2,fma"))) void gemm_f64_avx2(int64_t M, int64_t N, int64_t K,
                                                        const double* A, int64_t lda,
                                                        const double* B, int64_t ldb, double* C,
                                                        int64_t ldc, bool acc) {
  gemm_body<double, 4, 8>(M, N, K, A, lda, B, ldb, C, ldc, acc);
}

bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}

}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (cpu_has_avx2_fma())
    gemm_f32_avx2(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  else
    gemm_f32_generic(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
          int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  if (cpu_has_avx2_fma())
    gemm_f64_avx2(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  else
    gemm_f64_generic(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace jaxconv
