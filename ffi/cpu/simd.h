// 32-byte vectors for the CPU kernel files that are compiled once per capability (kernel_table.h):
// GCC vector extensions, so one source gives two SSE registers per vector in the baseline objects
// and one AVX register in the AVX2 and AVX-512 objects (the latter with 32 registers to hold them).
// Arithmetic on them is element-wise; a scalar operand is broadcast. V512<S> is the 64-byte
// vector, one zmm register in the AVX-512 objects, for the kernels that use it explicitly (the
// GEMM micro-kernel); in the other objects it compiles to two or four registers.
//
// Writing the hot loops on these types, instead of scalar loops left to the auto-vectorizer, fixes
// the code GCC emits: the auto-vectorizer split a 32-float channel block into 8+4+8+8+4 lanes in
// one build of depthwise_kernels.cc (the same source gave 4 x 8 in another), costing ~30%.
//
// Everything here is defined inside the capability's namespace: a vector passed by value has a
// different ABI in the baseline and AVX2 objects, so no copy may be shared between them.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_common.h"

// The vectors never cross a call boundary (everything here is always inlined); the ABI note GCC
// emits for 32-byte arguments does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace jaxconv::JAXCONV_CPU_CAPABILITY {

template <typename S>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
};

template <typename S>
using V = typename Vec<S>::type;
template <typename S>
constexpr int kLanes = 32 / sizeof(S);

template <typename S>
struct Vec512;
template <>
struct Vec512<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec512<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename S>
using V512 = typename Vec512<S>::type;
template <typename S>
constexpr int kLanes512 = 64 / sizeof(S);

// True in the objects compiled for AVX-512 (the masked loads and stores below exist there only).
#if defined(__AVX512F__)
inline constexpr bool kHasAvx512 = true;
#else
inline constexpr bool kHasAvx512 = false;
#endif

// kLanes<S> contiguous elements of type S.
template <typename S>
__attribute__((always_inline)) inline V<S> load(const S* p) {
  V<S> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename S>
__attribute__((always_inline)) inline void store(S* p, V<S> v) {
  std::memcpy(p, &v, sizeof(v));
}

// bfloat16 <-> float32 on 8-lane vectors, as cpu_common.h's scalar bf16_to_float and
// float_to_bf16 (widening: the 16 bits become the top half; narrowing: round to nearest even,
// NaN kept quiet), in integer vector operations that every capability vectorizes: the scalar
// loops they replace were not (one value per iteration through the stack).
typedef uint32_t VU32 __attribute__((vector_size(32)));
typedef uint16_t VU16 __attribute__((vector_size(16)));
__attribute__((always_inline)) inline V<float> widen_bf16(VU16 h) {
  const VU32 u = __builtin_convertvector(h, VU32) << 16;
  V<float> v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}
// The bf16 bits of each lane in the low 16 bits of a 32-bit lane.
__attribute__((always_inline)) inline VU32 bf16_bits(V<float> v) {
  VU32 u;
  std::memcpy(&u, &v, sizeof(u));
  const VU32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded;
}
__attribute__((always_inline)) inline VU16 narrow_bf16(V<float> v) {
  return __builtin_convertvector(bf16_bits(v), VU16);
}

// kLanes<Acc> contiguous elements of storage type T, widened to Acc (Num<T>::acc); the narrowing
// store rounds like Num<T>::store.
template <typename T, typename Acc = typename Num<T>::acc>
__attribute__((always_inline)) inline V<Acc> load_widen(const T* p) {
  if constexpr (std::is_same_v<T, Acc>) {
    return load(p);
  } else if constexpr (std::is_same_v<T, bf16_t> && std::is_same_v<Acc, float>) {
    VU16 h;
    std::memcpy(&h, p, sizeof(h));
    return widen_bf16(h);
  } else {
    Acc tmp[kLanes<Acc>];
    for (int l = 0; l < kLanes<Acc>; ++l) tmp[l] = Num<T>::load(p[l]);
    return load(tmp);
  }
}
template <typename T, typename Acc = typename Num<T>::acc>
__attribute__((always_inline)) inline void store_narrow(T* p, V<Acc> v) {
  if constexpr (std::is_same_v<T, Acc>) {
    store(p, v);
  } else if constexpr (std::is_same_v<T, bf16_t> && std::is_same_v<Acc, float>) {
    const VU16 h = narrow_bf16(v);
    std::memcpy(p, &h, sizeof(h));
  } else {
    Acc tmp[kLanes<Acc>];
    store(tmp, v);
    for (int l = 0; l < kLanes<Acc>; ++l) p[l] = Num<T>::store(tmp[l]);
  }
}

// `lanes` (<= kLanes<float>) elements a `stride` apart, widened to float; zero past `lanes`.
template <typename T>
__attribute__((always_inline)) inline V<float> load_lanes(const T* p, int64_t stride, int lanes) {
  if (stride == 1 && lanes == kLanes<float>) return load_widen<T, float>(p);
  if constexpr (std::is_same_v<T, bf16_t>) {
    // Gather the raw bits, widen as one vector (the scalar conversion per lane was the larger
    // part of NCHW's gathers).
    VU16 h{};
    for (int l = 0; l < lanes; ++l) h[l] = p[l * stride].bits;
    return widen_bf16(h);
  }
  float tmp[kLanes<float>] = {};
  for (int l = 0; l < lanes; ++l) tmp[l] = Num<T>::load(p[l * stride]);
  return load(tmp);
}
template <typename T>
__attribute__((always_inline)) inline void store_lanes(T* p, int64_t stride, int lanes,
                                                       V<float> v) {
  if (stride == 1 && lanes == kLanes<float>) return store_narrow<T, float>(p, v);
  if constexpr (std::is_same_v<T, bf16_t>) {
    const VU16 h = narrow_bf16(v);  // round as one vector, scatter the bits
    for (int l = 0; l < lanes; ++l) p[l * stride].bits = h[l];
    return;
  }
  float tmp[kLanes<float>];
  store(tmp, v);
  for (int l = 0; l < lanes; ++l) p[l * stride] = Num<T>::store(tmp[l]);
}

}  // namespace jaxconv::JAXCONV_CPU_CAPABILITY
