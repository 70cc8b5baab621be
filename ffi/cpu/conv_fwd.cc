// Running a convolution pass (conv.h): the forward convolution is one pass over y; each stride
// phase of bwd_data (conv_bwd_data.cc) is one pass over the dx cells of that phase.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv.h"

namespace jaxconv {

// ------------------------------------------------------------------------------------------
// Running a pass.

// NCHW: per task, a block of grid columns (positions) of one group; A = weights.
template <typename T>
void Conv<T>::run_pass_nchw(const ParallelRunner& pr, const Pass& ps, const T* in, const Acc* A,
                            const T* bias, T* out) const {
  const int64_t J = ps.U * ps.V, Q = ps.N * J, K = ps.K(), Cout = ps.Cout;
  if (Q == 0) return;
  // Blocks of columns: whole images split evenly when an image is large, else blocks that
  // run across images; halved until there are enough tasks to share.
  int64_t width = 256;
  auto count = [&](int64_t wdt) {
    return J >= 128 ? ps.N * ((J + wdt - 1) / wdt) : (Q + wdt - 1) / wdt;
  };
  while (width > 64 && ps.G * count(width) < 4 * pr.num_threads()) width /= 2;
  const int64_t per_image = J >= 128 ? (J + width - 1) / width : 0;
  const int64_t blocks = count(width);
  const int64_t kc_max = K <= kKC + kKC / 2 ? K : kKC;
  pr.run(ps.G * blocks, [&](int64_t task) {
    const int64_t grp = task / blocks, b = task % blocks;
    int64_t q0, q1;
    if (per_image) {
      int64_t n = b / per_image, part = b % per_image;
      int64_t step = round_up((J + per_image - 1) / per_image, NR);
      q0 = n * J + std::min(J, part * step);
      q1 = n * J + std::min(J, (part + 1) * step);
    } else {
      q0 = b * width;
      q1 = std::min(Q, q0 + width);
    }
    const int64_t cols = q1 - q0;
    if (cols <= 0) return;
    thread_local std::vector<Run> runs;
    grid_runs(q0, q1, ps.U, ps.V, &runs);
    const bool direct = kSame && ps.dense && q0 / J == (q1 - 1) / J;
    Acc* C;
    int64_t ldc;
    bool acc = false;
    if (direct) {
      int64_t n = q0 / J;
      C = reinterpret_cast<Acc*>(out) + n * ps.os.n + grp * Cout * ps.os.c + (q0 - n * J);
      ldc = ps.os.c;
      if (bias) {
        for (int64_t co = 0; co < Cout; ++co)
          std::fill(C + co * ldc, C + co * ldc + cols, Num<T>::load(bias[grp * Cout + co]));
        acc = true;
      }
    } else {
      C = scratch<Acc, kTile>(Cout * cols);
      ldc = cols;
    }
    const Acc* Ag = A + grp * Cout * K;
    Acc* Bp = scratch<Acc, kPackedOperand>(round_up(cols, NR) * kc_max);
    if (K == 0) gemm_packed_for<T>(Cout, cols, 0, Ag, K, Bp, 0, C, ldc, acc);
    for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, K - k0);
      pack_colT_panels(ps, in, grp, k0, kc, runs, Bp);
      gemm_packed_for<T>(Cout, cols, kc, Ag + k0, K, Bp, kc * NR, C, ldc, acc || k0 > 0);
    }
    if (!direct) store_nchw(ps, C, ldc, runs, grp, out, bias);
  });
}

// NHWC: per task, a block of grid rows (positions, across images) of one group; B = weights.
template <typename T>
void Conv<T>::run_pass_nhwc(const ParallelRunner& pr, const Pass& ps, const T* in, const Acc* Bw,
                            const T* bias, T* out) const {
  const int64_t Q = ps.N * ps.U * ps.V, K = ps.K(), Cout = ps.Cout;
  if (Q == 0) return;
  const int64_t panels = (Cout + NR - 1) / NR;
  int64_t rows_per = 96;
  while (rows_per > 12 && ps.G * ((Q + rows_per - 1) / rows_per) < 4 * pr.num_threads())
    rows_per /= 2;
  const int64_t blocks = (Q + rows_per - 1) / rows_per;
  const int64_t kc_max = K <= kKC + kKC / 2 ? K : kKC;
  // 1x1 taps at offset 0 with step 1 over a grid equal to the input: the im2col is the input.
  const bool in_place = kSame && ps.TH() == 1 && ps.TW() == 1 && ps.off_h[0] == 0 &&
                        ps.off_w[0] == 0 && ps.step_h == 1 && ps.step_w == 1 && ps.U == ps.Hin &&
                        ps.V == ps.Win;
  pr.run(ps.G * blocks, [&](int64_t task) {
    const int64_t grp = task / blocks, b = task % blocks;
    const int64_t q0 = b * rows_per, rows = std::min(Q, q0 + rows_per) - q0;
    const bool direct = kSame && ps.dense;
    Acc* C;
    int64_t ldc;
    bool acc = false;
    if (direct) {
      C = reinterpret_cast<Acc*>(out) + q0 * ps.os.w + grp * Cout;
      ldc = ps.os.w;
      if (bias) {
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t co = 0; co < Cout; ++co)
            C[r * ldc + co] = Num<T>::load(bias[grp * Cout + co]);
        acc = true;
      }
    } else {
      C = scratch<Acc, kTile>(rows * Cout);
      ldc = Cout;
    }
    const Acc* Bg = Bw + grp * panels * NR * K;
    if (K == 0) gemm_packed_for<T>(rows, Cout, 0, Bg, 0, Bg, 0, C, ldc, acc);
    for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, K - k0);
      const Acc* Ablk;
      int64_t lda;
      if (in_place) {
        Ablk = reinterpret_cast<const Acc*>(in) + q0 * ps.is.w + grp * ps.Cin + k0;
        lda = ps.is.w;
      } else {
        Acc* At = scratch<Acc, kPackedOperand>(rows_per * kc_max);
        pack_col_rows(ps, in, grp, q0, rows, k0, kc, At);
        Ablk = At;
        lda = kc;
      }
      gemm_packed_for<T>(rows, Cout, kc, Ablk, lda, Bg + k0 * NR, K * NR, C, ldc, acc || k0 > 0);
    }
    if (!direct) store_nhwc(ps, C, ldc, q0, rows, grp, out, bias);
  });
}

// Whether the forward pass takes run_pass_indirect: float32 / float64 (the indirect GEMM reads
// the activations as they are, so half types, which are widened while packing, never do), every
// tap of every grid position inside the input, and a kernel of more than one tap (a 1x1 pass's
// im2col is the input itself: NHWC reads it in place, NCHW packs plane rows with memcpy). Then
// where packing the im2col costs more than the GEMM it feeds:
//   NHWC with few channels per group (under kFewChannels): the packing copies a row of taps,
//     TW*Cin values, per copy (LeNet's C1: 5, C3: 30); with more channels the copies are long
//     and the packed rows are read more cheaply than the input (C5, 16 channels and K in two
//     slices: 0.12 ms packed vs 0.13 ms indirect).
//   NCHW on output planes under 128 cells (where run_pass_nchw's column blocks run across
//     images), whose im2col rows are short runs (C3: 10 cells, C5: one cell per image), with
//     at least a panel of output channels (the indirect tile is [position][channel]). Larger
//     planes pack long runs and store the GEMM's tile in place: a 7x7 valid 3 -> 64 @64 forward
//     took 14.1 ms indirect against 10.9 ms packed.
template <typename T>
bool Conv<T>::indirect_pass(const Pass& ps, bool transposed) const {
  if (!kSame || transposed || !ps.dense || ps.TH() * ps.TW() == 1) return false;
  for (int64_t th = 0; th < ps.TH(); ++th)
    if (ps.off_h[th] < 0 || (ps.U - 1) * ps.step_h + ps.off_h[th] >= ps.Hin) return false;
  for (int64_t tw = 0; tw < ps.TW(); ++tw)
    if (ps.off_w[tw] < 0 || (ps.V - 1) * ps.step_w + ps.off_w[tw] >= ps.Win) return false;
  if (ps.layout == kNHWC) return ps.Cin < kFewChannels;
  return ps.Cout >= NR && ps.U * ps.V < 128;
}

template <typename T>
void Conv<T>::run_pass_indirect(const ParallelRunner& pr, const Pass& ps, const T* in,
                                const Acc* Bw, const T* bias, T* out) const {
  if constexpr (!kSame) {
    // Never reached: indirect_pass is false for the half types.
    (void)pr, (void)ps, (void)in, (void)Bw, (void)bias, (void)out;
  } else {
    const int64_t J = ps.U * ps.V, Q = ps.N * J, K = ps.K(), Cout = ps.Cout;
    const int64_t panels = (Cout + NR - 1) / NR;
    // koff[k]: where reduction index k = (ci, th, tw) lies from a position's first input cell
    // (its tap (0, 0) at offset 0, which indirect_pass keeps inside the input; every offset here
    // is >= 0).
    std::vector<int64_t> koff(K);
    for (int64_t ci = 0; ci < ps.Cin; ++ci)
      for (int64_t th = 0; th < ps.TH(); ++th)
        for (int64_t tw = 0; tw < ps.TW(); ++tw)
          koff[k_index(ps, ci, th, tw)] =
              ci * ps.is.c + ps.off_h[th] * ps.is.h + ps.off_w[tw] * ps.is.w;
    int64_t rows_per = 96;
    while (rows_per > 12 && ps.G * ((Q + rows_per - 1) / rows_per) < 4 * pr.num_threads())
      rows_per /= 2;
    const int64_t blocks = (Q + rows_per - 1) / rows_per;
    const int64_t kc_max = K <= kKC + kKC / 2 ? K : kKC;
    // The tile [position][channel] is the output itself in NHWC, and in NCHW when the plane is
    // one cell (y[n][co]); position q's row is q * ldo apart.
    const bool in_place = ps.layout == kNHWC || J == 1;
    const int64_t ldo = ps.layout == kNHWC ? ps.os.w : ps.os.n;
    pr.run(ps.G * blocks, [&](int64_t task) {
      const int64_t grp = task / blocks, b = task % blocks;
      const int64_t q0 = b * rows_per, rows = std::min(Q, q0 + rows_per) - q0;
      thread_local std::vector<const Acc*> rowp;
      rowp.resize(rows);
      const Acc* in_g = reinterpret_cast<const Acc*>(in) + grp * ps.Cin * ps.is.c;
      int64_t n = q0 / J, u = (q0 / ps.V) % ps.U, v = q0 % ps.V;
      for (int64_t r = 0; r < rows; ++r) {
        rowp[r] = in_g + n * ps.is.n + u * ps.step_h * ps.is.h + v * ps.step_w * ps.is.w;
        ps.next_position(&n, &u, &v);
      }
      Acc* C;
      int64_t ldc;
      bool acc = false;
      if (in_place) {
        C = reinterpret_cast<Acc*>(out) + q0 * ldo + grp * Cout;
        ldc = ldo;
        if (bias) {
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t co = 0; co < Cout; ++co) C[r * ldc + co] = bias[grp * Cout + co];
          acc = true;
        }
      } else {
        C = scratch<Acc, kTile>(rows * Cout);
        ldc = Cout;
      }
      const Acc* Bg = Bw + grp * panels * NR * K;
      if (K == 0) gemm_indirect(rows, Cout, 0, rowp.data(), koff.data(), Bg, 0, C, ldc, acc);
      for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
        const int64_t kc = std::min(kc_max, K - k0);
        gemm_indirect(rows, Cout, kc, rowp.data(), koff.data() + k0, Bg + k0 * NR, K * NR, C, ldc,
                      acc || k0 > 0);
      }
      if (!in_place) store_rows_nchw(ps, C, ldc, q0, rows, grp, out, bias);
    });
  }
}

template <typename T>
void Conv<T>::run_pass(const ParallelRunner& pr, const Pass& ps, const T* in, const T* w,
                       bool transposed, const T* bias, T* out) const {
  if (ps.N * ps.U * ps.V == 0) return;
  if (indirect_pass(ps, transposed)) {
    const int64_t panels = (ps.Cout + NR - 1) / NR;
    Acc* wp = scratch<Acc, kWeights>(ps.G * panels * NR * ps.K());
    pack_forward_panels(pr, ps, w, wp);
    return run_pass_indirect(pr, ps, in, wp, bias, out);
  }
  const Acc* wmat = pack_pass_weights(pr, ps, w, transposed);
  if (ps.layout == kNCHW)
    run_pass_nchw(pr, ps, in, wmat, bias, out);
  else
    run_pass_nhwc(pr, ps, in, wmat, bias, out);
}

// y = conv(x, w) + bias
template <typename T>
void Conv<T>::forward(const ParallelRunner& pr, const T* x, const T* w, const T* bias, T* y) const {
  const AlgoChoice algo =
      choose_conv_algo(g, ConvDirection::kForward, kDouble, std::is_same_v<T, bf16_t>);
  if (algo.kind == AlgoChoice::kFft && kernels().fft<T>().forward(pr, g, algo.fft, x, w, bias, y))
    return;
  if (use_depthwise(w)) return depthwise_forward<T>(pr, g, x, w, bias, y);
  if (algo.kind == AlgoChoice::kWinograd &&
      kernels().winograd<T>().forward(pr, g, algo.winograd_tile, x, w, bias, y))
    return;
  run_pass(pr, forward_pass(), x, w, false, bias, y);
}

#define JAXCONV_INSTANTIATE(T)                                                                    \
  template void Conv<T>::run_pass_nchw(const ParallelRunner& pr, const Pass& ps, const T* in,     \
                                       const Acc* A, const T* bias, T* out) const;                \
  template void Conv<T>::run_pass_nhwc(const ParallelRunner& pr, const Pass& ps, const T* in,     \
                                       const Acc* Bw, const T* bias, T* out) const;               \
  template bool Conv<T>::indirect_pass(const Pass& ps, bool transposed) const;                    \
  template void Conv<T>::run_pass_indirect(const ParallelRunner& pr, const Pass& ps, const T* in, \
                                           const Acc* Bw, const T* bias, T* out) const;           \
  template void Conv<T>::run_pass(const ParallelRunner& pr, const Pass& ps, const T* in,          \
                                  const T* w, bool transposed, const T* bias, T* out) const;      \
  template void Conv<T>::forward(const ParallelRunner& pr, const T* x, const T* w, const T* bias, \
                                 T* y) const;
JAXCONV_FOR_EACH_STORAGE_TYPE(JAXCONV_INSTANTIATE)
#undef JAXCONV_INSTANTIATE

}  // namespace jaxconv
