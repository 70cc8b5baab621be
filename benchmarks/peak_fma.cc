// Measures this machine's float32 FMA throughput: the "peak" that kernel efficiency is quoted
// against. Each thread runs a tight loop of independent AVX2 FMAs (12 accumulator registers, so
// the 4-5 cycle FMA latency never stalls two FMA pipes) with no memory traffic, for 1 and for
// all usable threads, and reports the best of several runs.
//
//   g++ -O2 -std=c++17 -pthread benchmarks/peak_fma.cc -o /tmp/peak_fma && /tmp/peak_fma
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

__attribute__((target("avx2,fma"), noinline)) float fma_loop(long iters, float seed) {
  __m256 a = _mm256_set1_ps(1.0f + 1e-7f * seed), b = _mm256_set1_ps(1e-7f);
  __m256 acc[12];
  // Fully unrolled so that the accumulators live in registers (checked in the assembly: the
  // loop body is 12 vfmadd instructions on ymm registers, a counter and a branch).
#pragma GCC unroll 12
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(float(i) * seed);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  __m256 s = acc[0];
#pragma GCC unroll 12
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
  float out[8];
  _mm256_storeu_ps(out, s);
  return out[0];
}

// GFLOP/s of `threads` threads each running fma_loop(iters): 12 FMAs x 8 lanes x 2 FLOPs.
double measure(int threads, long iters) {
  std::vector<std::thread> pool;
  std::vector<float> sink(threads);
  auto t0 = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] { sink[t] = fma_loop(iters, float(t + 1)); });
  for (auto& th : pool) th.join();
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return threads * double(iters) * 12 * 8 * 2 / s / 1e9;
}

int main() {
  int hw = std::max(1u, std::thread::hardware_concurrency());
  const long iters = 200'000'000;  // ~0.5 s per thread at ~3 GHz
  for (int threads : {1, hw}) {
    double best = 0;
    for (int rep = 0; rep < 5; ++rep) best = std::max(best, measure(threads, iters));
    std::printf("%d thread(s): %.1f GFLOP/s float32 (best of 5)\n", threads, best);
    if (hw == 1) break;
  }
  return 0;
}
