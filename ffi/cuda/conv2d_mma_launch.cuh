// Tensor-core kernels, level 5 (host): which instantiation serves a launch (16-byte loads,
// precomputed iterators, k-major B, index width) and the launchers.
//
// Needs PassParams and FilterParams (see conv2d_mma_pass.cuh).
#pragma once

#include "conv2d_mma_filter.cuh"
#include "conv2d_mma_pass.cuh"

namespace jaxconv::cuda {

// Whether k-major B (ldmatrix.trans) applies: 16-bit weights contiguous along output channels.
template <typename T>
bool mma_b_k_major(const PassParams& p) {
  return sizeof(T) == 2 && p.w_co == 1;
}

// Which chunks may be copied as 16 bytes: the kVec (8 or 4) elements of a chunk must be
// consecutive in memory, and every offset that starts a chunk a multiple of kVec elements
// (with 16-byte-aligned buffers).
template <typename T>
MmaLoads mma_pass_loads(const PassParams& p, const T* in, const T* w) {
  const int64_t vec = sizeof(T) == 2 ? 8 : 4;
  auto multiple = [&](int64_t v) { return v % vec == 0; };
  MmaLoads loads{0, 0};
  // NHWC: k = (th, tw, ci) with ci innermost; a chunk stays within one tap when Cin % vec == 0.
  loads.a_vector = p.layout == kNHWC && multiple(p.Cin) && multiple(p.is.n) && multiple(p.is.h) &&
                   multiple(p.is.w) && aligned16(in);
  bool b = aligned16(w) && multiple(p.w_group);
  if (mma_b_k_major<T>(p)) {  // 8 output channels of one k
    b = b && multiple(p.Cout) && multiple(p.w_ci) && multiple(p.w_kh) && multiple(p.w_kw);
  } else if (p.layout == kNHWC) {  // vec input channels of one tap
    b = b && p.w_ci == 1 && multiple(p.Cin) && multiple(p.w_co) && multiple(p.w_kh) &&
        multiple(p.w_kw);
  } else {  // forward OIHW: k = (ci, kh, kw) is the weight's own order, offset co * w_co + k
    b = b && !p.transposed && p.w_kw == 1 && p.w_kh == p.KW && p.w_ci == p.KH * p.KW &&
        multiple(p.K) && multiple(p.w_co);
  }
  loads.b_vector = b;
  return loads;
}

// Whether conv_pass_mma_tap_kernel runs the pass (with int32 offsets): NHWC, every chunk of
// both operands one 16-byte copy, channels dense (is.c == 1) with B n-major reading ci
// contiguously (w_ci == 1), Cin a multiple of the stage's k so that a stage stays inside one
// tap, and fewer than 32 tap slots per axis (one mask bit each, and th = TH after the last tap
// still shifts by less than 32).
template <typename T>
bool mma_pass_tap_applies(const PassParams& p, const MmaLoads& loads) {
  const int64_t bk = kMmaRowBytes / (sizeof(T) == 2 ? 2 : 4);
  return p.layout == kNHWC && loads.a_vector && loads.b_vector && p.is.c == 1 &&
         (mma_b_k_major<T>(p) || p.w_ci == 1) && p.os.c == 1 && p.Cin % bk == 0 && p.TH < 32 &&
         p.TW < 32 && p.K / bk < (int64_t(1) << 31);
}

// bwd_filter: which chunks may be copied as 16 bytes (every chunk's kVec elements consecutive
// in memory and its first element's offset a multiple of kVec, with 16-byte-aligned buffers).
template <typename T>
MmaLoads mma_filter_loads(const FilterParams& p, const T* x, const T* dy) {
  const int64_t vec = sizeof(T) == 2 ? 8 : 4;
  auto multiple = [&](int64_t v) { return v % vec == 0; };
  MmaLoads loads{0, 0};
  if (p.layout == kNHWC) {
    // dy chunk: output channels (g * Og + o .. + vec) of one position; x chunk: channels
    // (g * Cg + ci .. + vec) of one tap of one position (k = (kh, kw, ci), ci innermost).
    loads.a_vector = p.ys.c == 1 && multiple(p.Og) && multiple(p.ys.n) && multiple(p.ys.h) &&
                     multiple(p.ys.w) && aligned16(dy);
    loads.b_vector = p.xs.c == 1 && multiple(p.Cg) && multiple(p.xs.n) && multiple(p.xs.h) &&
                     multiple(p.xs.w) && aligned16(x);
  } else {
    // dy chunk: vec positions of one output channel, starting at a multiple of vec; they stay in
    // one image (and are consecutive there) when OH * OW is a multiple of vec.
    loads.a_vector = p.ys.w == 1 && p.ys.h == p.OW && multiple(p.OH * p.OW) && multiple(p.ys.c) &&
                     multiple(p.ys.n) && aligned16(dy);
    loads.b_vector = 0;  // im2col(x) along positions is strided: gathered
  }
  return loads;
}

// Whether conv_filter_mma_pos_kernel runs bwd_filter (with int32 offsets): NHWC, every chunk
// of both operands one 16-byte copy, and dy dense along positions (its offset is then linear in
// the position index).
inline bool mma_filter_pos_applies(const FilterParams& p, const MmaLoads& loads) {
  return p.layout == kNHWC && loads.a_vector && loads.b_vector && p.ys.h == p.OW * p.ys.w &&
         p.ys.n == p.OH * p.ys.h;
}

// Launches conv_filter_mma_kernel over p's plan (plan_filter with this tile) into dw, or into
// the float32 partial sums when p.splits > 1 (the caller then adds them); index32 as for the
// pass.
template <typename T, typename Cfg>
cudaError_t launch_filter_mma(const FilterParams& p, const T* x, const T* dy, T* dw, float* partial,
                              bool index32, cudaStream_t stream) {
  const MmaLoads loads = mma_filter_loads(p, x, dy);
  if (index32 && mma_filter_pos_applies(p, loads))
    return launch_dynamic_shared(conv_filter_mma_pos_kernel<T, Cfg>, dim3(grid_blocks(p.tiles)),
                                 dim3(Cfg::kThreads), Cfg::kSharedBytes, stream, p, x, dy, dw,
                                 partial);
  void (*kernel)(FilterParams, MmaLoads, const T*, const T*, T*, float*);
  if (p.layout == kNHWC)
    kernel = index32 ? conv_filter_mma_kernel<T, Cfg, kNHWC, int32_t>
                     : conv_filter_mma_kernel<T, Cfg, kNHWC, int64_t>;
  else
    kernel = index32 ? conv_filter_mma_kernel<T, Cfg, kNCHW, int32_t>
                     : conv_filter_mma_kernel<T, Cfg, kNCHW, int64_t>;
  return launch_dynamic_shared(kernel, dim3(grid_blocks(p.tiles)), dim3(Cfg::kThreads),
                               Cfg::kSharedBytes, stream, p, loads, x, dy, dw, partial);
}

// The pass kernel instantiation for one layout / B staging, by index width.
template <typename T, typename Cfg, int kLayout, bool kBKMajor>
auto pass_mma_kernel(bool index32) {
  return index32 ? conv_pass_mma_kernel<T, Cfg, kLayout, kBKMajor, int32_t>
                 : conv_pass_mma_kernel<T, Cfg, kLayout, kBKMajor, int64_t>;
}

// index32: offsets in int32 (mma_index32 in conv2d_problem.cuh says when that is exact).
template <typename T, typename Cfg>
cudaError_t launch_pass_mma(PassParams p, const T* in, const T* w, const T* bias, T* out,
                            bool index32, cudaStream_t stream) {
  p.m_tiles = ceil_div_pos(p.M, Cfg::BM);
  p.n_tiles = ceil_div_pos(p.Cout, Cfg::BN);
  p.tiles = p.phases_h * p.phases_w * p.G * p.n_tiles * p.m_tiles;
  if (p.tiles == 0) return cudaSuccess;
  const MmaLoads loads = mma_pass_loads(p, in, w);
  if (index32 && mma_pass_tap_applies<T>(p, loads)) {
    void (*tap_kernel)(PassParams, const T*, const T*, const T*, T*);
    if constexpr (sizeof(T) == 2)
      tap_kernel = mma_b_k_major<T>(p) ? conv_pass_mma_tap_kernel<T, Cfg, true>
                                       : conv_pass_mma_tap_kernel<T, Cfg, false>;
    else
      tap_kernel = conv_pass_mma_tap_kernel<T, Cfg, false>;
    return launch_dynamic_shared(tap_kernel, dim3(grid_blocks(p.tiles)), dim3(Cfg::kThreads),
                                 Cfg::kSharedBytes, stream, p, in, w, bias, out);
  }
  void (*kernel)(PassParams, MmaLoads, const T*, const T*, const T*, T*);
  if (p.layout == kNHWC) {
    if constexpr (sizeof(T) == 2)
      kernel = mma_b_k_major<T>(p) ? pass_mma_kernel<T, Cfg, kNHWC, true>(index32)
                                   : pass_mma_kernel<T, Cfg, kNHWC, false>(index32);
    else
      kernel = pass_mma_kernel<T, Cfg, kNHWC, false>(index32);
  } else {
    kernel = pass_mma_kernel<T, Cfg, kNCHW, false>(index32);
  }
  return launch_dynamic_shared(kernel, dim3(grid_blocks(p.tiles)), dim3(Cfg::kThreads),
                               Cfg::kSharedBytes, stream, p, loads, in, w, bias, out);
}

}  // namespace jaxconv::cuda
