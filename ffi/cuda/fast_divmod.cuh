// Division by a run-time constant without a divide instruction, for the index math of the
// memory-bound kernels (pooling, depthwise).
//
// A GPU has no integer divider: `/` and `%` on int64 expand to a ~70-instruction subroutine
// call (the reason the old max_pool_bwd spilled for half types), on int32 to ~20 instructions.
// FastDivmod replaces n / d, for a divisor d fixed at launch, by one multiply-high and a shift
// (Granlund & Montgomery; the same construction as CUTLASS's FastDivmod):
//
//   l = ceil(log2 d), p = 31 + l, m = ceil(2^p / d)  (fits in 32 bits for d that is not a power
//   of two below 2^l, and is 2^31 for a power of two), q = (n * m) >> p = umulhi(n, m) >> (p - 32)
//
// exact for every 0 <= n < 2^31: with m*d = 2^p + e, 0 <= e < d, n*m/2^p = n/d + n*e/(d*2^p)
// and n*e < 2^31 * 2^l = 2^p, so the error term stays below 1/d and cannot carry the floor past
// the next integer. d == 1 is special-cased (m would be 2^32). tests/test_cuda_dw_pool.py
// checks it against `/` over random and boundary numerators.
//
// Divider<I> gives the kernels one interface for both index widths: Divider<int32_t> uses
// FastDivmod (numerators in [0, 2^31)), Divider<int64_t> FastDivmod64 (numerators in
// [0, 2^62)) on the path for tensors of 2^30 elements or more.
#pragma once

#include <cstdint>

#include "../geometry.h"

namespace jaxconv::cuda {

JAXCONV_HD uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * b) >> 32);
#endif
}

struct FastDivmod {
  uint32_t divisor = 1, multiplier = 0, shift = 0;

  FastDivmod() = default;
  // d in [1, 2^31).
  explicit FastDivmod(uint32_t d) : divisor(d) {
    if (d == 1) return;
    uint32_t l = 0;
    while ((uint64_t(1) << l) < d) ++l;  // ceil(log2 d)
    const uint32_t p = 31 + l;
    multiplier = uint32_t(((uint64_t(1) << p) + d - 1) / d);
    shift = p - 32;  // l >= 1 here, so p >= 32
  }
  JAXCONV_HD uint32_t div(uint32_t n) const {
    return divisor == 1 ? n : (mul_hi_u32(n, multiplier) >> shift);
  }
  JAXCONV_HD void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = div(n);
    r = n - q * divisor;
  }
};

// The same for 64-bit numerators in [0, 2^62) and divisors in [1, 2^31): a power of two is a
// shift; otherwise l = ceil(log2 d), p = 62 + l, m = ceil(2^p / d) < 2^63 and
// q = umulhi64(n, m) >> (p - 64) (l >= 2 here), exact by the argument above with 2^62 for 2^31.
// Used by the path for tensors of 2^31 elements or more, where int64 `/` would be a subroutine
// call whose saved registers spill.
JAXCONV_HD uint64_t mul_hi_u64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return uint64_t((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

struct FastDivmod64 {
  uint64_t divisor = 1, multiplier = 0;
  uint32_t shift = 0;  // right shift of a power-of-two divisor (multiplier 0), else p - 64

  FastDivmod64() = default;
  explicit FastDivmod64(uint64_t d) : divisor(d) {
    uint32_t l = 0;
    while ((uint64_t(1) << l) < d) ++l;  // ceil(log2 d)
    if ((uint64_t(1) << l) == d) {
      shift = l;
      return;
    }
    const uint32_t p = 62 + l;
    const unsigned __int128 two_p = static_cast<unsigned __int128>(1) << p;
    multiplier = uint64_t((two_p + d - 1) / d);
    shift = p - 64;
  }
  JAXCONV_HD uint64_t div(uint64_t n) const {
    return multiplier == 0 ? (n >> shift) : (mul_hi_u64(n, multiplier) >> shift);
  }
};

template <typename I>
struct Divider;

template <>
struct Divider<int32_t> {
  FastDivmod f;
  Divider() = default;
  explicit Divider(int64_t d) : f(uint32_t(d)) {}
  JAXCONV_HD int32_t div(int32_t n) const { return int32_t(f.div(uint32_t(n))); }
  JAXCONV_HD int32_t mod(int32_t n) const { return n - div(n) * int32_t(f.divisor); }
  JAXCONV_HD int32_t divmod(int32_t n, int32_t& r) const {
    const int32_t q = div(n);
    r = n - q * int32_t(f.divisor);
    return q;
  }
};

template <>
struct Divider<int64_t> {
  FastDivmod64 f;
  Divider() = default;
  explicit Divider(int64_t d) : f(uint64_t(d)) {}
  JAXCONV_HD int64_t div(int64_t n) const { return int64_t(f.div(uint64_t(n))); }
  JAXCONV_HD int64_t mod(int64_t n) const { return n - div(n) * int64_t(f.divisor); }
  JAXCONV_HD int64_t divmod(int64_t n, int64_t& r) const {
    const int64_t q = div(n);
    r = n - q * int64_t(f.divisor);
    return q;
  }
};

// geometry.h's window_taps and covering_outputs in index type I with the divisions by stride
// and dilation done by Dividers. The callers guarantee (fits_index_width below) that every
// intermediate stays within [-2^31, 2^31), and each division gets a non-negative numerator.
//
// Taps t in [lo, hi) of output o read 0 <= o*s - pad + t*d < in:
//   lo = i0 >= 0 ? 0 : ceil(-i0 / d), hi = in - 1 - i0 < 0 ? 0 : floor((in - 1 - i0) / d) + 1.
template <typename I>
struct TapSpan {
  I lo, hi;
};
template <typename I>
JAXCONV_HD TapSpan<I> window_taps_div(I o, I stride, I pad_lo, const Divider<I>& dilation, I dil,
                                      I k, I in) {
  const I i0 = o * stride - pad_lo;
  I lo = i0 >= 0 ? I(0) : dilation.div(-i0 + dil - 1);
  I hi = in - 1 - i0 < 0 ? I(0) : dilation.div(in - 1 - i0) + 1;
  if (lo > k) lo = k;
  if (hi > k) hi = k;
  if (hi < lo) hi = lo;
  return {lo, hi};
}
// Outputs o in [lo, hi) whose window spans input i: ceil((i + pad - (k-1)*d) / s) <= o <=
// floor((i + pad) / s), clipped to [0, out).
template <typename I>
JAXCONV_HD TapSpan<I> covering_outputs_div(I i, const Divider<I>& stride, I s, I pad_lo, I dil, I k,
                                           I out) {
  const I first = i + pad_lo - (k - 1) * dil;
  I lo = first <= 0 ? I(0) : stride.div(first + s - 1);
  I hi = stride.div(i + pad_lo) + 1;
  if (hi > out) hi = out;
  if (hi < lo) hi = lo;
  return {lo, hi};
}

// True when the 32-bit index path is safe for an axis with these sizes (all int64, host side):
// every position, padded extent and window reach below 2^30, leaving headroom for the sums the
// helpers above form.
inline bool axis_fits_int32(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t dilation,
                            int64_t pad_lo, int64_t pad_hi) {
  const int64_t limit = int64_t(1) << 30;
  return in + pad_lo + pad_hi < limit && k * dilation < limit && out * stride < limit &&
         stride < limit && dilation < limit;
}

}  // namespace jaxconv::cuda
