"""The CUDA side, checked on machines without a GPU.

- The CUDA extension, where the package was built with nvcc, loads without a GPU or driver and
  registers exactly the CPU module's targets (skipped where it was not built).
- The index helpers the CUDA kernels take from ffi/geometry.h (reduction-index digits, stride
  phases of bwd_data, the outputs covering an input cell) against brute force, through a small
  C++ library compiled here.
- The CUDA kernels themselves (ffi/cuda/*_kernels.cuh, with the same host-side planning the
  handlers use) run under a host emulation of CUDA (tests/cuda_emulation/emulate.h: blocks in
  turn, threads as real threads, __syncthreads a real barrier, grid capped so each block loops
  over several tiles) against the oracles of reference.py. Needs a C++20 compiler and CUDA's
  headers (for the half types); skipped without them.

On a GPU the same kernels run for real in every other test file through the `backend` fixture.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import math
import os
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxconv import _ffi
from child import run_python
from reference import assert_close, ref_conv2d, ref_max_pool2d, tol

ROOT = Path(__file__).resolve().parents[1]
FFI_DIR = ROOT / "ffi"
EMU_DIR = Path(__file__).resolve().parent / "cuda_emulation"

# ---------------------------------------------------------------------------------------------
# The extension module.


def _cuda_module_built() -> bool:
    return importlib.util.find_spec("jaxconv._jaxconv_cuda") is not None


def test_cuda_module_registers_the_cpu_targets():
    if not _cuda_module_built():
        pytest.skip("jaxconv was built without the CUDA extension (no nvcc)")
    from jaxconv import _jaxconv_cpu, _jaxconv_cuda  # a broken build fails here
    assert _ffi.HAS_CUDA_MODULE
    cuda, cpu = _jaxconv_cuda.registrations(), _jaxconv_cpu.registrations()
    assert sorted(cuda) == sorted(cpu) == sorted(_ffi.TARGETS)
    assert all(type(c).__name__ == "PyCapsule" for c in cuda.values())


def test_import_registers_targets_without_a_gpu():
    """A fresh process imports jaxconv (registering the CUDA targets where the module exists,
    for a platform this jaxlib may not have) and still computes on CPU."""
    code = (
        "import jax, jax.numpy as jnp, jaxconv\n"
        "from jaxconv import _ffi\n"
        "x = jnp.arange(2 * 3 * 5 * 5, dtype=jnp.float32).reshape(2, 3, 5, 5)\n"
        "y = jaxconv.conv2d(x, jnp.ones((4, 3, 3, 3), jnp.float32), padding=1)\n"
        "assert y.shape == (2, 4, 5, 5), y.shape\n"
        "print(_ffi.HAS_CUDA_MODULE)\n")
    out = run_python("-c", code, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(_cuda_module_built())


# ---------------------------------------------------------------------------------------------
# Compiling the probes.


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


def _compile(sources, out: Path, flags):
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    cmd = [cxx, *flags, "-fPIC", "-shared", "-I", str(FFI_DIR), *map(str, sources), "-o",
           str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
    return ctypes.CDLL(str(out))


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    lib = _compile([EMU_DIR / "geometry_probe.cc"], tmp_path_factory.mktemp("probe") / "g.so",
                   ["-std=c++17", "-O1"])
    lib.probe_inverse_mod.restype = ctypes.c_int64
    return lib


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    inc = _cuda_include()
    if inc is None:
        pytest.skip("CUDA headers not found (cuda_bf16.h); the emulation needs the half types")
    return _compile([EMU_DIR / "kernels.cc"], tmp_path_factory.mktemp("emu") / "k.so",
                    ["-std=c++20", "-O1", "-pthread", "-I", inc])


def _vec(values):
    return (ctypes.c_int64 * len(values))(*values)


def _call(fn, *ints, n_out):
    out = (ctypes.c_int64 * n_out)()
    fn(*(ctypes.c_int64(v) for v in ints), out)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# geometry.h helpers against brute force.


def test_split_index_and_add_digits(probe):
    rng = np.random.default_rng(0)
    for _ in range(300):
        r1, r2 = (int(v) for v in rng.integers(1, 9, 2))
        k0, step, steps = int(rng.integers(0, 500)), int(rng.integers(1, 70)), int(
            rng.integers(0, 12))
        k = k0 + step * steps
        want = (k // (r1 * r2), (k // r2) % r1, k % r2)
        assert _call(probe.probe_split_index, k, r1, r2, n_out=3) == want
        assert _call(probe.probe_walk_digits, k0, step, steps, r1, r2, n_out=3) == want, \
            (k0, step, steps, r1, r2)


def test_phase_taps_are_the_taps_reaching_each_phase(probe):
    for s in range(1, 7):
        for d in range(1, 6):
            for pad in range(-4, 5):
                for k in range(1, 8):
                    for rho in range(s):
                        first, step, count = _call(probe.probe_phase_taps, rho, s, pad, d, k,
                                                   n_out=3)
                        taps = [t for t in range(k) if (rho + pad - t * d) % s == 0]
                        assert step == s // math.gcd(s, d)
                        assert [first + q * step for q in range(count)] == taps, \
                            (rho, s, pad, d, k)


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
                for pad in range(0, 3):
                    n_in = 9
                    n_out = max(1, (n_in + 2 * pad - d * (k - 1) - 1) // s + 1)
                    for i in range(n_in):
                        lo, hi = _call(probe.probe_covering_outputs, i, s, pad, d, k, n_out,
                                       n_out=2)
                        got = [o for o in range(lo, hi) if probe.probe_window_holds(
                            *(ctypes.c_int64(v) for v in (o, i, s, pad, d)))]
                        want = [o for o in range(n_out)
                                if any(o * s - pad + t * d == i for t in range(k))]
                        assert got == want, (i, s, d, k, pad)


# ---------------------------------------------------------------------------------------------
# The kernels under emulation.

DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}
NP_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
             "bfloat16": ml_dtypes.bfloat16}
LAYOUT_CODES = {"NCHW": 0, "NHWC": 1}
MAX_BLOCKS = 3  # each emulated launch runs at most 3 blocks; they loop over the rest


def _np(a, dtype):
    return np.ascontiguousarray(np.asarray(a).astype(NP_DTYPES[dtype]))


def _ptr(a):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def _sentinel(shape, dtype):
    """Outputs start as NaN so that a cell the kernel never writes fails the comparison."""
    return np.full(shape, np.nan, NP_DTYPES[dtype])


def _conv_attrs(c):
    (pt, pb), (pl, pr) = c["pads"]
    return [c["stride"][0], c["stride"][1], c["dilation"][0], c["dilation"][1], pt, pb, pl, pr,
            c["groups"], LAYOUT_CODES[c["layout"]]]


def _emu_conv(lib, which, c, x_shape, w_shape, a, b, bias, out_shape, dtype):
    out = _sentinel(out_shape, dtype)
    rc = lib.emu_conv(which, DTYPE_CODES[dtype], _vec(x_shape), _vec(w_shape),
                      _vec(_conv_attrs(c)), _ptr(a), _ptr(b), _ptr(bias), _ptr(out), MAX_BLOCKS)
    assert rc == 0, f"emu_conv returned {rc}"
    return out


def conv_case(n, c, h, w, o, k, *, stride=1, dilation=1, pads=0, groups=1):
    two = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    if isinstance(pads, int):
        pads = (pads, pads)
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in pads)
    return dict(n=n, c=c, h=h, w=w, o=o, k=two(k), stride=two(stride), dilation=two(dilation),
                pads=pads, groups=groups)


# Chosen to reach every path: both pass tiles (<= 16 and > 16 output channels per group) and
# several n tiles (> 64), several m tiles and k steps, groups and depthwise, strides with every
# gcd against the dilation (bwd_data phases and their tap spacing), negative pads, a stride past
# the image (fewer phases than the stride), a kernel larger than the image, and bwd_filter with
# its small and wide tiles, split into partial sums (the *_many_positions cases) or not.
CONV_CASES = {
    "3x3_pad1": conv_case(2, 3, 7, 7, 5, 3, pads=1),
    "wide_two_n_tiles_stride2": conv_case(1, 4, 9, 9, 70, 3, stride=2, pads=((1, 0), (0, 1))),
    "groups_dilation_negative_pads": conv_case(2, 4, 7, 8, 6, (3, 2), stride=(2, 1),
                                               dilation=(1, 2), pads=((-1, 2), (1, -2)),
                                               groups=2),
    "depthwise_stride2": conv_case(2, 6, 6, 6, 6, 3, stride=2, pads=1, groups=6),
    "1x1_many_positions": conv_case(4, 2, 16, 16, 3, 1),
    "3x3_many_positions": conv_case(2, 2, 16, 16, 3, 3, pads=1),
    "kernel_larger_than_image": conv_case(1, 3, 2, 2, 4, 5, pads=2),
    "stride_past_image": conv_case(2, 2, 3, 4, 3, 2, stride=(4, 3)),
    "stride2_dilation2": conv_case(1, 2, 11, 11, 3, 3, stride=2, dilation=2, pads=2),
    "stride3_dilation2": conv_case(1, 2, 11, 10, 3, 3, stride=3, dilation=2, pads=(2, 1)),
    "long_reduction_wide": conv_case(1, 20, 5, 5, 24, 3, pads=1),
}
DTYPES = ["float64", "float32", "float16", "bfloat16"]


def _grid_values(rng, shape):
    """Quarter-integers in [-1, 1]: exact in every dtype, so one float64 oracle serves all four
    (products and sums of them are exact in float32 too; only the final rounding differs)."""
    return jnp.asarray(rng.integers(-4, 5, shape) / 4.0, jnp.float64)


def _nhwc(a):
    return jnp.transpose(a, (0, 2, 3, 1))


def _hwio(w):
    return jnp.transpose(w, (2, 3, 1, 0))


@functools.lru_cache(maxsize=None)
def _conv_oracle(name):
    """Inputs and lax's results (NCHW, float64): y = conv(x, w) + bias, and at dy the VJP of
    the bias-free convolution, dx (plus bias_dx, the transposed convolution's bias) and dw."""
    c = CONV_CASES[name]
    rng = np.random.default_rng(0)
    x = _grid_values(rng, (c["n"], c["c"], c["h"], c["w"]))
    w = _grid_values(rng, (c["o"], c["c"] // c["groups"]) + c["k"])
    bias, bias_dx = _grid_values(rng, (c["o"],)), _grid_values(rng, (c["c"],))
    kw = dict(stride=c["stride"], padding=c["pads"], dilation=c["dilation"], groups=c["groups"])

    @jax.jit
    def oracle(x, w, bias, bias_dx, dy):
        y, vjp = jax.vjp(lambda x_, w_: ref_conv2d(x_, w_, **kw), x, w)
        dx, dw = vjp(dy)
        return y + bias.reshape(1, -1, 1, 1), dx + bias_dx.reshape(1, -1, 1, 1), dw

    y_shape = jax.eval_shape(lambda x, w: ref_conv2d(x, w, **kw), x, w).shape
    dy = _grid_values(rng, y_shape)
    y, dx, dw = oracle(x, w, bias, bias_dx, dy)
    return dict(x=x, w=w, bias=bias, bias_dx=bias_dx, dy=dy, y=y, dx=dx, dw=dw)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_emulated_conv_kernels(emu, name, layout):
    c = dict(CONV_CASES[name], layout=layout)
    r = _conv_oracle(name)
    acts = (lambda a: a) if layout == "NCHW" else _nhwc
    wgts = (lambda a: a) if layout == "NCHW" else _hwio
    x, dy, y, dx = (acts(r[k]) for k in ("x", "dy", "y", "dx"))
    w, dw = wgts(r["w"]), wgts(r["dw"])
    for dtype in DTYPES:
        xa, wa, ba, bxa, dya = (_np(a, dtype) for a in (x, w, r["bias"], r["bias_dx"], dy))
        got = _emu_conv(emu, 0, c, x.shape, w.shape, xa, wa, ba, y.shape, dtype)
        assert_close(jnp.asarray(got), y.astype(dtype), dtype)
        got = _emu_conv(emu, 1, c, x.shape, w.shape, dya, wa, bxa, x.shape, dtype)
        assert_close(jnp.asarray(got), dx.astype(dtype), dtype)
        got = _emu_conv(emu, 2, c, x.shape, w.shape, xa, dya, None, w.shape, dtype)
        assert_close(jnp.asarray(got), dw.astype(dtype), dtype)


@pytest.mark.parametrize("name, tile_bk, split", [("1x1_many_positions", 64, True),
                                                  ("3x3_many_positions", 16, True),
                                                  ("3x3_pad1", 16, False)])
def test_emulated_bwd_filter_split_plan(emu, name, tile_bk, split):
    """The *_many_positions cases above do split bwd_filter's reduction (small and wide tile)
    into partial sums covering the positions exactly, each at least 4 steps long; 3x3_pad1 has
    too few positions to split."""
    c = dict(CONV_CASES[name], layout="NCHW")
    xs, ws = (c["n"], c["c"], c["h"], c["w"]), (c["o"], c["c"]) + c["k"]
    positions = c["n"] * c["h"] * c["w"]  # stride 1, "same" padding
    plan = (ctypes.c_int64 * 4)()
    assert emu.emu_filter_plan(_vec(xs), _vec(ws), _vec(_conv_attrs(c)), 1, plan) == 0
    splits, chunk, tiles, ws_bytes = tuple(plan)
    assert (splits > 1) == split, tuple(plan)
    assert chunk % tile_bk == 0 and (chunk >= 4 * tile_bk or not split)
    assert splits * chunk >= positions > (splits - 1) * chunk
    assert ws_bytes == (splits * c["o"] * c["c"] * c["k"][0] * c["k"][1] * 8 if split else 0)


def test_emulated_bwd_filter_empty_batch(emu):
    c = dict(CONV_CASES["3x3_pad1"], layout="NCHW")
    xs, ws = (0, 3, 7, 7), (5, 3, 3, 3)
    dw = _emu_conv(emu, 2, c, xs, ws, np.zeros(xs), np.zeros((0, 5, 7, 7)), None, ws, "float64")
    assert np.array_equal(dw, np.zeros(ws))


# Pooling: (N, C, H, W), kernel, stride, pads, dilation, ceil_mode.
POOL_CASES = {
    "3x3s2_pad1": ((2, 3, 7, 7), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), False),
    "2x2s2_ceil": ((1, 2, 5, 5), (2, 2), (2, 2), ((0, 0), (0, 0)), (1, 1), True),
    "dilated_anisotropic": ((2, 2, 6, 5), (3, 2), (1, 2), ((1, 1), (0, 1)), (2, 1), False),
    "window_only_padding": ((1, 2, 2, 2), (2, 2), (1, 1), ((1, 1), (1, 1)), (3, 3), False),
    "many_blocks": ((4, 8, 12, 12), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), False),
}


@functools.lru_cache(maxsize=None)
def _pool_oracle(name):
    """x: small integers (many ties) with one NaN, exact in every dtype; the NumPy loop's values
    and indices (NCHW); dy and its scatter-add to those indices (float64)."""
    shape, kernel, stride, pads, dilation, ceil_mode = POOL_CASES[name]
    rng = np.random.default_rng(1)
    x = rng.integers(-3, 4, shape).astype(np.float64)
    x.flat[rng.integers(0, x.size)] = np.nan
    vals, idx = ref_max_pool2d(jnp.asarray(x), kernel, stride, pads, dilation, ceil_mode)
    dy = rng.integers(-4, 5, vals.shape) / 4.0
    n, c, h, w = shape
    dx = np.zeros((n, c, h * w))
    flat_idx, flat_dy = idx.reshape(n, c, -1), dy.reshape(n, c, -1)
    for ni in range(n):
        for ci in range(c):
            keep = flat_idx[ni, ci] >= 0
            np.add.at(dx[ni, ci], flat_idx[ni, ci][keep], flat_dy[ni, ci][keep])
    return x, vals, idx, dy, dx.reshape(shape)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", sorted(POOL_CASES))
def test_emulated_pool_kernels(emu, name, layout):
    _, kernel, stride, pads, dilation, ceil_mode = POOL_CASES[name]
    x, vals, idx, dy, dx = _pool_oracle(name)
    if layout == "NHWC":
        x, vals, idx, dy, dx = (a.transpose(0, 2, 3, 1) for a in (x, vals, idx, dy, dx))
    attrs = _vec([*kernel, *stride, *dilation, pads[0][0], pads[0][1], pads[1][0], pads[1][1],
                  int(ceil_mode), LAYOUT_CODES[layout]])
    idx = np.ascontiguousarray(idx)
    for dtype in DTYPES:
        xa, dya = _np(x, dtype), _np(dy, dtype)
        y, got_idx = _sentinel(vals.shape, dtype), np.full(vals.shape, -7, np.int32)
        assert emu.emu_pool(0, DTYPE_CODES[dtype], _vec(xa.shape), attrs, _ptr(xa), None,
                            _ptr(y), _ptr(got_idx), MAX_BLOCKS) == 0
        np.testing.assert_array_equal(got_idx, idx, err_msg=dtype)
        # exact, with NaN where the oracle has it
        np.testing.assert_array_equal(y.astype(np.float64), vals, err_msg=dtype)
        got_dx = _sentinel(xa.shape, dtype)
        assert emu.emu_pool(1, DTYPE_CODES[dtype], _vec(xa.shape), attrs, _ptr(dya), _ptr(idx),
                            _ptr(got_dx), None, MAX_BLOCKS) == 0
        rtol, atol = tol(dtype)
        np.testing.assert_allclose(got_dx.astype(np.float64), dx, rtol=rtol, atol=atol,
                                   err_msg=dtype)
