// bwd_data (dx = conv_transpose(dy, w) + bias): one pass per stride phase (conv_fwd.cc), or the
// scatter form (GEMM into dCol, then col2im) when dy is much smaller than dx.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv.h"

namespace jaxconv {

// dx = conv_transpose(dy, w) + bias: one pass per stride phase, or the scatter form below
// when dy is much smaller than dx.
template <typename T>
void Conv<T>::backward_data(const ParallelRunner& pr, const T* dy, const T* w, const T* bias,
                            T* dx) const {
  const AlgoChoice algo =
      choose_conv_algo(g, ConvDirection::kBackwardData, kDouble, std::is_same_v<T, bf16_t>);
  if (algo.kind == AlgoChoice::kFft &&
      kernels().fft<T>().backward_data(pr, g, algo.fft, dy, w, bias, dx))
    return;
  if (use_depthwise(w)) return depthwise_backward_data<T>(pr, g, dy, w, bias, dx);
  if (algo.kind == AlgoChoice::kWinograd &&
      kernels().winograd<T>().backward_data(pr, g, algo.winograd_tile, dy, w, bias, dx))
    return;
  if (prefer_col2im()) {
    backward_data_col2im(pr, dy, w, bias, dx);
    return;
  }
  for (int64_t rh = 0; rh < g.p.stride_h; ++rh)
    for (int64_t rw = 0; rw < g.p.stride_w; ++rw)
      run_pass(pr, bwd_data_phase(rh, rw), dy, w, true, bias, dx);
}

// Scatter form: dCol[pos, k] = sum_o dY[pos, o] * W[o, k] (a GEMM per block of dy positions),
// then every dCol element is added to the dx cell the forward read it from (col2im). Tasks
// own whole (image, group) slabs of dx, so no two tasks add into the same cell.
template <typename T>
void Conv<T>::backward_data_col2im(const ParallelRunner& pr, const T* dy, const T* w, const T* bias,
                                   T* dx) const {
  const Pass ps = forward_pass();
  const int64_t G = ps.G, Kg = ps.K(), J = g.OH * g.OW, taps = ps.TH() * ps.TW();
  const bool nchw = !nhwc();
  const int64_t kpanels = (Kg + NR - 1) / NR;
  // NCHW: A = W^T rows [grp][k][o].  NHWC: B = W panels over k: [grp][k/NR][o][k%NR].
  std::vector<Acc> wp(nchw ? G * Kg * Og : G * kpanels * Og * NR);
  pr.run(G * Og, [&](int64_t task) {
    const int64_t grp = task / Og, o = task % Og;
    for (int64_t ci = 0; ci < Cg; ++ci)
      for (int64_t th = 0; th < ps.TH(); ++th)
        for (int64_t tw = 0; tw < ps.TW(); ++tw) {
          const int64_t k = k_index(ps, ci, th, tw);
          const Acc v = weight(w, ps, false, grp, o, ci, th, tw);
          if (nchw)
            wp[(grp * Kg + k) * Og + o] = v;
          else
            wp[((grp * kpanels + k / NR) * Og + o) * NR + k % NR] = v;
        }
    if (!nchw)  // zero the padding columns of the last k panel
      for (int64_t k = Kg; k < kpanels * NR; ++k)
        wp[((grp * kpanels + k / NR) * Og + o) * NR + k % NR] = Acc(0);
  });
  const Strides4 bs = activation_strides(g.p.layout, Cg, g.H, g.W);  // slab buffer strides
  const int64_t slab = Cg * g.H * g.W;
  const int64_t oslice = Og <= kKC + kKC / 2 ? Og : kKC;
  pr.run(g.N * G, [&](int64_t task) {
    const int64_t n = task / G, grp = task % G;
    // Accumulate into dx itself (float types) or into a float slab (half types).
    Acc* acc;
    Strides4 as;
    if constexpr (kSame) {
      acc = dx + n * xs.n + grp * Cg * xs.c;
      as = xs;
    } else {
      acc = scratch<Acc, kSlab>(slab);
      as = bs;
    }
    for (int64_t c = 0; c < Cg; ++c) {
      const Acc b0 = (kSame && bias) ? Num<T>::load(bias[grp * Cg + c]) : Acc(0);
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t x = 0; x < g.W; ++x) acc[c * as.c + h * as.h + x * as.w] = b0;
    }
    if (nchw) {
      const int64_t PB = 256, KB = 192;
      Acc* Bp = scratch<Acc, kPackedOperand>(round_up(PB, NR) * Og);
      Acc* C = scratch<Acc, kTile>(KB * PB);
      thread_local std::vector<Run> runs;
      for (int64_t p0 = 0; p0 < J; p0 += PB) {
        const int64_t pn = std::min(PB, J - p0), pw = round_up(pn, NR);
        // dY[n, grp, :, p0 .. p0+pn] as panels over positions: [p/NR][o][p%NR].
        for (int64_t o = 0; o < Og; ++o) {
          const T* src = dy + n * ys.n + (grp * Og + o) * ys.c + p0;
          for (int64_t p = 0; p < pw; ++p)
            Bp[((p / NR) * Og + o) * NR + p % NR] = p < pn ? Num<T>::load(src[p]) : Acc(0);
        }
        grid_runs(p0, p0 + pn, g.OH, g.OW, &runs);
        for (int64_t k0 = 0; k0 < Kg; k0 += KB) {
          const int64_t kn = std::min(KB, Kg - k0);
          for (int64_t o0 = 0; o0 < Og; o0 += oslice)
            gemm_packed_for<T>(kn, pn, std::min(oslice, Og - o0),
                               wp.data() + (grp * Kg + k0) * Og + o0, Og, Bp + o0 * NR, Og * NR, C,
                               pn, o0 > 0);
          for (int64_t k = k0; k < k0 + kn; ++k) {
            const int64_t ci = k / taps, th = (k % taps) / ps.TW(), tw = k % ps.TW();
            int64_t vlo, vhi;
            ps.v_range(tw, &vlo, &vhi);
            for (const Run& r : runs) {
              const int64_t ih = r.u * ps.step_h + ps.off_h[th];
              if (ih < 0 || ih >= g.H) continue;
              const int64_t a = std::max(vlo, r.v), b = std::min(vhi, r.v + r.len);
              Acc* drow = acc + ci * as.c + ih * as.h;
              const Acc* src = C + (k - k0) * pn + r.at - r.v;
              for (int64_t v = a; v < b; ++v) drow[(v * ps.step_w + ps.off_w[tw]) * as.w] += src[v];
            }
          }
        }
      }
    } else {
      const int64_t PB = 96, KB = 256;
      // Taps along w one dx column apart, channels of one group dense in a cell: a row of
      // taps scatters into consecutive elements (few channels, as in an input layer, would
      // otherwise be many adds of Cg elements each).
      const int64_t TW = ps.TW(), row_k = TW * Cg;
      bool unit_taps = as.w == Cg;
      for (int64_t t = 1; t < TW; ++t) unit_taps &= ps.off_w[t] == ps.off_w[t - 1] + 1;
      Acc* Ac = scratch<Acc, kPackedOperand>(PB * Og);
      Acc* C = scratch<Acc, kTile>(PB * KB);
      for (int64_t p0 = 0; p0 < J; p0 += PB) {
        const int64_t pn = std::min(PB, J - p0);
        const Acc* A;
        int64_t lda;
        if constexpr (kSame) {
          A = dy + (n * J + p0) * ys.w + grp * Og;
          lda = ys.w;
        } else {
          for (int64_t p = 0; p < pn; ++p)
            for (int64_t o = 0; o < Og; ++o)
              Ac[p * Og + o] = Num<T>::load(dy[(n * J + p0 + p) * ys.w + grp * Og + o]);
          A = Ac;
          lda = Og;
        }
        for (int64_t k0 = 0; k0 < Kg; k0 += KB) {
          const int64_t kn = std::min(KB, Kg - k0);
          for (int64_t o0 = 0; o0 < Og; o0 += oslice)
            gemm_packed_for<T>(pn, kn, std::min(oslice, Og - o0), A + o0, lda,
                               wp.data() + ((grp * kpanels + k0 / NR) * Og + o0) * NR, Og * NR, C,
                               kn, o0 > 0);
          for (int64_t p = p0; p < p0 + pn; ++p) {
            const int64_t oh = p / g.OW, ow = p % g.OW;
            const Acc* crow = C + (p - p0) * kn;
            if (unit_taps) {
              // Row th of the taps: k = (th*TW + tw)*Cg + c lands on dx cell
              // (ih, iw0 + tw, c), offset ih*as.h + iw0*Cg + (k - th*TW*Cg); the taps
              // [tlo, thi) inside dx are one run of k and of dx.
              const int64_t iw0 = ow * ps.step_w + ps.off_w[0];
              const int64_t tlo = std::min(TW, std::max<int64_t>(0, -iw0));
              const int64_t thi = std::max(tlo, std::min(TW, g.W - iw0));
              for (int64_t th = k0 / row_k; th * row_k < k0 + kn; ++th) {
                const int64_t ih = oh * ps.step_h + ps.off_h[th];
                if (ih < 0 || ih >= g.H) continue;
                const int64_t klo = std::max(k0, th * row_k + tlo * Cg);
                const int64_t khi = std::min(k0 + kn, th * row_k + thi * Cg);
                Acc* d = acc + ih * as.h + (iw0 * Cg + klo - th * row_k);
                const Acc* src = crow + (klo - k0);
                for (int64_t i = 0; i < khi - klo; ++i) d[i] += src[i];
              }
              continue;
            }
            // Taps overlapping this k block, walked with (th, tw) counters (no divisions
            // in the per-position loop).
            const int64_t t_lo = k0 / Cg;
            int64_t th = t_lo / ps.TW(), tw = t_lo % ps.TW();
            for (int64_t t = t_lo; t * Cg < k0 + kn; ++t, (++tw == ps.TW() ? (tw = 0, ++th) : 0)) {
              const int64_t ih = oh * ps.step_h + ps.off_h[th];
              const int64_t iw = ow * ps.step_w + ps.off_w[tw];
              if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
              const int64_t c_lo = std::max<int64_t>(0, k0 - t * Cg);
              const int64_t c_hi = std::min(Cg, k0 + kn - t * Cg);
              Acc* d = acc + ih * as.h + iw * as.w;
              const Acc* src = crow + t * Cg - k0;
              for (int64_t c = c_lo; c < c_hi; ++c) d[c] += src[c];
            }
          }
        }
      }
    }
    if constexpr (!kSame) {
      for (int64_t c = 0; c < Cg; ++c) {
        const Acc b0 = bias ? Num<T>::load(bias[grp * Cg + c]) : Acc(0);
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t x = 0; x < g.W; ++x)
            dx[n * xs.n + (grp * Cg + c) * xs.c + h * xs.h + x * xs.w] =
                Num<T>::store(acc[c * as.c + h * as.h + x * as.w] + b0);
      }
    }
  });
}

#define JAXCONV_INSTANTIATE(T)                                                                   \
  template void Conv<T>::backward_data(const ParallelRunner& pr, const T* dy, const T* w,        \
                                       const T* bias, T* dx) const;                              \
  template void Conv<T>::backward_data_col2im(const ParallelRunner& pr, const T* dy, const T* w, \
                                              const T* bias, T* dx) const;
JAXCONV_FOR_EACH_STORAGE_TYPE(JAXCONV_INSTANTIATE)
#undef JAXCONV_INSTANTIATE

}  // namespace jaxconv
