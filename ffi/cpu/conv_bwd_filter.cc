// bwd_filter: dw = sum over images and positions of the im2col of x against dy.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv.h"

namespace jaxconv {

// dw = sum over images and positions of the im2col of x against dy (the GEMM forms are in
// conv.h's file comment: dW^T = Col^T * dY^T in NCHW, dY^T * Col in NHWC).
//
// Positions (n, oh, ow), flattened, are cut into equal slices of at most kKC; dy is first packed
// once per slice into the GEMM operand it plays (NCHW: B panels of dY^T; NHWC: A rows of
// dY^T). Tasks then own a block of the im2col side (NCHW: rows k of dW^T; NHWC: columns k)
// and a contiguous range of slices; when there are too few blocks to keep every thread busy
// the slices are split into ranges summed into separate partial buffers, added at the end in
// a fixed order, so results never depend on scheduling. Before it, the one algorithm choice
// may send the call to the FFT, the depthwise kernel or (3x3 stride 1) Winograd (winograd.cc),
// each of which may decline (non-finite values), leaving it here.
template <typename T>
void Conv<T>::backward_filter(const ParallelRunner& pr, const T* x, const T* dy, T* dw) const {
  const AlgoChoice algo = choose_conv_algo(g, ConvDirection::kBackwardFilter, kDouble);
  if (algo.kind == AlgoChoice::kFft &&
      kernels().fft<T>().backward_filter(pr, g, algo.fft, x, dy, dw))
    return;
  if (depthwise_applicable(g)) return depthwise_backward_filter<T>(pr, g, x, dy, dw);
  if (algo.kind == AlgoChoice::kWinograd &&
      kernels().winograd<T>().backward_filter(pr, g, algo.winograd_tile, x, dy, dw))
    return;
  const Pass ps = forward_pass();
  const int64_t G = ps.G, Kg = ps.K(), J = ps.U * ps.V, Q = ps.N * J;
  // Slices of equal length (784 positions: 4 x 196, not 3 x 256 + 16, whose last GEMM would
  // load and store the whole dW^T tile for 16 steps of reduction).
  const int64_t slices = (Q + kKC - 1) / kKC, slice_len = slices ? (Q + slices - 1) / slices : 0;
  const int64_t opanels = (Og + NR - 1) / NR;
  const bool nchw = !nhwc();
  // Packed dy, per (group, slice): NCHW opanels*NR x kKC panels; NHWC Og x kKC rows.
  const int64_t dy_slice = nchw ? opanels * NR * kKC : Og * kKC;
  std::vector<Acc> dyp(G * slices * dy_slice);
  pr.run(G * slices, [&](int64_t task) {
    const int64_t grp = task / slices, s = task % slices;
    const int64_t q0 = s * slice_len, q1 = std::min(Q, q0 + slice_len), pc = q1 - q0;
    Acc* dst = dyp.data() + task * dy_slice;
    if (nchw) {
      // dY^T panels: [o / NR][pos][o % NR]. Per panel, each position's NR channels are
      // written in turn (one cache line), reading the panel's NR dy planes in step; writing
      // channel by channel instead would store at a stride of NR elements over the whole
      // slice, a cache line per value.
      for (int64_t p = 0; p < opanels; ++p) {
        const int64_t o0 = p * NR, nr = std::min(NR, Og - o0);
        for (int64_t q = q0; q < q1;) {
          const int64_t n = q / J, j = q % J, len = std::min(J - j, q1 - q);
          const T* src = dy + n * ys.n + (grp * Og + o0) * ys.c + j;
          Acc* d = dst + p * pc * NR + (q - q0) * NR;
          for (int64_t i = 0; i < len; ++i, d += NR) {
            for (int64_t c = 0; c < nr; ++c) d[c] = Num<T>::load(src[c * ys.c + i]);
            for (int64_t c = nr; c < NR; ++c) d[c] = Acc(0);
          }
          q += len;
        }
      }
    } else {
      // dY^T rows: [o][pos]; positions of dense NHWC dy are rows of stride ys.w. Blocks of
      // kQB positions: each o row gets kQB consecutive values (a cache line) per block.
      constexpr int64_t kQB = 16;
      for (int64_t qb = q0; qb < q1; qb += kQB) {
        const int64_t qn = std::min(kQB, q1 - qb);
        for (int64_t o = 0; o < Og; ++o) {
          const T* src = dy + qb * ys.w + grp * Og + o;
          Acc* d = dst + o * pc + (qb - q0);
          for (int64_t i = 0; i < qn; ++i) d[i] = Num<T>::load(src[i * ys.w]);
        }
      }
    }
  });
  // Blocks of the im2col side: NCHW rows of dW^T (multiples of 6), NHWC columns (panels).
  // NHWC with few channels per group (an input layer: 3 channels, 7x7 taps, Kg = 147) packs
  // whole im2col rows instead, one block over all of Kg: per-tap pieces of Cg values would be
  // copied one by one (49 copies of 3 floats per position), where a row of taps is TW*Cg
  // consecutive values of x (pack_col_rows), dealt out to the panels NR at a time.
  const bool row_pack = !nchw && Cg < kFewChannels && Kg <= 2 * kKC;
  const int64_t block = nchw ? 96 : row_pack ? round_up(Kg, NR) : 8 * NR;
  const int64_t blocks = (Kg + block - 1) / block;
  int64_t splits = std::max<int64_t>(1, (2 * pr.num_threads() + G * blocks - 1) / (G * blocks));
  splits = std::min(splits, slices);
  const int64_t part_size = Kg * Og;  // NCHW dW^T[k][o], NHWC dW^T[o][k]
  std::vector<Acc> partial(G * splits * part_size, Acc(0));
  pr.run(G * blocks * splits, [&](int64_t task) {
    const int64_t s = task % splits, b = (task / splits) % blocks, grp = task / (splits * blocks);
    const int64_t k0 = b * block, kn = std::min(Kg, k0 + block) - k0;
    Acc* part = partial.data() + (grp * splits + s) * part_size;
    Acc* im = scratch<Acc, kPackedOperand>(round_up(block, NR) * kKC);
    thread_local std::vector<Run> runs;
    for (int64_t sl = slices * s / splits; sl < slices * (s + 1) / splits; ++sl) {
      const int64_t q0 = sl * slice_len, q1 = std::min(Q, q0 + slice_len), pc = q1 - q0;
      const Acc* dyop = dyp.data() + (grp * slices + sl) * dy_slice;
      if (nchw) {
        // A = im2col rows k0 .. k0+kn over the slice's positions (row length pc).
        grid_runs(q0, q1, ps.U, ps.V, &runs);
        const int64_t taps = ps.TH() * ps.TW();
        for (int64_t k = k0; k < k0 + kn; ++k) {
          int64_t ci = k / taps, th = (k % taps) / ps.TW(), tw = k % ps.TW();
          int64_t vlo, vhi;
          ps.v_range(tw, &vlo, &vhi);
          for (const Run& r : runs)
            gather_row_run(ps, x + r.n * xs.n + (grp * Cg + ci) * xs.c, r, th, tw, vlo, vhi,
                           im + (k - k0) * pc + r.at);
        }
        gemm_packed_for<T>(kn, Og, pc, im, pc, dyop, pc * NR, part + k0 * Og, Og, true);
      } else if (row_pack) {
        // B = all im2col columns as panels over the slice's positions, from rows of
        // kRowChunk positions at a time: [pos][k] -> panels [k / NR][pos][k % NR].
        constexpr int64_t kRowChunk = 16;
        Acc* rows = scratch<Acc, kGatherLine>(kRowChunk * Kg);
        const int64_t full = Kg / NR, rest = Kg % NR;
        for (int64_t r0 = 0; r0 < pc; r0 += kRowChunk) {
          const int64_t rn = std::min(kRowChunk, pc - r0);
          pack_col_rows(ps, x, grp, q0 + r0, rn, 0, Kg, rows);
          for (int64_t r = 0; r < rn; ++r) {
            const Acc* src = rows + r * Kg;
            Acc* dst = im + (r0 + r) * NR;
            for (int64_t p = 0; p < full; ++p)
              std::memcpy(dst + p * pc * NR, src + p * NR, NR * sizeof(Acc));
            if (rest) {
              std::memcpy(dst + full * pc * NR, src + full * NR, rest * sizeof(Acc));
              std::memset(dst + full * pc * NR + rest, 0, (NR - rest) * sizeof(Acc));
            }
          }
        }
        gemm_packed_for<T>(Og, kn, pc, dyop, pc, im, pc * NR, part + k0, Kg, true);
      } else {
        // B = im2col columns k0 .. k0+kn as panels over the slice's positions.
        pack_col_panels_nhwc(ps, x, grp, q0, pc, k0, kn, im);
        gemm_packed_for<T>(Og, kn, pc, dyop, pc, im, pc * NR, part + k0, Kg, true);
      }
    }
  });
  // Sum the partials in split order and write dw in its layout. The reduction index k runs in
  // the weights' own memory order (NCHW: k = (ci, kh, kw), OIHW stride 1; NHWC: k = (kh, kw,
  // ci), HWIO stride O), so dw[grp*Og + o, k] sits at (grp*Og + o)*ws.n + k*k_stride: no
  // division per element. Partials are dW^T (NCHW [k][o], NHWC [o][k]) and dw the other way
  // round, so tasks own kKB consecutive k and walk o, reading and writing kKB-long runs.
  constexpr int64_t kKB = 16;
  const int64_t k_stride = nchw ? ws.w : ws.c;
  const int64_t kblocks = (Kg + kKB - 1) / kKB;
  pr.run(G * kblocks, [&](int64_t task) {
    const int64_t grp = task / kblocks, k0 = (task % kblocks) * kKB;
    const int64_t k1 = std::min(Kg, k0 + kKB);
    const Acc* base = partial.data() + grp * splits * part_size;
    for (int64_t o = 0; o < Og; ++o) {
      T* dst = dw + (grp * Og + o) * ws.n;
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t idx = nchw ? k * Og + o : o * Kg + k;
        Acc v = 0;
        for (int64_t sp = 0; sp < splits; ++sp) v += base[sp * part_size + idx];
        dst[k * k_stride] = Num<T>::store(v);
      }
    }
  });
}

#define JAXCONV_INSTANTIATE(T)                                                                     \
  template void Conv<T>::backward_filter(const ParallelRunner& pr, const T* x, const T* dy, T* dw) \
      const;
JAXCONV_FOR_EACH_STORAGE_TYPE(JAXCONV_INSTANTIATE)
#undef JAXCONV_INSTANTIATE

}  // namespace jaxconv
