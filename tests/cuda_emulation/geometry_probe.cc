// C entry points onto the index helpers of ffi/geometry.h (CUDA and CPU kernels use them), for
// tests/test_geometry.py (loaded with ctypes, compared there against brute force).
// Plain C++: needs no CUDA headers.
#include "geometry.h"

extern "C" {

void probe_split_index(int64_t k, int64_t r1, int64_t r2, int64_t* digits) {
  jaxconv::Digits3 d = jaxconv::split_index(k, r1, r2);
  digits[0] = d.a;
  digits[1] = d.b;
  digits[2] = d.c;
}

// Digits of k after `steps` additions of `step`, starting from split_index(k0).
void probe_walk_digits(int64_t k0, int64_t step, int64_t steps, int64_t r1, int64_t r2,
                       int64_t* digits) {
  jaxconv::Digits3 d = jaxconv::split_index(k0, r1, r2);
  const jaxconv::Digits3 s = jaxconv::split_index(step, r1, r2);
  for (int64_t i = 0; i < steps; ++i) d = jaxconv::add_digits(d, s, r1, r2);
  digits[0] = d.a;
  digits[1] = d.b;
  digits[2] = d.c;
}

void probe_phase_taps(int64_t rho, int64_t stride, int64_t pad_lo, int64_t dilation, int64_t k,
                      int64_t* out) {
  jaxconv::PhaseTaps t = jaxconv::phase_taps(rho, stride, pad_lo, dilation, k);
  out[0] = t.first;
  out[1] = t.step;
  out[2] = t.count;
}

int64_t probe_inverse_mod(int64_t a, int64_t m) { return jaxconv::inverse_mod(a, m); }

void probe_covering_outputs(int64_t i, int64_t stride, int64_t pad_lo, int64_t dilation, int64_t k,
                            int64_t out, int64_t* range) {
  jaxconv::OutputRange r = jaxconv::covering_outputs(i, stride, pad_lo, dilation, k, out);
  range[0] = r.lo;
  range[1] = r.hi;
}

int probe_window_holds(int64_t o, int64_t i, int64_t stride, int64_t pad_lo, int64_t dilation) {
  return jaxconv::window_holds(o, i, stride, pad_lo, dilation) ? 1 : 0;
}

void probe_window_taps(int64_t o, int64_t stride, int64_t pad_lo, int64_t dilation, int64_t k,
                       int64_t in, int64_t* range) {
  jaxconv::TapRange r = jaxconv::window_taps(o, stride, pad_lo, dilation, k, in);
  range[0] = r.lo;
  range[1] = r.hi;
}

void probe_tap_outputs(int64_t t, int64_t stride, int64_t pad_lo, int64_t dilation, int64_t in,
                       int64_t out, int64_t* range) {
  jaxconv::OutputRange r = jaxconv::tap_outputs(t, stride, pad_lo, dilation, in, out);
  range[0] = r.lo;
  range[1] = r.hi;
}

// bwd_data_phase_axis(rho, ...) and its companions: out = {out0, out_step, in0, in_q, first,
// step, count, rows (bwd_data_phase_rows), phases (bwd_data_phases), tap slots
// (bwd_data_tap_slots)}.
void probe_bwd_data_phase_axis(int64_t rho, int64_t stride, int64_t pad_lo, int64_t dilation,
                               int64_t k, int64_t size, int64_t* out) {
  const jaxconv::BwdDataPhaseAxis a =
      jaxconv::bwd_data_phase_axis(rho, stride, pad_lo, dilation, k);
  const int64_t v[] = {a.out0,
                       a.out_step,
                       a.in0,
                       a.in_q,
                       a.first,
                       a.step,
                       a.count,
                       jaxconv::bwd_data_phase_rows(rho, stride, size),
                       jaxconv::bwd_data_phases(stride, size),
                       jaxconv::bwd_data_tap_slots(stride, dilation, k)};
  for (int i = 0; i < 10; ++i) out[i] = v[i];
}
}  // extern "C"
