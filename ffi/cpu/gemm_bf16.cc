// The bfloat16 GEMM on vdpbf16ps (AVX512_BF16): C[M x N] (+)= A[M x K] * Bp, same operands and
// packed-B format as gemm.cc's float32 GEMM (gemm.h), for operands whose float32 values are
// bfloat16 values widened (the packed operands of a bfloat16 convolution). Accumulates in
// float32.
//
// vdpbf16ps c, a, b: for each of the 16 float32 lanes i,
//   c[i] = (c[i] + a.bf16[2i+1] * b.bf16[2i+1]) + a.bf16[2i] * b.bf16[2i]
// (each product exact in float32, each addition rounded to nearest even; denormal inputs and
// outputs are flushed to zero, MXCSR is not consulted). So the operands go in as bf16 pairs
// along K: a 32-bit A element is the pair (A[m, 2j], A[m, 2j+1]), broadcast to every lane; a
// B vector holds, for 16 columns c, the pairs (B[2j, c], B[2j+1, c]):
//
//   Bpair[panel][j][2c + t] = B[2j + t, panel*16 + c]     (t = 0, 1; zero past K and N)
//   Apair[m][2j + t]        = A[m, 2j + t]                (zero at K when K is odd)
//
// Both are converted from the float32 operands on entry (vcvtne2ps2bf16: round to nearest even,
// exact for values that are bfloat16 already), B once per call for all its panels, A once per
// MC-row block; then the micro-kernel is gemm.cc's 8 rows x 2 panels tile with 16 zmm
// accumulators, per K pair 2 vector loads, 8 broadcasts and 16 vdpbf16ps: half the instructions
// of the float32 tile for the same work. Column tails use masked stores.
//
// Compiled in every capability's objects (kernel_table.h); only the AVX-512 objects hold the
// kernel, in functions with target("avx512bf16"), and only the avx512_bf16 table
// (kernel_select.cc, chosen when cpuid reports AVX512_BF16) points at it.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "kernel_table.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace jaxconv::JAXCONV_CPU_CAPABILITY {

#if defined(__AVX512F__)
namespace {

#define JAXCONV_BF16 __attribute__((target("avx512bf16")))

constexpr int kMR = 8;       // rows of the tile
constexpr int64_t kL = 16;   // float32 lanes = columns of a panel
constexpr int64_t kMC = 64;  // rows of A converted per block (stays in L1/L2 with its K)

// Per-thread buffers of bf16 pairs (one 32-bit slot per pair). std::vector<float> so the
// instantiation the linker keeps is the baseline objects' own (kernel_table.h).
float* pair_buffer(int which, int64_t slots) {
  thread_local std::vector<float> buf[2];
  if (int64_t(buf[which].size()) < slots + 16) buf[which].resize(slots + 16);
  return buf[which].data();
}

// Row k of a packed panel as float32 lanes; zero past K.
JAXCONV_BF16 inline __m512 panel_row(const float* panel, int64_t k, int64_t K) {
  return k < K ? _mm512_loadu_ps(panel + k * kL) : _mm512_setzero_ps();
}

// B panels (float32, gemm.h's format) -> pairs: Bpair[p][j] = interleave(row 2j, row 2j+1).
JAXCONV_BF16 void convert_b(int64_t panels, int64_t K, const float* Bp, int64_t panel_stride,
                            uint32_t* out) {
  const int64_t KP = (K + 1) / 2;
  // vcvtne2ps2bf16(hi, lo) puts lo's 16 values in halves 0..15 and hi's in 16..31; the pair
  // order wants lo[c], hi[c] adjacent.
  alignas(64) static const uint16_t kInterleave[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                       21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                       11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  for (int64_t p = 0; p < panels; ++p) {
    const float* panel = Bp + p * panel_stride;
    uint32_t* dst = out + p * KP * kL;
    for (int64_t j = 0; j < KP; ++j) {
      __m512bh both =
          _mm512_cvtne2ps_pbh(panel_row(panel, 2 * j + 1, K), panel_row(panel, 2 * j, K));
      _mm512_storeu_si512(dst + j * kL, _mm512_permutexvar_epi16(idx, (__m512i)both));
    }
  }
}

// Rows [0, rows) of A (K values each, leading dimension lda) -> bf16 rows of 2*KP values.
JAXCONV_BF16 void convert_a(int64_t rows, int64_t K, const float* A, int64_t lda, uint32_t* out) {
  const int64_t KP = (K + 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = A + r * lda;
    uint16_t* dst = reinterpret_cast<uint16_t*>(out + r * KP);
    int64_t k = 0;
    for (; k + 32 <= K; k += 32)
      _mm512_storeu_si512(dst + k, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + k + 16),
                                                                _mm512_loadu_ps(src + k)));
    if (k < K) {
      // Masked tail: nothing past A's row is read; the pad value at K (odd K) is zero.
      const int64_t n = K - k, n0 = std::min<int64_t>(n, 16), n1 = n - n0;
      const __m512 lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n0) - 1), src + k);
      const __m512 hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n1) - 1), src + k + 16);
      const int64_t keep = 2 * KP - k;  // values up to the pair boundary
      _mm512_mask_storeu_epi16(dst + k, static_cast<__mmask32>((uint64_t(1) << keep) - 1),
                               (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

// One MR x NP-panel tile over KP pairs: C[0:MR, 0:nr] (+)= A * B (columns past nr not stored).
template <int MR, int NP>
JAXCONV_BF16 void micro_kernel_bf16(int64_t KP, const uint32_t* A, int64_t lda, const uint32_t* Bq,
                                    int64_t panel_stride, float* C, int64_t ldc, bool accumulate,
                                    int64_t nr) {
  __m512 c[NP][MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) c[p][r] = _mm512_setzero_ps();
  const uint32_t* b1 = Bq + (NP > 1 ? panel_stride : 0);
  for (int64_t j = 0; j < KP; ++j) {
    const __m512bh b0v = (__m512bh)_mm512_loadu_si512(Bq + j * kL);
    __m512bh b1v;
    if constexpr (NP > 1) b1v = (__m512bh)_mm512_loadu_si512(b1 + j * kL);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(A[r * lda + j]));
      c[0][r] = _mm512_dpbf16_ps(c[0][r], ar, b0v);
      if constexpr (NP > 1) c[1][r] = _mm512_dpbf16_ps(c[1][r], ar, b1v);
    }
  }
#pragma GCC unroll 2
  for (int p = 0; p < NP; ++p) {
    const int64_t cols = std::min<int64_t>(kL, nr - p * kL);
    if (cols <= 0) break;
    const __mmask16 m = cols == kL ? __mmask16(0xffff) : static_cast<__mmask16>((1u << cols) - 1);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      float* cr = C + r * ldc + p * kL;
      __m512 v = c[p][r];
      if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, cr));
      _mm512_mask_storeu_ps(cr, m, v);
    }
  }
}

using TileFn = void (*)(int64_t, const uint32_t*, int64_t, const uint32_t*, int64_t, float*,
                        int64_t, bool, int64_t);
template <int NP, int... R>
constexpr std::array<TileFn, sizeof...(R)> tiles(std::integer_sequence<int, R...>) {
  return {&micro_kernel_bf16<R + 1, NP>...};  // [rows - 1]: 1 .. kMR rows
}

// C (+)= A * B on operands already rounded to pairs: A rows of KP pairs lda pairs apart, B
// panels of KP pair rows panel_stride pairs apart. gemm_bf16_kernel calls it after converting;
// Winograd's GEMM stage (winograd.cc) calls it directly, its input transform having written the
// tiles as pairs and the filter transform rounded once per call. Each pair of panels runs down
// all the rows (B stays in L1 across them).
JAXCONV_BF16 void gemm_bf16_pairs(int64_t M, int64_t N, int64_t KP, const uint32_t* A, int64_t lda,
                                  const uint32_t* Bq, int64_t panel_stride, float* C, int64_t ldc,
                                  bool accumulate) {
  static constexpr auto tiles1 = tiles<1>(std::make_integer_sequence<int, kMR>{});
  static constexpr auto tiles2 = tiles<2>(std::make_integer_sequence<int, kMR>{});
  if (M <= 0 || N <= 0) return;
  const int64_t panels = (N + kL - 1) / kL;
  for (int64_t p = 0; p < panels; p += 2) {
    const int64_t nr = std::min(2 * kL, N - p * kL);
    const auto& t = nr > kL ? tiles2 : tiles1;
    for (int64_t i = 0; i < M; i += kMR)
      t[std::min<int64_t>(kMR, M - i) - 1](KP, A + i * lda, lda, Bq + p * panel_stride,
                                           panel_stride, C + i * ldc + p * kL, ldc, accumulate, nr);
  }
}

JAXCONV_BF16 void gemm_bf16_kernel(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                                   const float* Bp, int64_t panel_stride, float* C, int64_t ldc,
                                   bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, sizeof(float) * N);
    return;
  }
  const int64_t KP = (K + 1) / 2, panels = (N + kL - 1) / kL, pstride = KP * kL;
  uint32_t* Bq = reinterpret_cast<uint32_t*>(pair_buffer(0, panels * pstride));
  uint32_t* Aq = reinterpret_cast<uint32_t*>(pair_buffer(1, kMC * KP));
  convert_b(panels, K, Bp, panel_stride, Bq);
  for (int64_t m0 = 0; m0 < M; m0 += kMC) {
    const int64_t mb = std::min(kMC, M - m0);
    convert_a(mb, K, A + m0 * lda, lda, Aq);
    gemm_bf16_pairs(mb, N, KP, Aq, KP, Bq, pstride, C + m0 * ldc, ldc, accumulate);
  }
}

#undef JAXCONV_BF16

}  // namespace

void add_bf16_gemm_kernels(KernelTable* table) {
  table->gemm_bf16 = gemm_bf16_kernel;
  table->gemm_bf16_pairs = gemm_bf16_pairs;
}

#else

void add_bf16_gemm_kernels(KernelTable*) {}  // vdpbf16ps needs the AVX-512 objects

#endif  // __AVX512F__

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY
