// The GEMM engine behind every CPU convolution: C[M x N] (+)= A[M x K] * B[K x N].
//
// A is read in place (row-major, leading dimension lda); B arrives packed in panels of NR
// columns (format in gemm.h), so the micro-kernel streams it with unit stride. The micro-kernel
// keeps an MR x NR tile of C in registers (MR = 6 rows x NR = two 256-bit vectors: 12
// accumulators + 2 B vectors + 1 broadcast A value = 15 of the 16 AVX registers) and runs the
// whole K of its call, per step loading one B row (2 vectors) and broadcasting MR values of A.
//
// Cache blocking is shared between this file and its callers: callers hand in K-slices of at
// most a few hundred steps, so that one packed B panel (K x NR) stays in L1 while the
// micro-kernel sweeps down an MC-row block of A held in L2; the loops here are
//   for each MC-row block of A:  for each B panel:  for each MR-row tile:  micro-kernel.
//
// The same loops serve gemm_indirect (gemm.h): the micro-kernels read A through an addressing
// policy (InPlaceA: A + r*lda + k; IndirectA: rows[r] + koff[k]), so the forward convolution can
// feed its im2col to the micro-kernel without packing it.
//
// Compiled once per capability (kernel_table.h): for baseline x86-64 GCC's vector extensions
// become SSE2 pairs; with AVX2+FMA one ymm register per vector, a*b+c contracted to vfmadd.
//
// AVX-512 has its own micro-kernel (micro_kernel_512): a packed panel (16 floats, 8 doubles) is
// exactly one zmm register, and the tile is kMR512 = 8 rows x two adjacent panels (32 floats):
// 16 accumulators + 2 B vectors, so per K step 2 vector loads and 8 broadcasts feed 16 zmm
// FMAs (the 6 x 2 ymm tile above: 2 loads and 6 broadcasts per 12 FMAs of half the width). On
// Zen 4, which splits a 512-bit FMA in two, both tiles run at the FMA roof (~110 GFLOP/s per
// core in a standalone harness, min of 200): 8 x 2 panels measured 1.00-1.11x the AVX2 tile
// (two runs) on conv-shaped GEMMs, while 12 x 2 (24 accumulators; two B panels of
// 256 x 64 B fill Zen 4's 32 KiB L1) measured 0.92-0.98x and 24 x 1 worse. Intel servers with
// two 512-bit FMA ports get twice the AVX2 peak from it. Column tails (N not a multiple of 16)
// use masked loads and stores instead of the scalar copy-out.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu_common.h"
#include "gemm.h"
#include "kernel_table.h"
#include "simd.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace jaxconv::JAXCONV_CPU_CAPABILITY {
namespace {

constexpr int kMR = 6;

// How the micro-kernels read A[r][k]. In place: row r at A + r*lda, element k at +k (the packed
// GEMM). Indirect: row r at rows[r], element k at +koff[k] (gemm_indirect: an implicit-GEMM
// operand read straight from the activations, one row pointer per output position and one
// offset per reduction index, so nothing is packed). The k loop adds one load of koff[k] per
// step, shared by the MR rows; with InPlace, off(k) = k compiles to the plain GEMM.
template <typename S>
struct InPlaceA {
  const S* A;
  int64_t lda;
  const S* row(int r) const { return A + r * lda; }
  int64_t off(int64_t k) const { return k; }
  InPlaceA from(int64_t i) const { return {A + i * lda, lda}; }
};
template <typename S>
struct IndirectA {
  const S* const* rows;
  const int64_t* koff;
  const S* row(int r) const { return rows[r]; }
  int64_t off(int64_t k) const { return koff[k]; }
  IndirectA from(int64_t i) const { return {rows + i, koff}; }
};

// One MR x NR tile: C[0:MR, 0:nr] (+)= A[0:MR, 0:K] * Bpanel[0:K, 0:NR]. Rows past `mr` of A are
// never read: MR is the compile-time row count of this instantiation (mr == MR). Columns past nr
// are computed (the panel is zero-padded) but not stored.
template <typename S, int MR, typename AOp>
__attribute__((always_inline)) inline void micro_kernel(int64_t K, AOp A, const S* Bp, S* C,
                                                        int64_t ldc, bool accumulate, int64_t nr) {
  constexpr int L = kLanes<S>, NR = 2 * L;
  V<S> c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = V<S>{};
  const S* a[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) a[r] = A.row(r);
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    V<S> b0 = load(Bp + k * NR), b1 = load(Bp + k * NR + L);
    const int64_t o = A.off(k);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      S ar = a[r][o];
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
    for (int64_t j = 0; j < nr; ++j)
      C[r * ldc + j] = (accumulate ? C[r * ldc + j] : S(0)) + tile[r][j];
}

#if defined(__AVX512F__)
constexpr int kMR512 = 8;

// The first n (1..lanes) elements of p; zero past them. Masked: nothing past p + n is touched.
template <typename S>
__attribute__((always_inline)) inline V512<S> load_first(const S* p, int64_t n) {
  if constexpr (std::is_same_v<S, float>)
    return (V512<S>)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  else
    return (V512<S>)_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
}
template <typename S>
__attribute__((always_inline)) inline void store_first(S* p, int64_t n, V512<S> v) {
  if constexpr (std::is_same_v<S, float>)
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), (__m512)v);
  else
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), (__m512d)v);
}

// One MR x (NP panels) tile: C[0:MR, 0:nr] (+)= A[0:MR, 0:K] * [panel 0 | panel 1][0:K, :],
// nr <= NP * L columns (a panel is L = one zmm of columns, zero-padded past N; columns past nr
// are computed but never stored). Panel 1 starts panel_stride elements after panel 0.
template <typename S, int MR, int NP, typename AOp>
void micro_kernel_512(int64_t K, AOp A, const S* Bp, int64_t panel_stride, S* C, int64_t ldc,
                      bool accumulate, int64_t nr) {
  constexpr int L = kLanes512<S>;
  V512<S> c[NP][MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) c[p][r] = V512<S>{};
  const S* a[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) a[r] = A.row(r);
  const S* b1 = Bp + (NP > 1 ? panel_stride : 0);
  for (int64_t k = 0; k < K; ++k) {
    V512<S> b0v, b1v;
    std::memcpy(&b0v, Bp + k * L, sizeof(b0v));
    if constexpr (NP > 1) std::memcpy(&b1v, b1 + k * L, sizeof(b1v));
    const int64_t o = A.off(k);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const S ar = a[r][o];
      c[0][r] += b0v * ar;
      if constexpr (NP > 1) c[1][r] += b1v * ar;
    }
  }
#pragma GCC unroll 2
  for (int p = 0; p < NP; ++p) {
    const int64_t cols = std::min<int64_t>(L, nr - p * L);
    if (cols <= 0) break;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      S* cr = C + r * ldc + p * L;
      if (cols == L) {
        V512<S> v = c[p][r];
        if (accumulate) {
          V512<S> old;
          std::memcpy(&old, cr, sizeof(old));
          v += old;
        }
        std::memcpy(cr, &v, sizeof(v));
      } else {
        store_first(cr, cols, accumulate ? c[p][r] + load_first(cr, cols) : c[p][r]);
      }
    }
  }
}

// Row-tail tiles (1 .. kMR512 - 1 rows) of NP panels, by row count.
template <typename S, int NP, typename AOp, int... R>
constexpr auto row_tail_kernels(std::integer_sequence<int, R...>) {
  return std::array<void (*)(int64_t, AOp, const S*, int64_t, S*, int64_t, bool, int64_t),
                    sizeof...(R)>{&micro_kernel_512<S, R + 1, NP, AOp>...};
}

template <typename S, typename AOp>
void gemm_512(int64_t M, int64_t N, int64_t K, AOp A, const S* Bp, int64_t panel_stride, S* C,
              int64_t ldc, bool accumulate) {
  constexpr int64_t L = kLanes512<S>;
  static_assert(L == kPanelWidth<S>, "a packed panel is one zmm register");
  constexpr int64_t MC = 8 * kMR512;  // MC x K of A stays in L2 (K <= a few hundred)
  static constexpr auto tails1 =
      row_tail_kernels<S, 1, AOp>(std::make_integer_sequence<int, kMR512 - 1>{});
  static constexpr auto tails2 =
      row_tail_kernels<S, 2, AOp>(std::make_integer_sequence<int, kMR512 - 1>{});
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, sizeof(S) * N);
    return;
  }
  const int64_t panels = (N + L - 1) / L;
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t m1 = std::min(M, m0 + MC);
    for (int64_t p = 0; p < panels; p += 2) {
      const S* bp = Bp + p * panel_stride;
      const int64_t nr = std::min(2 * L, N - p * L);
      S* cp = C + p * L;
      int64_t i = m0;
      if (nr > L) {
        for (; i + kMR512 <= m1; i += kMR512)
          micro_kernel_512<S, kMR512, 2>(K, A.from(i), bp, panel_stride, cp + i * ldc, ldc,
                                         accumulate, nr);
        if (i < m1)
          tails2[m1 - i - 1](K, A.from(i), bp, panel_stride, cp + i * ldc, ldc, accumulate, nr);
      } else {
        for (; i + kMR512 <= m1; i += kMR512)
          micro_kernel_512<S, kMR512, 1>(K, A.from(i), bp, panel_stride, cp + i * ldc, ldc,
                                         accumulate, nr);
        if (i < m1)
          tails1[m1 - i - 1](K, A.from(i), bp, panel_stride, cp + i * ldc, ldc, accumulate, nr);
      }
    }
  }
}
#endif  // __AVX512F__

template <typename S, typename AOp>
void gemm_vec(int64_t M, int64_t N, int64_t K, AOp A, const S* Bp, int64_t panel_stride, S* C,
              int64_t ldc, bool accumulate) {
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
        micro_kernel<S, kMR>(K, A.from(i), bp, cp + i * ldc, ldc, accumulate, nr);
      switch (m1 - i) {
        case 5: micro_kernel<S, 5>(K, A.from(i), bp, cp + i * ldc, ldc, accumulate, nr); break;
        case 4: micro_kernel<S, 4>(K, A.from(i), bp, cp + i * ldc, ldc, accumulate, nr); break;
        case 3: micro_kernel<S, 3>(K, A.from(i), bp, cp + i * ldc, ldc, accumulate, nr); break;
        case 2: micro_kernel<S, 2>(K, A.from(i), bp, cp + i * ldc, ldc, accumulate, nr); break;
        case 1: micro_kernel<S, 1>(K, A.from(i), bp, cp + i * ldc, ldc, accumulate, nr); break;
        default: break;
      }
    }
  }
}

// The table's entry points: A in place, or indirect (kernel_table.h).
template <typename S>
void gemm_packed_kernel(int64_t M, int64_t N, int64_t K, const S* A, int64_t lda, const S* Bp,
                        int64_t panel_stride, S* C, int64_t ldc, bool accumulate) {
#if defined(__AVX512F__)
  gemm_512(M, N, K, InPlaceA<S>{A, lda}, Bp, panel_stride, C, ldc, accumulate);
#else
  gemm_vec(M, N, K, InPlaceA<S>{A, lda}, Bp, panel_stride, C, ldc, accumulate);
#endif
}

template <typename S>
void gemm_indirect_kernel(int64_t M, int64_t N, int64_t K, const S* const* rows,
                          const int64_t* koff, const S* Bp, int64_t panel_stride, S* C, int64_t ldc,
                          bool accumulate) {
#if defined(__AVX512F__)
  gemm_512(M, N, K, IndirectA<S>{rows, koff}, Bp, panel_stride, C, ldc, accumulate);
#else
  gemm_vec(M, N, K, IndirectA<S>{rows, koff}, Bp, panel_stride, C, ldc, accumulate);
#endif
}

}  // namespace

void add_gemm_kernels(KernelTable* table) {
  table->gemm_f32 = gemm_packed_kernel<float>;
  table->gemm_f64 = gemm_packed_kernel<double>;
  table->gemm_indirect_f32 = gemm_indirect_kernel<float>;
  table->gemm_indirect_f64 = gemm_indirect_kernel<double>;
}

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY
