// Single-thread throughput of jaxconv's packed GEMM (ffi/cpu/gemm.cc) on one K-slice shape, to
// compare the micro-kernel against the FMA peak from peak_fma.cc.
//
//   g++ -O3 -std=c++17 -I$(python -c "import jax; print(jax.ffi.include_dir())") -Iffi \
//       benchmarks/gemm_bench.cc ffi/cpu/gemm.cc -o /tmp/gemm_bench && /tmp/gemm_bench M N K
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cpu/cpu_common.h"

using namespace jaxconv;

int main(int argc, char** argv) {
  int64_t M = argc > 1 ? atol(argv[1]) : 96, N = argc > 2 ? atol(argv[2]) : 256,
          K = argc > 3 ? atol(argv[3]) : 256;
  std::vector<float> A(M * K), B(K * N), C(M * N), Bp((N + 15) / 16 * 16 * K);
  for (auto& v : A) v = float(rand()) / RAND_MAX - 0.5f;
  for (auto& v : B) v = float(rand()) / RAND_MAX - 0.5f;
  pack_b_panels<float>(K, N, B.data(), N, Bp.data());
  // Check one run against a naive product.
  gemm_packed(M, N, K, A.data(), K, Bp.data(), K * 16, C.data(), N, false);
  double err = 0;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += double(A[i * K + k]) * B[k * N + j];
      err = std::max(err, std::fabs(s - C[i * N + j]));
    }
  double best = 1e30;
  for (int rep = 0; rep < 20; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    int inner = 50;
    for (int it = 0; it < inner; ++it)
      gemm_packed(M, N, K, A.data(), K, Bp.data(), K * 16, C.data(), N, true);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s / inner);
  }
  std::printf("M=%ld N=%ld K=%ld: %.1f GFLOP/s (1 thread), max err %.2e\n", (long)M, (long)N,
              (long)K, 2.0 * M * N * K / best / 1e9, err);
}
