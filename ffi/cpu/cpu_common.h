// CPU building blocks: storage types for the half formats, dtype dispatch and a parallel loop over
// XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "../ffi_common.h"

namespace jaxconv {

// ---------------------------------------------------------------------------------------------
// Storage types. float16 and bfloat16 arrive as raw 16-bit patterns; the kernels widen them to
// float32 when they pack operands, accumulate in float32, and round once when they store.

struct f16_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// IEEE binary16 -> binary32, exact (including subnormals, inf and NaN).
inline float f16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // Subnormal: value = man * 2^-24, exactly representable in float32.
    float v = float(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

// binary32 -> binary16 with round-to-nearest-even; overflow goes to inf, NaN stays NaN.
inline uint16_t float_to_f16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0));
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520 -> inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero) in binary16: round abs / 2^-24 to an integer, ties to even.
    float v = bits_to_float(abs) * 16777216.0f;  // exact scaling by 2^24
    uint32_t r = uint32_t(v);
    float frac = v - float(r);
    if (frac > 0.5f || (frac == 0.5f && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t mant = abs + 0xfffu + ((abs >> 13) & 1u);  // round to nearest even at bit 13
  return uint16_t(sign | ((mant - 0x38000000u) >> 13));
}

inline float bf16_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// Num<T>: the accumulation type of storage type T and the conversions in and out of it.
template <typename T>
struct Num {
  using acc = T;  // float and double accumulate in themselves
  static acc load(T v) { return v; }
  static T store(acc v) { return v; }
};
template <>
struct Num<f16_t> {
  using acc = float;
  static float load(f16_t v) { return f16_to_float(v.bits); }
  static f16_t store(float v) { return {float_to_f16(v)}; }
};
template <>
struct Num<bf16_t> {
  using acc = float;
  static float load(bf16_t v) { return bf16_to_float(v.bits); }
  static bf16_t store(float v) { return {float_to_bf16(v)}; }
};

template <typename F>
ffi::Error dispatch_float(ffi::DataType t, F&& fn) {
  return dispatch_float_as<f16_t, bf16_t>(t, std::forward<F>(fn));
}

// ---------------------------------------------------------------------------------------------
// parallel_for over XLA's intra-op thread pool.
//
// Work items are claimed from a shared atomic counter by the calling thread and by helper tasks
// scheduled on the pool. The caller never waits for a task that has not started: it waits only
// for items already claimed. A helper that starts late finds nothing left and returns at once,
// touching only the shared state it co-owns. So the loop cannot deadlock even when every pool
// thread is busy (for instance running this very handler).
class ParallelRunner {
 public:
  explicit ParallelRunner(ffi::ThreadPool* pool) : pool_(pool) {}

  int64_t num_threads() const { return pool_ ? std::max<int64_t>(pool_->num_threads(), 1) : 1; }

  // Calls fn(i) once for every i in [0, n). fn must not throw.
  template <typename Fn>
  void run(int64_t n, const Fn& fn) const {
    if (n <= 0) return;
    int64_t helpers = std::min<int64_t>(num_threads() - 1, n - 1);
    if (pool_ == nullptr || helpers <= 0) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    struct State {
      std::atomic<int64_t> next{0}, done{0};
      int64_t n = 0;
      std::mutex mu;
      std::condition_variable cv;
    };
    auto st = std::make_shared<State>();
    st->n = n;
    const Fn* fp = &fn;
    auto work = [st, fp]() {
      for (;;) {
        int64_t i = st->next.fetch_add(1, std::memory_order_relaxed);
        if (i >= st->n) return;
        (*fp)(i);
        if (st->done.fetch_add(1, std::memory_order_acq_rel) + 1 == st->n) {
          std::lock_guard<std::mutex> lock(st->mu);
          st->cv.notify_all();
        }
      }
    };
    for (int64_t t = 0; t < helpers; ++t) pool_->Schedule(decltype(work)(work));
    work();
    std::unique_lock<std::mutex> lock(st->mu);
    st->cv.wait(lock, [&] { return st->done.load(std::memory_order_acquire) == st->n; });
  }

 private:
  ffi::ThreadPool* pool_;
};

}  // namespace jaxconv
