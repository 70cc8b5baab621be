"""The index helpers of ffi/geometry.h (shared by the CPU and CUDA kernels: reduction-index
digits, stride phases of bwd_data, the outputs covering an input cell, a window's taps inside
the input and the outputs a tap reaches) against brute force, through a small C++ library
compiled here (tests/cuda_emulation/geometry_probe.cc)."""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest

from emulation import EMU_DIR, call, compile_library

pytestmark = pytest.mark.slow(
    "builds a CUDA host-emulation library (a C++ compile of tens of "
    "seconds per worker), then emulates kernels thread by thread"
)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    lib = compile_library(
        [EMU_DIR / "geometry_probe.cc"],
        tmp_path_factory.mktemp("probe") / "g.so",
        ["-std=c++17", "-O1"],
    )
    lib.probe_inverse_mod.restype = ctypes.c_int64
    return lib


def test_split_index_and_add_digits(probe):
    rng = np.random.default_rng(0)
    for _ in range(300):
        r1, r2 = (int(v) for v in rng.integers(1, 9, 2))
        k0, step, steps = (
            int(rng.integers(0, 500)),
            int(rng.integers(1, 70)),
            int(rng.integers(0, 12)),
        )
        k = k0 + step * steps
        want = (k // (r1 * r2), (k // r2) % r1, k % r2)
        assert call(probe.probe_split_index, k, r1, r2, n_out=3) == want
        assert call(probe.probe_walk_digits, k0, step, steps, r1, r2, n_out=3) == want, (
            k0,
            step,
            steps,
            r1,
            r2,
        )


def test_phase_taps_are_the_taps_reaching_each_phase(probe):
    for s in range(1, 7):
        for d in range(1, 6):
            for pad in range(-4, 5):
                for k in range(1, 8):
                    for rho in range(s):
                        first, step, count = call(
                            probe.probe_phase_taps, rho, s, pad, d, k, n_out=3
                        )
                        taps = [t for t in range(k) if (rho + pad - t * d) % s == 0]
                        assert step == s // math.gcd(s, d)
                        assert [first + q * step for q in range(count)] == taps, (rho, s, pad, d, k)


def test_bwd_data_phase_axis_is_the_transposed_conv_by_phase(probe):
    # dx position i reads dy position o = (i + pad - t*d) / s through tap t when the division
    # is exact and o is any integer (range checks are the kernels'). Phase rho's axis must give
    # exactly the (i, t, o) of its dx positions, taps in increasing order; its companions the
    # phases that hold a dx position and the most taps a phase has.
    for s in range(1, 6):
        for d in range(1, 5):
            for pad in range(-3, 5):
                for k in range(1, 7):
                    for size in (1, 2, 5, 9):
                        counts, nonempty = [], 0
                        for rho in range(s):
                            axis = (rho, s, pad, d, k, size)
                            out0, out_step, in0, in_q, first, step, count, rows, phases, slots = (
                                call(probe.probe_bwd_data_phase_axis, *axis, n_out=10)
                            )
                            want = [
                                (i, t, (i + pad - t * d) // s)
                                for i in range(rho, size, s)
                                for t in range(k)
                                if (i + pad - t * d) % s == 0
                            ]
                            got = [
                                (out0 + out_step * u, first + q * step, u + in0 + q * in_q)
                                for u in range(rows)
                                for q in range(count)
                            ]
                            assert got == want, axis
                            assert (out0, out_step) == (rho, s)
                            counts.append(count)
                            nonempty += rows > 0
                        assert phases == nonempty and slots == max(counts), (s, d, pad, k, size)


def test_inverse_mod(probe):
    for m in range(1, 40):
        for a in range(m):
            if math.gcd(a, m) == 1:
                inv = probe.probe_inverse_mod(ctypes.c_int64(a), ctypes.c_int64(m))
                assert 0 <= inv < m and (a * inv) % m == 1 % m, (a, m)


def test_covering_outputs_are_the_windows_holding_a_cell(probe):
    for s in range(1, 5):
        for d in range(1, 4):
            for k in range(1, 5):
                for pad in range(3):
                    n_in = 9
                    n_out = max(1, (n_in + 2 * pad - d * (k - 1) - 1) // s + 1)
                    for i in range(n_in):
                        lo, hi = call(probe.probe_covering_outputs, i, s, pad, d, k, n_out, n_out=2)
                        got = [
                            o
                            for o in range(lo, hi)
                            if probe.probe_window_holds(
                                *(ctypes.c_int64(v) for v in (o, i, s, pad, d))
                            )
                        ]
                        want = [
                            o
                            for o in range(n_out)
                            if any(o * s - pad + t * d == i for t in range(k))
                        ]
                        assert got == want, (i, s, d, k, pad)


def test_window_taps_and_tap_outputs_are_inverse(probe):
    # window_taps(o): the taps of output o inside the input; tap_outputs(t): the outputs whose
    # tap t is inside. Both against brute force, padding on both sides, strides, dilations.
    for s in range(1, 4):
        for d in range(1, 4):
            for k in range(1, 5):
                for pad_lo, pad_hi in ((0, 0), (1, 2), (3, 0), (2, 2)):
                    n_in = 8
                    n_out = (n_in + pad_lo + pad_hi - d * (k - 1) - 1) // s + 1
                    if n_out <= 0:
                        continue
                    inside = {
                        (o, t)
                        for o in range(n_out)
                        for t in range(k)
                        if 0 <= o * s - pad_lo + t * d < n_in
                    }
                    for o in range(n_out):
                        lo, hi = call(probe.probe_window_taps, o, s, pad_lo, d, k, n_in, n_out=2)
                        assert list(range(lo, hi)) == [t for t in range(k) if (o, t) in inside]
                    for t in range(k):
                        lo, hi = call(
                            probe.probe_tap_outputs, t, s, pad_lo, d, n_in, n_out, n_out=2
                        )
                        assert list(range(lo, hi)) == [
                            o for o in range(n_out) if (o, t) in inside
                        ], (t, s, d, k, pad_lo)


# ---------------------------------------------------------------------------------------------
# The kernels under emulation.
