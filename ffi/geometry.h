// Shape arithmetic and validation for jaxconv, shared by the CPU and CUDA kernels.
//
// This header is the single source of truth for output sizes, window bounds and the index
// decompositions the kernels use. Everything here is plain integer math on int64_t, usable from
// host code and (through JAXCONV_HD) from CUDA device code. It does not include any XLA header so
// that CPU tests and device code can use it freely.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define JAXCONV_HD __host__ __device__ __forceinline__
#else
#define JAXCONV_HD inline
#endif

namespace jaxconv {

// Tensor layouts. The numeric values are the `layout` attribute Python passes to every target.
//   kNCHW: activations (N, C, H, W); conv weights OIHW (O, I, KH, KW).
//   kNHWC: activations (N, H, W, C); conv weights HWIO (KH, KW, I, O).
enum Layout : int64_t { kNCHW = 0, kNHWC = 1 };

JAXCONV_HD bool valid_layout(int64_t layout) { return layout == kNCHW || layout == kNHWC; }

// Floor division that is correct for negative numerators (C++ truncates towards zero).
JAXCONV_HD int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

JAXCONV_HD int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// Extent of a dilated kernel: the span from the first to the last tap, inclusive.
JAXCONV_HD int64_t effective_kernel(int64_t k, int64_t dilation) { return dilation * (k - 1) + 1; }

// Output length of a convolution along one axis:
//   out = floor((in + pad_lo + pad_hi - dilation*(k-1) - 1) / stride) + 1.
// A result <= 0 means "no valid output"; callers treat it as an error.
JAXCONV_HD int64_t conv_out_size(int64_t in, int64_t k, int64_t stride, int64_t dilation,
                                 int64_t pad_lo, int64_t pad_hi) {
  return floor_div(in + pad_lo + pad_hi - effective_kernel(k, dilation), stride) + 1;
}

// Output length of a max pool along one axis, PyTorch's rule. With ceil_mode the division rounds
// up, but a last window that would start inside the right/bottom padding is dropped:
//   if (out - 1) * stride >= in + pad_lo then out -= 1.
JAXCONV_HD int64_t pool_out_size(int64_t in, int64_t k, int64_t stride, int64_t dilation,
                                 int64_t pad_lo, int64_t pad_hi, bool ceil_mode) {
  int64_t span = in + pad_lo + pad_hi - effective_kernel(k, dilation);
  int64_t out = (ceil_mode ? ceil_div(span, stride) : floor_div(span, stride)) + 1;
  if (ceil_mode && out > 0 && (out - 1) * stride >= in + pad_lo) out -= 1;
  return out;
}

// Taps of a window that land inside the input. Output position `o` starts at input coordinate
// i0 = o*stride - pad_lo; tap t reads i0 + t*dilation. Returns [t_lo, t_hi) such that
// 0 <= i0 + t*dilation < in exactly for t in that range (an empty range has t_lo >= t_hi).
struct TapRange {
  int64_t lo, hi;
};
JAXCONV_HD TapRange window_taps(int64_t o, int64_t stride, int64_t pad_lo, int64_t dilation,
                                int64_t k, int64_t in) {
  int64_t i0 = o * stride - pad_lo;
  int64_t lo = i0 >= 0 ? 0 : ceil_div(-i0, dilation);
  int64_t hi = floor_div(in - 1 - i0, dilation) + 1;
  if (lo > k) lo = k;
  if (hi > k) hi = k;
  if (hi < lo) hi = lo;
  return {lo, hi};
}

// Element strides of a 4-d activation tensor addressed as (n, c, h, w), whatever its layout.
struct Strides4 {
  int64_t n, c, h, w;
};

JAXCONV_HD Strides4 activation_strides(int64_t layout, int64_t C, int64_t H, int64_t W) {
  if (layout == kNHWC) return {H * W * C, 1, W * C, C};
  return {C * H * W, H * W, W, 1};
}

// Element strides of conv weights addressed as (o, i, kh, kw): OIHW or HWIO.
JAXCONV_HD Strides4 weight_strides(int64_t layout, int64_t O, int64_t I, int64_t KH, int64_t KW) {
  if (layout == kNHWC) return {1, O, KW * I * O, I * O};
  return {I * KH * KW, KH * KW, KW, 1};
}

// The integer attributes every conv target receives (names match the FFI attributes; the
// decoding table is kConvAttrs in ffi_common.h). allow_tf32 is 1 when float32 operands may be
// multiplied on TF32 tensor cores (CUDA only; the CPU always computes in full float32).
struct ConvParams {
  int64_t stride_h, stride_w, dilation_h, dilation_w;
  int64_t pad_top, pad_bottom, pad_left, pad_right;
  int64_t groups, layout;
  int64_t allow_tf32;
};

// Full geometry of one convolution y = conv(x, w): every size the kernels index with.
//   x: (N, C, H, W) logically; w: (O, C/groups, KH, KW) logically; y: (N, O, OH, OW) logically.
// Pads may be negative internally (a transposed conv with output_padding crops the bottom/right);
// Python rejects negative user padding before it gets here.
struct ConvGeometry {
  int64_t N, C, H, W;  // input
  int64_t O, KH, KW;   // weights (input channels per group = C / groups)
  int64_t OH, OW;      // output
  ConvParams p;

  JAXCONV_HD int64_t groups() const { return p.groups; }
  JAXCONV_HD int64_t in_per_group() const { return C / p.groups; }
  JAXCONV_HD int64_t out_per_group() const { return O / p.groups; }
  // Implicit-GEMM reduction length for forward and bwd_filter: k runs over (ci, kh, kw) within
  // a group (the kernels order it to follow the layout's memory order).
  JAXCONV_HD int64_t gemm_k() const { return in_per_group() * KH * KW; }
  JAXCONV_HD Strides4 x_strides() const { return activation_strides(p.layout, C, H, W); }
  JAXCONV_HD Strides4 y_strides() const { return activation_strides(p.layout, O, OH, OW); }
  JAXCONV_HD Strides4 w_strides() const {
    return weight_strides(p.layout, O, in_per_group(), KH, KW);
  }
};

// Logical (N, C, H, W) of an activation buffer's dims in the given layout.
struct Dims4 {
  int64_t n, c, h, w;
};
JAXCONV_HD Dims4 activation_dims(int64_t layout, const int64_t* d) {
  if (layout == kNHWC) return {d[0], d[3], d[1], d[2]};
  return {d[0], d[1], d[2], d[3]};
}
// Logical (O, I, KH, KW) of a weight buffer's dims.
JAXCONV_HD Dims4 weight_dims(int64_t layout, const int64_t* d) {
  if (layout == kNHWC) return {d[3], d[2], d[0], d[1]};
  return {d[0], d[1], d[2], d[3]};
}

// Validation returns nullptr when consistent, otherwise a static message naming the problem.
// Handlers turn the message into an ffi::Error, so a bad call fails cleanly instead of reading
// out of bounds.

// Bound on the magnitude of every integer attribute (Python's _args.INT32_MAX). With attributes
// below 2^31 and buffer dims below 2^32, every sum and product the shape math forms (for example
// in + pad_lo + pad_hi - dilation * (k - 1)) stays far inside int64, so no raw call can make it
// overflow into a "consistent" geometry.
constexpr int64_t kMaxAttr = (int64_t(1) << 31) - 1;
JAXCONV_HD bool attr_in_range(int64_t v) { return v >= -kMaxAttr && v <= kMaxAttr; }

JAXCONV_HD const char* check_conv_params(const ConvParams& p) {
  if (!valid_layout(p.layout)) return "layout must be 0 (NCHW) or 1 (NHWC)";
  if (!attr_in_range(p.stride_h) || !attr_in_range(p.stride_w) || !attr_in_range(p.dilation_h) ||
      !attr_in_range(p.dilation_w) || !attr_in_range(p.pad_top) || !attr_in_range(p.pad_bottom) ||
      !attr_in_range(p.pad_left) || !attr_in_range(p.pad_right) || !attr_in_range(p.groups))
    return "integer attributes must fit in int32";
  if (p.stride_h < 1 || p.stride_w < 1) return "stride must be >= 1";
  if (p.dilation_h < 1 || p.dilation_w < 1) return "dilation must be >= 1";
  if (p.groups < 1) return "groups must be >= 1";
  if (p.allow_tf32 != 0 && p.allow_tf32 != 1) return "allow_tf32 must be 0 or 1";
  return nullptr;
}

// Builds the geometry from the logical dims of x (N, C, H, W) and w (O, I, KH, KW) and checks
// that everything agrees; the output size is computed here, never trusted from the caller.
JAXCONV_HD const char* make_conv_geometry(const ConvParams& p, Dims4 x, Dims4 w, ConvGeometry* g) {
  if (const char* err = check_conv_params(p)) return err;
  if (x.n < 0 || x.c < 1 || x.h < 1 || x.w < 1) return "input has an empty channel or spatial dim";
  if (w.n < 1 || w.c < 1 || w.h < 1 || w.w < 1) return "weights have an empty dimension";
  if (x.c % p.groups != 0) return "input channels are not divisible by groups";
  if (w.n % p.groups != 0) return "output channels are not divisible by groups";
  if (w.c * p.groups != x.c) return "weight input channels * groups != input channels";
  g->N = x.n;
  g->C = x.c;
  g->H = x.h;
  g->W = x.w;
  g->O = w.n;
  g->KH = w.h;
  g->KW = w.w;
  g->p = p;
  g->OH = conv_out_size(x.h, w.h, p.stride_h, p.dilation_h, p.pad_top, p.pad_bottom);
  g->OW = conv_out_size(x.w, w.w, p.stride_w, p.dilation_w, p.pad_left, p.pad_right);
  if (g->OH < 1 || g->OW < 1) return "output spatial size would be <= 0";
  return nullptr;
}

// Checks that an activation buffer's logical dims equal the expected ones.
JAXCONV_HD bool same_dims(Dims4 a, Dims4 b) {
  return a.n == b.n && a.c == b.c && a.h == b.h && a.w == b.w;
}

// Max pooling: attributes and geometry.
struct PoolParams {
  int64_t kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w;
  int64_t pad_top, pad_bottom, pad_left, pad_right;
  int64_t ceil_mode, layout;
};

struct PoolGeometry {
  int64_t N, C, H, W, OH, OW;
  PoolParams p;
  JAXCONV_HD Strides4 x_strides() const { return activation_strides(p.layout, C, H, W); }
  JAXCONV_HD Strides4 y_strides() const { return activation_strides(p.layout, C, OH, OW); }
};

JAXCONV_HD const char* make_pool_geometry(const PoolParams& p, Dims4 x, PoolGeometry* g) {
  if (!valid_layout(p.layout)) return "layout must be 0 (NCHW) or 1 (NHWC)";
  if (!attr_in_range(p.kernel_h) || !attr_in_range(p.kernel_w) || !attr_in_range(p.stride_h) ||
      !attr_in_range(p.stride_w) || !attr_in_range(p.dilation_h) || !attr_in_range(p.dilation_w) ||
      !attr_in_range(p.pad_top) || !attr_in_range(p.pad_bottom) || !attr_in_range(p.pad_left) ||
      !attr_in_range(p.pad_right))
    return "integer attributes must fit in int32";
  if (p.kernel_h < 1 || p.kernel_w < 1) return "kernel_size must be >= 1";
  if (p.stride_h < 1 || p.stride_w < 1) return "stride must be >= 1";
  if (p.dilation_h < 1 || p.dilation_w < 1) return "dilation must be >= 1";
  if (p.pad_top < 0 || p.pad_bottom < 0 || p.pad_left < 0 || p.pad_right < 0)
    return "padding must be >= 0";
  if (x.n < 0 || x.c < 0 || x.h < 1 || x.w < 1) return "input has an empty spatial dim";
  // Indices are int32 flat offsets h * W + w into the input plane.
  if (x.h > kMaxAttr || x.w > kMaxAttr || x.h * x.w > kMaxAttr)
    return "input plane has more than 2^31 - 1 cells (int32 indices)";
  g->N = x.n;
  g->C = x.c;
  g->H = x.h;
  g->W = x.w;
  g->p = p;
  g->OH = pool_out_size(x.h, p.kernel_h, p.stride_h, p.dilation_h, p.pad_top, p.pad_bottom,
                        p.ceil_mode != 0);
  g->OW = pool_out_size(x.w, p.kernel_w, p.stride_w, p.dilation_w, p.pad_left, p.pad_right,
                        p.ceil_mode != 0);
  if (g->OH < 1 || g->OW < 1) return "output spatial size would be <= 0";
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Index math shared by the CPU and CUDA kernels, kept here so CPU tests (tests/test_geometry.py)
// exercise it against brute force.

// Mixed-radix digits of a reduction index k = (a * r1 + b) * r2 + c with b < r1, c < r2.
// The implicit GEMMs walk their reduction in steps of a fixed size; keeping k as digits turns
// the two divisions per step into two compares:
//   conv k: NCHW (ci, kh, kw) with radices (KH, KW); NHWC (kh, kw, ci) with radices (KW, Cg)
//   bwd_filter positions p = (n, oh, ow) with radices (OH, OW).
struct Digits3 {
  int64_t a, b, c;
};
JAXCONV_HD Digits3 split_index(int64_t k, int64_t r1, int64_t r2) {
  return {k / (r1 * r2), (k / r2) % r1, k % r2};
}
// x + step for step = split_index(s, r1, r2) (each digit of step is below its radix, so each
// carry is at most one).
JAXCONV_HD Digits3 add_digits(Digits3 x, Digits3 step, int64_t r1, int64_t r2) {
  int64_t a = x.a + step.a, b = x.b + step.b, c = x.c + step.c;
  if (c >= r2) {
    c -= r2;
    ++b;
  }
  if (b >= r1) {
    b -= r1;
    ++a;
  }
  return {a, b, c};
}

JAXCONV_HD int64_t floor_mod(int64_t a, int64_t b) { return a - floor_div(a, b) * b; }

// Inverse of a modulo m (gcd(a, m) == 1, 0 <= a < m); 0 when m == 1. Extended Euclid.
JAXCONV_HD int64_t inverse_mod(int64_t a, int64_t m) {
  int64_t r0 = m, r1 = a, t0 = 0, t1 = 1;
  while (r1 != 0) {
    int64_t q = r0 / r1, r2 = r0 - q * r1, t2 = t0 - q * t1;
    r0 = r1;
    r1 = r2;
    t0 = t1;
    t1 = t2;
  }
  return floor_mod(t0, m);
}

// bwd_data split by stride phases (one axis). Input positions i = s*j + rho, 0 <= rho < s, form
// phase rho. Tap t reaches phase rho when (rho + pad_lo - t*dilation) is divisible by s, and then
// position i reads output o = j + (rho + pad_lo - t*dilation) / s (in range or not). Those taps
// are t = first + q*step for q in [0, count) with step = s / gcd(s, dilation): they solve
// t*d = rho + pad_lo (mod s). count is 0 when no tap in [0, k) reaches the phase.
struct PhaseTaps {
  int64_t first, step, count;
};
JAXCONV_HD PhaseTaps phase_taps(int64_t rho, int64_t stride, int64_t pad_lo, int64_t dilation,
                                int64_t k) {
  int64_t g = stride, b = dilation;  // g = gcd(stride, dilation)
  while (b != 0) {
    int64_t t = g % b;
    g = b;
    b = t;
  }
  int64_t step = stride / g, r = floor_mod(rho + pad_lo, stride);
  if (r % g != 0) return {0, step, 0};
  // t*(d/g) = r/g (mod step), and d/g is invertible modulo step. Both factors are < step <
  // 2^31, so the product fits.
  int64_t first = (r / g) % step * inverse_mod((dilation / g) % step, step) % step;
  int64_t count = first < k ? (k - 1 - first) / step + 1 : 0;
  return {first, step, count};
}

// One axis of bwd_data's stride phase rho, the one place both platforms take it from (the CPU
// pass of ffi/cpu/conv_pack.cc, the CUDA passes through conv2d_problem.cuh's transposed_axis).
// dx position i reads dy position o = (i + pad_lo - t*dilation) / s through tap t when the
// division is exact. Phase rho (0 <= rho < s) holds the dx positions i = rho + s*u, u >= 0; its
// taps are phase_taps(rho, ...) t = first + q*step, q < count, and tap slot q reads
//   o = u + in0 + q*in_q,   in0 = (rho + pad_lo - first*dilation) / s (exact),
//                           in_q = -step*dilation/s = -dilation/gcd(s, dilation),
// one stride-1 correlation of dy per phase with no tap that would multiply a zero.
struct BwdDataPhaseAxis {
  int64_t out0, out_step;      // dx positions out0 + out_step*u (rho, s)
  int64_t in0, in_q;           // dy position u + in0 + q*in_q for tap slot q (0, 0 when no taps)
  int64_t first, step, count;  // tap slot q multiplies kernel cell first + q*step, q < count
};
JAXCONV_HD BwdDataPhaseAxis bwd_data_phase_axis(int64_t rho, int64_t stride, int64_t pad_lo,
                                                int64_t dilation, int64_t k) {
  const PhaseTaps t = phase_taps(rho, stride, pad_lo, dilation, k);
  if (t.count == 0) return {rho, stride, 0, 0, t.first, t.step, 0};
  return {rho,
          stride,
          (rho + pad_lo - t.first * dilation) / stride,
          -(t.step * dilation) / stride,
          t.first,
          t.step,
          t.count};
}
// dx positions of phase rho in a dx axis of `size`: rho + s*u < size (0 when rho >= size).
JAXCONV_HD int64_t bwd_data_phase_rows(int64_t rho, int64_t stride, int64_t size) {
  return rho < size ? (size - 1 - rho) / stride + 1 : 0;
}
// Phases that hold any dx position, min(s, size): phase rho >= size is empty.
JAXCONV_HD int64_t bwd_data_phases(int64_t stride, int64_t size) {
  return stride < size ? stride : size;
}
// The most taps any phase has: ceil(k / step), step = s / gcd(s, d) (the same for every phase).
JAXCONV_HD int64_t bwd_data_tap_slots(int64_t stride, int64_t dilation, int64_t k) {
  const int64_t step = phase_taps(0, stride, 0, dilation, k).step;
  return (k + step - 1) / step;
}

// Max-pool backward as a gather: the outputs o whose window [o*s - pad_lo, o*s - pad_lo +
// (k-1)*d] spans input position i are o in [ceil((i + pad_lo - (k-1)*d) / s),
// floor((i + pad_lo) / s)], clipped to [0, out). A spanning window holds i (has a tap on it)
// only when (i + pad_lo - o*s) is a multiple of d: see window_holds.
struct OutputRange {
  int64_t lo, hi;  // [lo, hi), empty when hi <= lo
};
JAXCONV_HD OutputRange covering_outputs(int64_t i, int64_t stride, int64_t pad_lo, int64_t dilation,
                                        int64_t k, int64_t out) {
  int64_t lo = ceil_div(i + pad_lo - (k - 1) * dilation, stride);
  int64_t hi = floor_div(i + pad_lo, stride) + 1;
  if (lo < 0) lo = 0;
  if (hi > out) hi = out;
  if (hi < lo) hi = lo;
  return {lo, hi};
}
JAXCONV_HD bool window_holds(int64_t o, int64_t i, int64_t stride, int64_t pad_lo,
                             int64_t dilation) {
  return (i + pad_lo - o * stride) % dilation == 0;
}

// The outputs o whose tap t lands inside the input, 0 <= o*stride - pad_lo + t*dilation < in:
// o in [ceil((pad_lo - t*d) / s), floor((in - 1 + pad_lo - t*d) / s)], clipped to [0, out). The
// inverse of window_taps: o is in tap_outputs(t) exactly when t is in window_taps(o).
JAXCONV_HD OutputRange tap_outputs(int64_t t, int64_t stride, int64_t pad_lo, int64_t dilation,
                                   int64_t in, int64_t out) {
  int64_t lo = ceil_div(pad_lo - t * dilation, stride);
  int64_t hi = floor_div(in - 1 + pad_lo - t * dilation, stride) + 1;
  if (lo < 0) lo = 0;
  if (hi > out) hi = out;
  if (hi < lo) hi = lo;
  return {lo, hi};
}

}  // namespace jaxconv
