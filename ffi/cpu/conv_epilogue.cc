// Epilogues for tiles computed into scratch (half types, bwd_data phases, blocks that straddle
// images): convert to the storage type, add bias, scatter to the pass grid.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv.h"

namespace jaxconv {

// NCHW tile C[co][col] (ldc) over the block's runs.
template <typename T>
void Conv<T>::store_nchw(const Pass& ps, const Acc* C, int64_t ldc, const std::vector<Run>& runs,
                         int64_t grp, T* out, const T* bias) const {
  for (int64_t co = 0; co < ps.Cout; ++co) {
    Acc b = bias ? Num<T>::load(bias[grp * ps.Cout + co]) : Acc(0);
    for (const Run& r : runs) {
      T* dst = out_cell(ps, out, r.n, grp * ps.Cout + co, r.u, r.v);
      const Acc* src = C + co * ldc + r.at;
      for (int64_t i = 0; i < r.len; ++i)
        dst[i * ps.w_spacing * ps.os.w] = Num<T>::store(src[i] + b);
    }
  }
}

// NCHW output from a tile C[row][co] (ldc) for grid positions q0 .. q0 + rows: per channel,
// the block's runs of one grid row, each a contiguous store (read down the tile's column).
template <typename T>
void Conv<T>::store_rows_nchw(const Pass& ps, const Acc* C, int64_t ldc, int64_t q0, int64_t rows,
                              int64_t grp, T* out, const T* bias) const {
  thread_local std::vector<Run> runs;
  grid_runs(q0, q0 + rows, ps.U, ps.V, &runs);
  for (int64_t co = 0; co < ps.Cout; ++co) {
    const Acc b = bias ? Num<T>::load(bias[grp * ps.Cout + co]) : Acc(0);
    for (const Run& r : runs) {
      T* dst = out_cell(ps, out, r.n, grp * ps.Cout + co, r.u, r.v);
      const Acc* src = C + r.at * ldc + co;
      for (int64_t i = 0; i < r.len; ++i)
        dst[i * ps.w_spacing * ps.os.w] = Num<T>::store(src[i * ldc] + b);
    }
  }
}

// NHWC tile C[row][co] (ldc) for grid positions q0 .. q0 + rows.
template <typename T>
void Conv<T>::store_nhwc(const Pass& ps, const Acc* C, int64_t ldc, int64_t q0, int64_t rows,
                         int64_t grp, T* out, const T* bias) const {
  int64_t n = q0 / (ps.U * ps.V), u = (q0 / ps.V) % ps.U, v = q0 % ps.V;
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = out_cell(ps, out, n, grp * ps.Cout, u, v);
    const Acc* src = C + r * ldc;
    for (int64_t co = 0; co < ps.Cout; ++co) {
      Acc b = bias ? Num<T>::load(bias[grp * ps.Cout + co]) : Acc(0);
      dst[co] = Num<T>::store(src[co] + b);
    }
    ps.next_position(&n, &u, &v);
  }
}

#define JAXCONV_INSTANTIATE(T)                                                                    \
  template void Conv<T>::store_nchw(const Pass& ps, const Acc* C, int64_t ldc,                    \
                                    const std::vector<Run>& runs, int64_t grp, T* out,            \
                                    const T* bias) const;                                         \
  template void Conv<T>::store_rows_nchw(const Pass& ps, const Acc* C, int64_t ldc, int64_t q0,   \
                                         int64_t rows, int64_t grp, T* out, const T* bias) const; \
  template void Conv<T>::store_nhwc(const Pass& ps, const Acc* C, int64_t ldc, int64_t q0,        \
                                    int64_t rows, int64_t grp, T* out, const T* bias) const;
JAXCONV_FOR_EACH_STORAGE_TYPE(JAXCONV_INSTANTIATE)
#undef JAXCONV_INSTANTIATE

}  // namespace jaxconv
