// Decoding of FFI attributes and buffers into jaxconv geometry, shared by the CPU and CUDA
// handlers. Every handler starts here: it reads its integer attributes by name (one table per
// params struct), checks the buffers' ranks and dtypes, rebuilds the geometry with geometry.h
// and compares every buffer shape against it. Any mismatch becomes an ffi::Error (a Python
// exception), never a crash.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "geometry.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jaxconv {

namespace ffi = xla::ffi;

inline ffi::Error invalid(const std::string& target, const std::string& msg) {
  return ffi::Error::InvalidArgument(target + ": " + msg);
}

#define JAXCONV_RETURN_IF_ERROR(expr)                \
  do {                                               \
    ffi::Error jaxconv_err_ = (expr);                \
    if (jaxconv_err_.failure()) return jaxconv_err_; \
  } while (0)

// One int64 attribute of a params struct: its FFI name and the member it fills. A table of these
// per struct is the whole decoder, so adding an attribute is one line. An optional attribute
// that is absent keeps `fallback`.
//
// (XLA FFI can decode attributes straight into a struct, XLA_FFI_REGISTER_STRUCT_ATTR_DECODING,
// but that decoder wants exactly the struct's attributes, no optional ones, and reports
// failures without naming the target; a table keeps jaxconv's "target: attribute" messages.)
template <typename Params>
struct IntAttr {
  // Through an alias: nvcc's front end rewrites `int64_t Params::* member` as
  // `int64_t (Params::* member)`, for which the host compiler warns (-Wparentheses).
  using Member = int64_t Params::*;
  const char* name;
  Member member;
  bool required = true;
  int64_t fallback = 0;
};

template <typename Params, size_t N>
ffi::Error read_int_attrs(const ffi::Dictionary& attrs, const IntAttr<Params> (&table)[N],
                          Params* p, const char* target) {
  for (const IntAttr<Params>& a : table) {
    auto v = attrs.get<int64_t>(a.name);
    if (v.has_value()) {
      p->*a.member = *v;
    } else if (!a.required && !attrs.contains(a.name)) {
      p->*a.member = a.fallback;
    } else {
      return invalid(target, std::string("missing int64 attribute '") + a.name +
                                 "' (absent or of another type)");
    }
  }
  return ffi::Error::Success();
}

// The conv targets' attributes (every conv target gets all of them). allow_tf32 (1: float32
// operands may be multiplied on TF32 tensor cores) is read by the CUDA kernels only; the CPU
// always computes in full float32. It is optional so that a caller that predates it gets full
// float32.
inline constexpr IntAttr<ConvParams> kConvAttrs[] = {
    {"stride_h", &ConvParams::stride_h},
    {"stride_w", &ConvParams::stride_w},
    {"dilation_h", &ConvParams::dilation_h},
    {"dilation_w", &ConvParams::dilation_w},
    {"pad_top", &ConvParams::pad_top},
    {"pad_bottom", &ConvParams::pad_bottom},
    {"pad_left", &ConvParams::pad_left},
    {"pad_right", &ConvParams::pad_right},
    {"groups", &ConvParams::groups},
    {"layout", &ConvParams::layout},
    {"allow_tf32", &ConvParams::allow_tf32, false, 0},
};

inline constexpr IntAttr<PoolParams> kPoolAttrs[] = {
    {"kernel_h", &PoolParams::kernel_h},     {"kernel_w", &PoolParams::kernel_w},
    {"stride_h", &PoolParams::stride_h},     {"stride_w", &PoolParams::stride_w},
    {"dilation_h", &PoolParams::dilation_h}, {"dilation_w", &PoolParams::dilation_w},
    {"pad_top", &PoolParams::pad_top},       {"pad_bottom", &PoolParams::pad_bottom},
    {"pad_left", &PoolParams::pad_left},     {"pad_right", &PoolParams::pad_right},
    {"ceil_mode", &PoolParams::ceil_mode},   {"layout", &PoolParams::layout},
};

inline ffi::Error read_conv_params(const ffi::Dictionary& a, ConvParams* p, const char* target) {
  JAXCONV_RETURN_IF_ERROR(read_int_attrs(a, kConvAttrs, p, target));
  if (const char* err = check_conv_params(*p)) return invalid(target, err);
  return ffi::Error::Success();
}

inline ffi::Error read_pool_params(const ffi::Dictionary& a, PoolParams* p, const char* target) {
  return read_int_attrs(a, kPoolAttrs, p, target);
}

inline bool is_float_type(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::F64 || t == ffi::DataType::F16 ||
         t == ffi::DataType::BF16;
}

// Logical dims of a rank-4 buffer; fails for any other rank.
inline ffi::Error rank4(const ffi::AnyBuffer& b, const char* what, const char* target,
                        const int64_t** dims) {
  auto d = b.dimensions();
  if (d.size() != 4)
    return invalid(target,
                   std::string(what) + " must have rank 4, got rank " + std::to_string(d.size()));
  *dims = d.begin();
  return ffi::Error::Success();
}

inline std::string dims_str(Dims4 d) {
  return "(" + std::to_string(d.n) + ", " + std::to_string(d.c) + ", " + std::to_string(d.h) +
         ", " + std::to_string(d.w) + ")";
}

// Float buffers of one call must share one supported dtype.
inline ffi::Error same_float_type(const char* target, ffi::DataType t,
                                  std::initializer_list<ffi::DataType> others) {
  if (!is_float_type(t))
    return invalid(target, "dtype must be float32, float64, float16 or bfloat16");
  for (auto o : others)
    if (o != t) return invalid(target, "all floating-point operands must share one dtype");
  return ffi::Error::Success();
}

// Bias is either empty (no bias) or a vector with one entry per channel of the result, in the
// dtype of the other operands.
inline ffi::Error check_bias(const ffi::AnyBuffer& bias, int64_t channels, ffi::DataType dtype,
                             const char* target) {
  auto d = bias.dimensions();
  if (d.size() != 1 || (d[0] != 0 && d[0] != channels))
    return invalid(target, "bias must be a vector of length 0 or " + std::to_string(channels));
  return same_float_type(target, dtype, {bias.element_type()});
}

template <typename T>
const T* bias_or_null(const ffi::AnyBuffer& bias) {
  return bias.element_count() ? static_cast<const T*>(bias.untyped_data()) : nullptr;
}

// The three conv targets describe the same convolution x (*) w = y from different ends; each
// rebuilds the geometry from the buffers it has and checks the third shape against it.
//   fwd:        x, w given; y checked.
//   bwd_data:   dx (result, plays x), w given; dy (plays y) checked.
//   bwd_filter: x, dw (result, plays w) given; dy checked.
inline ffi::Error conv_geometry(const ConvParams& p, const ffi::AnyBuffer& x,
                                const ffi::AnyBuffer& w, const ffi::AnyBuffer& y,
                                const char* target, ConvGeometry* g) {
  const int64_t *xd, *wd, *yd;
  JAXCONV_RETURN_IF_ERROR(rank4(x, "input", target, &xd));
  JAXCONV_RETURN_IF_ERROR(rank4(w, "weights", target, &wd));
  JAXCONV_RETURN_IF_ERROR(rank4(y, "output", target, &yd));
  JAXCONV_RETURN_IF_ERROR(
      same_float_type(target, x.element_type(), {w.element_type(), y.element_type()}));
  Dims4 xs = activation_dims(p.layout, xd), ws = weight_dims(p.layout, wd);
  if (const char* err = make_conv_geometry(p, xs, ws, g)) {
    return invalid(
        target, std::string(err) + " (input " + dims_str(xs) + ", weights " + dims_str(ws) + ")");
  }
  Dims4 expect{g->N, g->O, g->OH, g->OW}, got = activation_dims(p.layout, yd);
  if (!same_dims(expect, got))
    return invalid(target, "output shape " + dims_str(got) + " does not match the geometry " +
                               dims_str(expect));
  return ffi::Error::Success();
}

// What every conv handler checks before it computes (CPU and CUDA alike): its attributes, then
// its three buffers against the geometry they describe.
inline ffi::Error decode_conv_call(const ffi::Dictionary& attrs, const ffi::AnyBuffer& x,
                                   const ffi::AnyBuffer& w, const ffi::AnyBuffer& y,
                                   const char* target, ConvGeometry* g) {
  ConvParams p;
  JAXCONV_RETURN_IF_ERROR(read_conv_params(attrs, &p, target));
  return conv_geometry(p, x, w, y, target, g);
}

// The conv handlers that take a bias (forward, bwd_data): the call as above, then the bias, one
// value per channel of the result they write (O for forward's y, C for bwd_data's dx) or none.
enum class ConvBias { kForward, kBwdData };
inline ffi::Error decode_conv_call(const ffi::Dictionary& attrs, const ffi::AnyBuffer& x,
                                   const ffi::AnyBuffer& w, const ffi::AnyBuffer& y,
                                   const ffi::AnyBuffer& bias, ConvBias which, const char* target,
                                   ConvGeometry* g) {
  JAXCONV_RETURN_IF_ERROR(decode_conv_call(attrs, x, w, y, target, g));
  return which == ConvBias::kForward ? check_bias(bias, g->O, x.element_type(), target)
                                     : check_bias(bias, g->C, y.element_type(), target);
}

// The pool geometry from x and the attributes; y (and, when idx is not null, the int32
// indices) checked against it.
inline ffi::Error pool_geometry(const PoolParams& p, const ffi::AnyBuffer& x,
                                const ffi::AnyBuffer& y, const ffi::AnyBuffer* idx,
                                const char* target, PoolGeometry* g) {
  const int64_t *xd, *yd, *id = nullptr;
  JAXCONV_RETURN_IF_ERROR(rank4(x, "input", target, &xd));
  JAXCONV_RETURN_IF_ERROR(rank4(y, "output", target, &yd));
  if (idx) JAXCONV_RETURN_IF_ERROR(rank4(*idx, "indices", target, &id));
  JAXCONV_RETURN_IF_ERROR(same_float_type(target, x.element_type(), {y.element_type()}));
  if (idx && idx->element_type() != ffi::DataType::S32)
    return invalid(target, "indices must be int32");
  Dims4 xs = activation_dims(p.layout, xd);
  if (const char* err = make_pool_geometry(p, xs, g))
    return invalid(target, std::string(err) + " (input " + dims_str(xs) + ")");
  Dims4 expect{g->N, g->C, g->OH, g->OW};
  Dims4 ys = activation_dims(p.layout, yd);
  if (!idx) {
    if (!same_dims(expect, ys))
      return invalid(target, "output shape " + dims_str(ys) + " does not match the geometry " +
                                 dims_str(expect));
    return ffi::Error::Success();
  }
  if (!same_dims(expect, ys) || !same_dims(expect, activation_dims(p.layout, id)))
    return invalid(target, "output/indices shapes do not match the geometry " + dims_str(expect));
  return ffi::Error::Success();
}

// The same for the pool handlers: fwd passes (x, y, indices), bwd (dx, dy, indices).
inline ffi::Error decode_pool_call(const ffi::Dictionary& attrs, const ffi::AnyBuffer& x,
                                   const ffi::AnyBuffer& y, const ffi::AnyBuffer& idx,
                                   const char* target, PoolGeometry* g) {
  PoolParams p;
  JAXCONV_RETURN_IF_ERROR(read_pool_params(attrs, &p, target));
  return pool_geometry(p, x, y, &idx, target, g);
}

// The values-only forward: (x, y), no indices.
inline ffi::Error decode_pool_call(const ffi::Dictionary& attrs, const ffi::AnyBuffer& x,
                                   const ffi::AnyBuffer& y, const char* target, PoolGeometry* g) {
  PoolParams p;
  JAXCONV_RETURN_IF_ERROR(read_pool_params(attrs, &p, target));
  return pool_geometry(p, x, y, nullptr, target, g);
}

// Calls fn(TypeTag<T>{}) with T the storage type of a float dtype (checked by the caller); each
// platform names its own 16-bit types (CPU: bit wrappers, CUDA: __half / __nv_bfloat16).
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename Half, typename BFloat16, typename F>
ffi::Error dispatch_float_as(ffi::DataType t, F&& fn) {
  switch (t) {
    case ffi::DataType::F32: return fn(TypeTag<float>{});
    case ffi::DataType::F64: return fn(TypeTag<double>{});
    case ffi::DataType::F16: return fn(TypeTag<Half>{});
    case ffi::DataType::BF16: return fn(TypeTag<BFloat16>{});
    default: return ffi::Error::InvalidArgument("unsupported dtype");
  }
}

}  // namespace jaxconv
