"""The memory-bound CUDA kernels under the host emulation: max pooling (NHWC channel vectors,
32-bit FastDivmod index math, the int64 path) and depthwise convolution, against the oracles
of reference.py (lax.reduce_window / the NumPy pooling loop, lax.conv_general_dilated), in all
dtypes and both layouts, plus a seeded fuzz over random geometries.

The kernels (ffi/cuda/*_kernels.cuh) compile with a host C++ compiler through
tests/cuda_emulation/emulate.h (see tests/test_cuda_build.py); skipped without a C++20
compiler or CUDA's headers. On a GPU the same kernels run for real in test_pool.py/test_conv.py.
"""
from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from reference import ref_max_pool2d, ref_max_pool2d_lax, tol

ROOT = Path(__file__).resolve().parents[1]
FFI_DIR = ROOT / "ffi"
EMU_DIR = Path(__file__).resolve().parent / "cuda_emulation"

DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}
NP_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
             "bfloat16": ml_dtypes.bfloat16}
DTYPES = list(DTYPE_CODES)
LAYOUT_CODES = {"NCHW": 0, "NHWC": 1}
VECTOR_WIDTH = {"float32": 4, "float64": 2, "float16": 8, "bfloat16": 8}  # 16 bytes
MAX_BLOCKS = 3  # each emulated launch runs at most 3 blocks; their grid-stride loops do the rest


def _cxx():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cuda_include():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, str(Path(nvcc).resolve().parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_bf16.h").exists():
            return str(Path(c) / "include")
    return None


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx, inc = _cxx(), _cuda_include()
    if cxx is None:
        pytest.skip("no C++ compiler")
    if inc is None:
        pytest.skip("CUDA headers not found (cuda_bf16.h); the emulation needs the half types")
    out = tmp_path_factory.mktemp("emu_dw_pool") / "k.so"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-fPIC", "-shared", "-I", str(FFI_DIR), "-I",
           inc, str(EMU_DIR / "pool_dw_kernels.cc"), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
    lib = ctypes.CDLL(str(out))
    return lib


def _vec(values):
    return (ctypes.c_int64 * len(values))(*values)


def _ptr(a):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def _buffer(shape, dtype, fill, misalign):
    """A C-contiguous array of `shape`, 16-byte aligned, or one element past an aligned start
    when `misalign` (so the kernels must take their element-wise lanes)."""
    dt = np.dtype(dtype)
    size = int(np.prod(shape))
    raw = np.full(size + 64, fill, dt)
    start = (-raw.ctypes.data % 16) // dt.itemsize
    start += 1 if misalign else 0
    out = raw[start:start + size].reshape(shape)
    assert (out.ctypes.data % 16 == 0) != misalign
    return out


# ---------------------------------------------------------------------------------------------
# FastDivmod and the index-width window helpers.

DIVISORS = [1, 2, 3, 5, 6, 7, 8, 9, 12, 25, 49, 64, 96, 100, 255, 256, 257, 1000, 4095, 65535,
            65536, 65537, 1 << 20, (1 << 20) + 1, 12345679, (1 << 30) - 1, 1 << 30, (1 << 30) + 1,
            (1 << 31) - 1]


@pytest.mark.parametrize("d", DIVISORS)
def test_fast_divmod_matches_division(emu, d):
    rng = np.random.default_rng(d)
    top = (1 << 31) - 1
    edges = [0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, top, top - 1, top - d, (top // d) * d,
             (top // d) * d - 1]
    n = np.concatenate([np.array([e for e in edges if 0 <= e <= top], np.uint32),
                        rng.integers(0, top + 1, 20000, dtype=np.uint32),
                        rng.integers(0, min(top, 64 * d) + 1, 2000, dtype=np.uint32)])
    q, r = np.zeros_like(n), np.zeros_like(n)
    u32 = lambda a: a.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))  # noqa: E731
    assert emu.emu_fast_divmod(ctypes.c_uint32(d), u32(n), ctypes.c_int64(n.size), u32(q),
                               u32(r)) == 0
    np.testing.assert_array_equal(q, n // np.uint32(d))
    np.testing.assert_array_equal(r, n % np.uint32(d))


def test_tap_helpers_match_brute_force(emu):
    out = (ctypes.c_int64 * 4)()
    for s in range(1, 5):
        for d in range(1, 4):
            for k in range(1, 5):
                for pad in range(0, 4):
                    n_in = 9
                    n_out = max(1, (n_in + 2 * pad - d * (k - 1) - 1) // s + 1)
                    for i in range(max(n_in, n_out)):
                        emu.emu_tap_helpers(*(ctypes.c_int64(v) for v in (i, s, pad, d, k, n_in,
                                                                         n_out)), out)
                        taps = [t for t in range(k) if 0 <= i * s - pad + t * d < n_in]
                        lo, hi = out[0], out[1]
                        assert list(range(lo, hi)) == taps or (not taps and hi <= lo), \
                            ("taps", i, s, d, k, pad, lo, hi)
                        if i < n_in:
                            spans = [o for o in range(n_out)
                                     if o * s - pad <= i <= o * s - pad + (k - 1) * d]
                            assert list(range(out[2], out[3])) == spans, \
                                ("covering", i, s, d, k, pad)


# ---------------------------------------------------------------------------------------------
# Max pooling.

# (N, C, H, W), kernel, stride, pads, dilation, ceil_mode. C spans vector-multiples (8, 16),
# partial vectors (3, 5, 9, 10: the last vector of each pixel holds C % V channels) and one
# channel; the geometries reach padding-only windows, ceil mode, dilation and strides past the
# kernel.
POOL_CASES = {
    "3x3s2_pad1_c8": ((2, 8, 7, 7), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), False),
    "2x2s2_ceil_c5": ((1, 5, 5, 5), (2, 2), (2, 2), ((0, 0), (0, 0)), (1, 1), True),
    "dilated_anisotropic_c3": ((2, 3, 6, 5), (3, 2), (1, 2), ((1, 1), (0, 1)), (2, 1), False),
    "window_only_padding_c9": ((1, 9, 2, 2), (2, 2), (1, 1), ((1, 1), (1, 1)), (3, 3), False),
    "many_blocks_c16": ((2, 16, 9, 9), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), False),
    "stride_past_kernel_c10": ((1, 10, 9, 8), (2, 3), (3, 4), ((1, 0), (1, 1)), (1, 2), True),
    "one_channel": ((3, 1, 6, 7), (3, 3), (2, 1), ((1, 1), (0, 1)), (1, 1), False),
}


def _pool_oracle(shape, kernel, stride, pads, dilation, ceil_mode, seed):
    """x: small integers (many ties) with one NaN, exact in every dtype; the NumPy loop's values
    and indices (NCHW), checked against lax.reduce_window's values where lax has the geometry
    (no ceil mode); dy and its scatter-add to those indices (float64)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, shape).astype(np.float64)
    x.flat[rng.integers(0, x.size)] = np.nan
    vals, idx = ref_max_pool2d(jnp.asarray(x), kernel, stride, pads, dilation, ceil_mode)
    if not ceil_mode:
        lax_vals = np.asarray(ref_max_pool2d_lax(jnp.asarray(x), kernel, stride, pads, dilation))
        np.testing.assert_array_equal(lax_vals, vals)
    dy = rng.integers(-4, 5, vals.shape) / 4.0
    n, c, h, w = shape
    dx = np.zeros((n, c, h * w))
    flat_idx, flat_dy = idx.reshape(n, c, -1), dy.reshape(n, c, -1)
    for ni in range(n):
        for ci in range(c):
            keep = flat_idx[ni, ci] >= 0
            np.add.at(dx[ni, ci], flat_idx[ni, ci][keep], flat_dy[ni, ci][keep])
    return x, np.asarray(vals), np.asarray(idx), dy, dx.reshape(shape)


def _check_pool(emu, case, layout, dtypes, index_bits_list, seed=1):
    shape, kernel, stride, pads, dilation, ceil_mode = case
    x, vals, idx, dy, dx = _pool_oracle(shape, kernel, stride, pads, dilation, ceil_mode, seed)
    if layout == "NHWC":
        x, vals, idx, dy, dx = (a.transpose(0, 2, 3, 1) for a in (x, vals, idx, dy, dx))
    attrs = _vec([*kernel, *stride, *dilation, pads[0][0], pads[0][1], pads[1][0], pads[1][1],
                  int(ceil_mode), LAYOUT_CODES[layout]])
    rtol, atol = tol("float32")
    for dtype in dtypes:
        code = DTYPE_CODES[dtype]
        for bits in index_bits_list:
            for misalign in (False, True):
                tag = f"{dtype} index_bits={bits} misaligned={misalign}"
                xa = _buffer(x.shape, NP_DTYPES[dtype], 0, misalign)
                xa[...] = x
                y = _buffer(vals.shape, NP_DTYPES[dtype], np.nan, misalign)
                got_idx = _buffer(vals.shape, np.int32, -7, misalign)
                assert emu.emu_pool_kernel(0, code, _vec(xa.shape), attrs, _ptr(xa), None,
                                           _ptr(y), _ptr(got_idx), bits, MAX_BLOCKS) == 0, tag
                np.testing.assert_array_equal(got_idx, idx, err_msg=tag)
                np.testing.assert_array_equal(y.astype(np.float64), vals, err_msg=tag)
                dya = _buffer(dy.shape, NP_DTYPES[dtype], 0, misalign)
                dya[...] = dy
                ia = _buffer(idx.shape, np.int32, 0, misalign)
                ia[...] = idx
                got_dx = _buffer(x.shape, NP_DTYPES[dtype], np.nan, misalign)
                assert emu.emu_pool_kernel(1, code, _vec(xa.shape), attrs, _ptr(dya), _ptr(ia),
                                           _ptr(got_dx), None, bits, MAX_BLOCKS) == 0, tag
                # dy and its sums are quarter-integers below 2^8: exact in every dtype
                np.testing.assert_allclose(got_dx.astype(np.float64), dx, rtol=rtol, atol=atol,
                                           err_msg=tag)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", sorted(POOL_CASES))
def test_emulated_pool_vector_kernels(emu, name, layout):
    _check_pool(emu, POOL_CASES[name], layout, DTYPES, (32, 64))


def test_pool_picks_the_32_bit_path_for_small_tensors(emu):
    """index_bits=0 goes through max_pool2d_forward/backward, which pick the int32 path here;
    an int32 request on a geometry past the 2^30-element bound is refused."""
    _check_pool(emu, POOL_CASES["3x3s2_pad1_c8"], "NHWC", ["bfloat16"], (0,))
    attrs = _vec([2, 2, 2, 2, 1, 1, 0, 0, 0, 0, 0, LAYOUT_CODES["NHWC"]])
    big = _vec([1 << 10, 1 << 10, 1 << 10, 2])  # 2^31 elements: never allocated, refused first
    assert emu.emu_pool_kernel(0, 0, big, attrs, None, None, None, None, 32, 1) == 1


def test_emulated_pool_fuzz(emu):
    """Seeded random geometries (layout, dtype, index width and alignment vary per draw)."""
    rng = np.random.default_rng(20261202)
    for draw in range(24):
        k = tuple(int(v) for v in rng.integers(1, 4, 2))
        s = tuple(int(v) for v in rng.integers(1, 4, 2))
        d = tuple(int(v) for v in rng.integers(1, 3, 2))
        pads = tuple((int(rng.integers(0, k[i] // 2 + 1)), int(rng.integers(0, k[i] // 2 + 1)))
                     for i in range(2))
        h, w = (int(v) for v in rng.integers(1, 10, 2))
        eff = [d[i] * (k[i] - 1) + 1 for i in range(2)]
        h, w = max(h, eff[0] - sum(pads[0])), max(w, eff[1] - sum(pads[1]))
        shape = (int(rng.integers(1, 3)), int(rng.integers(1, 19)), h, w)
        case = (shape, k, s, pads, d, bool(rng.integers(0, 2)))
        layout = ["NCHW", "NHWC"][draw % 2]
        dtype = DTYPES[draw % 4]
        _check_pool(emu, case, layout, [dtype], (32, 64)[draw % 2:draw % 2 + 1], seed=draw)
