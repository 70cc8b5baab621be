// Building blocks of the CPU convolution passes (conv.h): per-thread scratch, the copy helpers
// that pack operands from the tensors, runs of grid positions and the pass model.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "gemm.h"

namespace jaxconv {

// Per-thread scratch that grows but is never freed between calls: packing buffers are reused by
// every tile a thread processes. A kernel holds at most one buffer per slot at a time.
enum ScratchSlot {
  kPackedOperand,  // the packed GEMM operand of a K-slice (B panels or A rows)
  kTile,           // an output tile computed in scratch before its epilogue
  kGatherLine,     // one im2col row gathered run by run before it is dealt out to panels
  kSlab,           // col2im's float32 accumulator for one (image, group) of dx (half types)
  kWeights,        // a pass's packed weights, on the calling thread for the whole call (the
                   // pool's threads read it); never reused by a task, whose slots are above
};
template <typename A, ScratchSlot Slot>
A* scratch(size_t n) {
  thread_local std::vector<A> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// K-slice of one GEMM call: a packed B panel (kKC x NR) stays in L1, an A block in L2.
inline constexpr int64_t kKC = 256;

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Copies `len` elements src[i*stride] (widened to the accumulation type) into dst.
// Packing copies many short runs (a few channels, a few taps); below 32 elements they are done
// inline in 16-byte pieces, since a libc call per run costs more than the copy. (The empty asm
// keeps GCC from turning the tail loop back into a call.)
template <typename T, typename Acc>
inline void copy_widen(Acc* dst, const T* src, int64_t len, int64_t stride) {
  if constexpr (std::is_same_v<T, f16_t> && std::is_same_v<Acc, float>) {
    // float16: the capability's widening (F16C where it has it; kernel_table.h).
    if (stride == 1 && len >= 8) {
      kernels().widen_f16(dst, reinterpret_cast<const uint16_t*>(src), len);
      return;
    }
  }
  if constexpr (std::is_same_v<T, bf16_t> && std::is_same_v<Acc, float>) {
    // bfloat16: a 16-bit shift per value, which GCC vectorizes at a constant stride of 1.
    if (stride == 1) {
      for (int64_t i = 0; i < len; ++i) dst[i] = bf16_to_float(src[i].bits);
      return;
    }
  }
  if constexpr (std::is_same_v<T, Acc>) {
    if (stride == 1) {
      if (len > 32) {
        std::memcpy(dst, src, sizeof(Acc) * len);
        return;
      }
      constexpr int64_t kPiece = 16 / sizeof(Acc);
      for (; len >= kPiece; len -= kPiece, dst += kPiece, src += kPiece) std::memcpy(dst, src, 16);
      for (; len > 0; --len) {
        asm volatile("");
        *dst++ = *src++;
      }
      return;
    }
  }
  // Stride 2 (a stride-2 convolution's im2col rows) as its own loop: with the stride a
  // constant GCC vectorizes it (two loads and a shuffle per vector).
  if (stride == 2) {
    for (int64_t i = 0; i < len; ++i) dst[i] = Num<T>::load(src[2 * i]);
    return;
  }
  for (int64_t i = 0; i < len; ++i) dst[i] = Num<T>::load(src[i * stride]);
}

template <typename Acc>
inline void zero(Acc* dst, int64_t len) {
  if (len > 32) {
    std::memset(dst, 0, sizeof(Acc) * len);
    return;
  }
  constexpr int64_t kPiece = 16 / sizeof(Acc);
  for (; len >= kPiece; len -= kPiece, dst += kPiece) std::memset(dst, 0, 16);
  for (; len > 0; --len) {
    asm volatile("");
    *dst++ = Acc(0);
  }
}

// A run of consecutive positions (n, u, v .. v + len - 1) of a pass grid; `at` is the index of
// its first position within the block being packed.
struct Run {
  int64_t at, n, u, v, len;
};

// Positions [q0, q1) of an N x U x V grid flattened as q = (n*U + u)*V + v, split into runs
// that stay within one grid row.
inline void grid_runs(int64_t q0, int64_t q1, int64_t U, int64_t V, std::vector<Run>* runs) {
  runs->clear();
  int64_t nu = q0 / V, v = q0 % V;
  for (int64_t q = q0; q < q1;) {
    int64_t len = std::min(V - v, q1 - q);
    runs->push_back({q - q0, nu / U, nu % U, v, len});
    q += len;
    ++nu;
    v = 0;
  }
}

// One convolution "pass" over activations `in` (N, G*Cin, Hin, Win) into `out`:
//
//   out[n, g*Cout + co, h0 + u*h_spacing, w0 + v*w_spacing] = bias + sum over (ci, th, tw) of
//       in[n, g*Cin + ci, u*step_h + off_h[th], v*step_w + off_w[tw]] * weight(g, co, ci, th, tw)
//
// for (u, v) in U x V; taps reading outside the input read zero. Forward: taps = the kernel,
// off = k*d - pad, step = stride, the grid is all of y. A bwd_data phase: taps = the kernel
// cells of that phase, step 1, the grid = the dx cells of that phase (spacing = stride).
struct Pass {
  int64_t N, G, Cin, Hin, Win, Cout, U, V;
  int64_t h0, h_spacing, w0, w_spacing;  // output cell (h0 + u*h_spacing, w0 + v*w_spacing)
  int64_t step_h, step_w;
  std::vector<int64_t> off_h, off_w;  // per tap along h / w
  std::vector<int64_t> kh_of, kw_of;  // the kernel cell a tap multiplies with
  Strides4 is, os;
  int64_t layout;
  bool dense;  // the grid is the whole output: out[n, c, u, v]

  // The grid position after (n, u, v) in the flattened order q = (n*U + u)*V + v.
  void next_position(int64_t* n, int64_t* u, int64_t* v) const {
    if (++*v == V) {
      *v = 0;
      if (++*u == U) {
        *u = 0;
        ++*n;
      }
    }
  }
  int64_t TH() const { return int64_t(off_h.size()); }
  int64_t TW() const { return int64_t(off_w.size()); }
  int64_t K() const { return Cin * TH() * TW(); }
  // Valid grid columns of tap tw: 0 <= v*step_w + off_w[tw] < Win  <=>  v in [lo, hi).
  void v_range(int64_t tw, int64_t* lo, int64_t* hi) const {
    *lo = std::max<int64_t>(0, ceil_div(-off_w[tw], step_w));
    *hi = std::min<int64_t>(V, floor_div(Win - 1 - off_w[tw], step_w) + 1);
    if (*hi < *lo) *hi = *lo;
  }
};

}  // namespace jaxconv
