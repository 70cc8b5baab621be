"""The CUDA side, checked on machines without a GPU.

- The CUDA extension, where the package was built with nvcc, loads without a GPU or driver and
  registers exactly the CPU module's targets (skipped where it was not built).
- The index helpers the CUDA kernels take from ffi/geometry.h (reduction-index digits, stride
  phases of bwd_data, the outputs covering an input cell) against brute force, through a small
  C++ library compiled here.
- The CUDA kernels themselves (ffi/cuda/*_kernels.cuh, with the same host-side planning the
  handlers use) run under a host emulation of CUDA (tests/cuda_emulation/emulate.h: blocks in
  turn, threads as real threads, __syncthreads a real barrier, grid capped so each block loops
  over several tiles) against the oracles of reference.py. Warps are 32 of those threads that
  meet in every warp-level operation (tests/cuda_emulation/warp.h: mma.sync, ldmatrix,
  shuffles with the PTX ISA layouts, cp.async landing at its wait), so the tensor-core pass runs
  there too, and a build with a wrong fragment layout must fail. Needs a C++20 compiler and
  CUDA's headers (for the half types); skipped without them.

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
                    inside = {(o, t) for o in range(n_out) for t in range(k)
                              if 0 <= o * s - pad_lo + t * d < n_in}
                    for o in range(n_out):
                        lo, hi = _call(probe.probe_window_taps, o, s, pad_lo, d, k, n_in,
                                       n_out=2)
                        assert list(range(lo, hi)) == [t for t in range(k) if (o, t) in inside]
                    for t in range(k):
                        lo, hi = _call(probe.probe_tap_outputs, t, s, pad_lo, d, n_in, n_out,
                                       n_out=2)
                        assert list(range(lo, hi)) == [o for o in range(n_out)
                                                       if (o, t) in inside], (t, s, d, k, pad_lo)


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


def _emu_conv(lib, which, c, x_shape, w_shape, a, b, bias, out_shape, dtype, *,
              tensor_cores=False, allow_tf32=False, force_tile=0):
    """tensor_cores / allow_tf32: the handlers' PassOptions (sm_80+, the allow_tf32
    attribute); force_tile MMA_LARGE / MMA_SMALL runs forward or bwd_data on that
    tensor-core tile whatever the shape."""
    out = _sentinel(out_shape, dtype)
    rc = lib.emu_conv(which, DTYPE_CODES[dtype], _vec(x_shape), _vec(w_shape),
                      _vec(_conv_attrs(c)), _ptr(a), _ptr(b), _ptr(bias), _ptr(out),
                      MAX_BLOCKS, int(tensor_cores), int(allow_tf32), int(force_tile))
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
    c = ALL_CONV_CASES[name]
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
    """The kernels as a device without tensor cores runs them (every dtype on SIMT)."""
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
    plan = (ctypes.c_int64 * 5)()
    assert emu.emu_filter_plan(_vec(xs), _vec(ws), _vec(_conv_attrs(c)), 1, 0, 0, plan) == 0
    splits, chunk, tiles, ws_bytes, _ = tuple(plan)
    assert (splits > 1) == split, tuple(plan)
    assert chunk % tile_bk == 0 and (chunk >= 4 * tile_bk or not split)
    assert splits * chunk >= positions > (splits - 1) * chunk
    assert ws_bytes == (splits * c["o"] * c["c"] * c["k"][0] * c["k"][1] * 8 if split else 0)


def test_emulated_bwd_filter_empty_batch(emu):
    c = dict(CONV_CASES["3x3_pad1"], layout="NCHW")
    xs, ws = (0, 3, 7, 7), (5, 3, 3, 3)
    dw = _emu_conv(emu, 2, c, xs, ws, np.zeros(xs), np.zeros((0, 5, 7, 7)), None, ws, "float64")
    assert np.array_equal(dw, np.zeros(ws))


# ---------------------------------------------------------------------------------------------
# The tensor-core pass (ffi/cuda/conv2d_mma.cuh) under the warp-level emulation (warp.h).

MMA_LARGE, MMA_SMALL = 2, 3  # emu_pass_kernel codes: 0 SIMT wide, 1 SIMT tall
MMA_LARGE_INT64, MMA_SMALL_INT64 = 4, 5  # emu_conv's force_tile: the same with int64 offsets
MMA_DTYPES = ["float32", "float16", "bfloat16"]  # float32 as TF32

# Each case names the load paths it reaches (16-byte cp.async where a chunk's 8 (16-bit) or 4
# (float32) elements are consecutive, element gathers otherwise) and has partial tiles in m and
# n, several k stages and, through bwd_data, stride phases. Channel counts: 16 and 24 are
# multiples of both vectors, 20 only of the float32 one, 70 and 6 of neither.
MMA_CASES = {
    # NHWC: A vector; forward B k-major (HWIO along channels) vector; bwd_data B vector.
    "mma_c16_o24_3x3": conv_case(2, 16, 5, 7, 24, 3, pads=1),
    # NHWC: A vector for float32 only; B k-major gathered (70 channels): several n tiles.
    "mma_c20_o70_stride2": conv_case(1, 20, 9, 8, 70, 3, stride=2, pads=((1, 0), (0, 1))),
    # groups of 16 in / 24 out channels, dilation and negative pads; bwd_data phases with gcd 1.
    "mma_groups_dilated": conv_case(2, 32, 7, 8, 48, (3, 2), stride=(2, 1), dilation=(1, 2),
                                    pads=((-1, 2), (1, -2)), groups=2),
    # stride 3 with dilation 2: bwd_data phases with 2 tap slots; odd channels: all gathered.
    "mma_odd_channels_phases": conv_case(1, 6, 11, 10, 18, 3, stride=3, dilation=2,
                                         pads=(2, 1)),
    # 1x1 over many positions: several m tiles of both sizes; NCHW forward B vector (K = 40).
    "mma_1x1_many_rows": conv_case(3, 40, 9, 9, 16, 1),
}
# bwd_filter on tensor cores, besides MMA_CASES: positions enough for a split reduction, with
# OH * OW = 64 (NCHW dy loads as 16-byte chunks of positions), and groups of 24 in / 72 out
# channels (both sides past 64: the tile the shape class would choose is 128 x 128).
MMA_FILTER_CASES = {
    "mma_filter_split": conv_case(4, 16, 16, 16, 24, 3, pads=1),
    "mma_filter_wide_groups": conv_case(2, 48, 8, 8, 144, 3, pads=1, groups=2),
}
ALL_CONV_CASES = {**CONV_CASES, **MMA_CASES, **MMA_FILTER_CASES}


def _conv_inputs(name, layout):
    r = _conv_oracle(name)
    acts = (lambda a: a) if layout == "NCHW" else _nhwc
    wgts = (lambda a: a) if layout == "NCHW" else _hwio
    return r, acts, wgts


@pytest.mark.parametrize("tile", [MMA_LARGE, MMA_SMALL], ids=["128x128", "64x64"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", sorted(MMA_CASES))
def test_emulated_mma_pass(emu, name, layout, tile):
    """Forward and bwd_data on both tensor-core tiles, every mma dtype, against lax. Values
    are quarter-integers, exact in bf16/f16/TF32, so only the final rounding may differ."""
    c = dict(MMA_CASES[name], layout=layout)
    r, acts, wgts = _conv_inputs(name, layout)
    x, dy, y, dx = (acts(r[k]) for k in ("x", "dy", "y", "dx"))
    w = wgts(r["w"])
    for dtype in MMA_DTYPES:
        xa, wa, ba, bxa, dya = (_np(a, dtype) for a in (x, w, r["bias"], r["bias_dx"], dy))
        got = _emu_conv(emu, 0, c, x.shape, w.shape, xa, wa, ba, y.shape, dtype,
                        force_tile=tile)
        assert_close(jnp.asarray(got), y.astype(dtype), dtype)
        got = _emu_conv(emu, 1, c, x.shape, w.shape, dya, wa, bxa, x.shape, dtype,
                        force_tile=tile)
        assert_close(jnp.asarray(got), dx.astype(dtype), dtype)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", ["long_reduction_wide", "wide_two_n_tiles_stride2",
                                  "depthwise_stride2", "mma_c16_o24_3x3"])
def test_emulated_conv_on_a_tensor_core_device(emu, name, layout):
    """The handlers' dispatch on sm_80+ with TF32 allowed: every dtype through
    choose_pass_kernel (tensor cores where the shape class qualifies, SIMT for the rest and
    for float64)."""
    c = dict(ALL_CONV_CASES[name], layout=layout)
    r, acts, wgts = _conv_inputs(name, layout)
    x, dy, y, dx = (acts(r[k]) for k in ("x", "dy", "y", "dx"))
    w = wgts(r["w"])
    for dtype in DTYPES:
        xa, wa, ba, bxa, dya = (_np(a, dtype) for a in (x, w, r["bias"], r["bias_dx"], dy))
        got = _emu_conv(emu, 0, c, x.shape, w.shape, xa, wa, ba, y.shape, dtype,
                        tensor_cores=True, allow_tf32=True)
        assert_close(jnp.asarray(got), y.astype(dtype), dtype)
        got = _emu_conv(emu, 1, c, x.shape, w.shape, dya, wa, bxa, x.shape, dtype,
                        tensor_cores=True, allow_tf32=True)
        assert_close(jnp.asarray(got), dx.astype(dtype), dtype)


def _filter_plan(lib, c, dtype, *, tensor_cores=True, allow_tf32=True):
    """{splits, chunk, tiles, workspace bytes, kernel} of bwd_filter (emu_filter_plan)."""
    xs, ws = _layout_shapes(c)
    plan = (ctypes.c_int64 * 5)()
    assert lib.emu_filter_plan(_vec(xs), _vec(ws), _vec(_conv_attrs(c)), DTYPE_CODES[dtype],
                               int(tensor_cores), int(allow_tf32), plan) == 0
    return dict(zip(("splits", "chunk", "tiles", "ws_bytes", "kernel"), tuple(plan)))


def _layout_shapes(c):
    xs, ws = (c["n"], c["c"], c["h"], c["w"]), (c["o"], c["c"] // c["groups"]) + c["k"]
    if c.get("layout", "NCHW") == "NHWC":
        xs, ws = (xs[0], xs[2], xs[3], xs[1]), ws[2:] + (ws[1], ws[0])
    return xs, ws


@pytest.mark.parametrize("tile", [MMA_LARGE, MMA_SMALL], ids=["128x128", "64x64"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", sorted({**MMA_CASES, **MMA_FILTER_CASES}))
def test_emulated_mma_bwd_filter(emu, name, layout, tile):
    """bwd_filter on both tensor-core tiles, every mma dtype, against lax's float64 dw. Values
    are quarter-integers, so the products and partial sums are exact and only the final
    rounding may differ; the split cases check the float32 partial sums too."""
    c = dict(ALL_CONV_CASES[name], layout=layout)
    r, acts, wgts = _conv_inputs(name, layout)
    x, dy, w, dw = acts(r["x"]), acts(r["dy"]), wgts(r["w"]), wgts(r["dw"])
    for dtype in MMA_DTYPES:
        got = _emu_conv(emu, 2, c, x.shape, w.shape, _np(x, dtype), _np(dy, dtype), None,
                        w.shape, dtype, force_tile=tile)
        assert_close(jnp.asarray(got), dw.astype(dtype), dtype)


def test_emulated_mma_bwd_filter_splits(emu):
    """The split case does split on tensor cores (16 and 32 positions per step), each split at
    least 4 steps, and the NCHW case with OH * OW = 64 takes the 16-byte dy loads."""
    for layout in ("NCHW", "NHWC"):
        c = dict(MMA_FILTER_CASES["mma_filter_split"], layout=layout)
        for dtype, bk in (("float32", 16), ("bfloat16", 32)):
            plan = _filter_plan(emu, c, dtype)
            assert plan["kernel"] == MMA_SMALL, plan
            assert plan["splits"] > 1 and plan["chunk"] % bk == 0 and plan["chunk"] >= 4 * bk
            assert plan["ws_bytes"] == plan["splits"] * 24 * 16 * 9 * 4  # float32 partials


def test_filter_kernel_choice_by_shape_class(emu):
    """choose_filter_kernel: tensor cores for bf16/f16 and TF32-allowed float32 with >= 16 values
    per group on both dW sides, the 128 x 128 tile when both exceed 64; SIMT otherwise."""
    big = dict(conv_case(8, 256, 14, 14, 256, 3, pads=1), layout="NHWC")
    small = dict(MMA_CASES["mma_c16_o24_3x3"], layout="NHWC")
    few_outputs = dict(CONV_CASES["3x3_many_positions"], layout="NCHW")  # dW 3 x 18 per group
    tiny = dict(CONV_CASES["1x1_many_positions"], layout="NCHW")  # dW 3 x 2
    assert _filter_plan(emu, big, "bfloat16")["kernel"] == MMA_LARGE
    assert _filter_plan(emu, big, "float16")["kernel"] == MMA_LARGE
    assert _filter_plan(emu, big, "float32")["kernel"] == MMA_LARGE
    assert _filter_plan(emu, small, "bfloat16")["kernel"] == MMA_SMALL
    assert _filter_plan(emu, big, "float32", allow_tf32=False)["kernel"] == 0  # SIMT wide
    assert _filter_plan(emu, big, "float64")["kernel"] == 0
    assert _filter_plan(emu, big, "bfloat16", tensor_cores=False)["kernel"] == 0
    assert _filter_plan(emu, few_outputs, "bfloat16")["kernel"] == 0  # < 16 rows: SIMT wide
    assert _filter_plan(emu, tiny, "bfloat16")["kernel"] == 1  # SIMT 16 x 16


def test_emulated_bwd_filter_tf32_rounds_float32_operands(emu):
    """With allow_tf32, float32 bwd_filter multiplies TF32-rounded operands on tensor cores;
    without it the same call runs the SIMT kernel in full float32."""
    c = dict(MMA_FILTER_CASES["mma_filter_split"], layout="NHWC")
    xs, ws = _layout_shapes(c)
    rng = np.random.default_rng(4)
    x = rng.standard_normal(xs).astype(np.float32)
    w0 = np.zeros(ws, np.float64)
    kw = dict(padding=c["pads"], layout="NHWC")
    y, vjp = jax.vjp(lambda w_: ref_conv2d(jnp.asarray(x, jnp.float64), w_, **kw), w0)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    want = np.asarray(vjp(jnp.asarray(dy, jnp.float64))[0])
    tf32 = _emu_conv(emu, 2, c, xs, ws, x, dy, None, ws, "float32", tensor_cores=True,
                     allow_tf32=True)
    full = _emu_conv(emu, 2, c, xs, ws, x, dy, None, ws, "float32", tensor_cores=True,
                     allow_tf32=False)
    scale = np.abs(want).max()
    tf32_err, full_err = np.abs(tf32 - want).max() / scale, np.abs(full - want).max() / scale
    assert full_err < 1e-5, full_err
    assert 1e-5 < tf32_err < 5e-3, tf32_err


@pytest.mark.parametrize("name, layout", [("mma_c16_o24_3x3", "NHWC"),
                                          ("mma_odd_channels_phases", "NCHW"),
                                          ("mma_filter_split", "NCHW")])
def test_emulated_mma_int64_offsets(emu, name, layout):
    """The int64-offset instantiations of the tensor-core kernels (used when an operand has
    2^31 elements or more) compute the same bits as the int32 ones, in all three directions;
    the int32 ones are checked against lax above."""
    c = dict(ALL_CONV_CASES[name], layout=layout)
    r, acts, wgts = _conv_inputs(name, layout)
    x, dy, y, dx = (acts(r[k]) for k in ("x", "dy", "y", "dx"))
    w, dw = wgts(r["w"]), wgts(r["dw"])
    for dtype in MMA_DTYPES:
        xa, wa, ba, bxa, dya = (_np(a, dtype) for a in (x, w, r["bias"], r["bias_dx"], dy))
        calls = [(0, xa, wa, ba, y), (1, dya, wa, bxa, dx), (2, xa, dya, None, dw)]
        for tile32, tile64 in ((MMA_LARGE, MMA_LARGE_INT64), (MMA_SMALL, MMA_SMALL_INT64)):
            for which, a, b, bias, want in calls:
                got32, got64 = (_emu_conv(emu, which, c, x.shape, w.shape, a, b, bias,
                                          want.shape, dtype, force_tile=t)
                                for t in (tile32, tile64))
                assert_close(jnp.asarray(got64), want.astype(dtype), dtype)
                np.testing.assert_array_equal(got64.view(np.uint8), got32.view(np.uint8),
                                              err_msg=f"{which} {dtype} tile {tile64}")


def test_mma_offset_width_by_operand_size(emu):
    """mma_index32: int32 offsets while every operand of the direction has fewer than 2^31
    elements, int64 from 2^31 (shapes only; nothing is allocated)."""
    def width(which, x_shape, w_shape, pads=1):
        attrs = _vec([1, 1, 1, 1, pads, pads, pads, pads, 1, 0])
        return emu.emu_mma_index32(which, _vec(x_shape), _vec(w_shape), attrs)

    below, at = (1, 256, 2048, 4095), (1, 256, 2048, 4096)  # 2^31 - 2^19 and 2^31 elements
    w = (256, 256, 3, 3)
    for which in (0, 1, 2):  # y and dy have x's size ("same" padding)
        assert width(which, below, w) == 1
        assert width(which, at, w) == 0
    # Only y / dy past 2^31 (x has 2^27 elements): every direction touches it.
    small_x, wide_w = (1, 16, 2048, 4096), (2048, 16, 1, 1)  # y: 2^34 elements
    for which in (0, 1, 2):
        assert width(which, small_x, wide_w, pads=0) == 0


def _pass_kernel(lib, which, c, dtype, *, tensor_cores=True, allow_tf32=True):
    xs = (c["n"], c["c"], c["h"], c["w"])
    ws = (c["o"], c["c"] // c["groups"]) + c["k"]
    return lib.emu_pass_kernel(which, DTYPE_CODES[dtype], _vec(xs), _vec(ws),
                               _vec(_conv_attrs(dict(c, layout="NCHW"))), int(tensor_cores),
                               int(allow_tf32))


def test_pass_kernel_choice_by_shape_class(emu):
    big = conv_case(64, 256, 56, 56, 256, 3, pads=1)  # 1568 tiles of 128 x 128
    small = CONV_CASES["long_reduction_wide"]
    depthwise = CONV_CASES["depthwise_stride2"]
    assert _pass_kernel(emu, 0, big, "bfloat16") == MMA_LARGE
    assert _pass_kernel(emu, 1, big, "float16") == MMA_LARGE
    assert _pass_kernel(emu, 0, small, "bfloat16") == MMA_SMALL
    assert _pass_kernel(emu, 0, big, "float32") == MMA_LARGE  # TF32 allowed
    assert _pass_kernel(emu, 0, big, "float32", allow_tf32=False) == 0  # full float32: SIMT
    assert _pass_kernel(emu, 0, big, "float64") == 0
    assert _pass_kernel(emu, 0, big, "bfloat16", tensor_cores=False) == 0  # before sm_80
    assert _pass_kernel(emu, 0, depthwise, "bfloat16") == 1  # 1 channel per group: SIMT tall


def test_emulated_tf32_rounds_float32_operands(emu):
    """With allow_tf32 the float32 forward multiplies TF32-rounded operands (errors far above
    float32's, within TF32's); without it the same call is float32-exact to rounding."""
    c = dict(MMA_CASES["mma_c16_o24_3x3"], layout="NHWC")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((c["n"], c["h"], c["w"], c["c"])).astype(np.float32)
    w = rng.standard_normal(c["k"] + (c["c"], c["o"])).astype(np.float32)
    want = np.asarray(ref_conv2d(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64),
                                 padding=c["pads"], layout="NHWC"))
    tf32 = _emu_conv(emu, 0, c, x.shape, w.shape, x, w, None, want.shape, "float32",
                     tensor_cores=True, allow_tf32=True)
    full = _emu_conv(emu, 0, c, x.shape, w.shape, x, w, None, want.shape, "float32",
                     tensor_cores=True, allow_tf32=False)
    scale = np.abs(want).max()
    tf32_err, full_err = np.abs(tf32 - want).max() / scale, np.abs(full - want).max() / scale
    assert full_err < 1e-5, full_err
    assert 1e-5 < tf32_err < 5e-3, tf32_err


def test_emulated_mma_fuzz(emu):
    """Seeded random geometries (channels, groups, kernel, stride, dilation, pads, layout,
    dtype, tile) through forward, bwd_data and bwd_filter on tensor cores."""
    rng = np.random.default_rng(12)
    for trial in range(10):
        groups = int(rng.choice([1, 1, 2, 3]))
        cin, cout = (groups * int(rng.integers(1, 20)) for _ in range(2))
        k = tuple(int(v) for v in rng.integers(1, 4, 2))
        stride = tuple(int(v) for v in rng.integers(1, 4, 2))
        dilation = tuple(int(v) for v in rng.integers(1, 3, 2))
        pads = tuple(tuple(int(v) for v in rng.integers(0, 3, 2)) for _ in range(2))
        h, wd = (int(v) for v in rng.integers(max(k) * 2, 12, 2))
        c = conv_case(int(rng.integers(1, 3)), cin, h, wd, cout, k, stride=stride,
                      dilation=dilation, pads=pads, groups=groups)
        layout = str(rng.choice(["NCHW", "NHWC"]))
        dtype = str(rng.choice(MMA_DTYPES))
        tile = int(rng.choice([MMA_LARGE, MMA_SMALL]))
        kw = dict(stride=c["stride"], padding=c["pads"], dilation=c["dilation"],
                  groups=groups)
        x = _grid_values(rng, (c["n"], cin, h, wd))
        w = _grid_values(rng, (cout, cin // groups) + k)
        y, vjp = jax.vjp(lambda x_, w_: ref_conv2d(x_, w_, **kw), x, w)
        dy = _grid_values(rng, y.shape)
        dx, dw = vjp(dy)
        acts, wgts = ((lambda a: a), (lambda a: a)) if layout == "NCHW" else (_nhwc, _hwio)
        c = dict(c, layout=layout)
        xs, ws = acts(x).shape, wgts(w).shape
        msg = f"trial {trial}: {c} {dtype} tile {tile}"
        got = _emu_conv(emu, 0, c, xs, ws, _np(acts(x), dtype), _np(wgts(w), dtype), None,
                        acts(y).shape, dtype, force_tile=tile)
        assert_close(jnp.asarray(got), acts(y).astype(dtype), dtype), msg
        got = _emu_conv(emu, 1, c, xs, ws, _np(acts(dy), dtype), _np(wgts(w), dtype), None,
                        xs, dtype, force_tile=tile)
        assert_close(jnp.asarray(got), acts(dx).astype(dtype), dtype), msg
        got = _emu_conv(emu, 2, c, xs, ws, _np(acts(x), dtype), _np(acts(dy), dtype), None,
                        ws, dtype, force_tile=tile)
        assert_close(jnp.asarray(got), wgts(dw).astype(dtype), dtype), msg


def test_wrong_fragment_layout_is_caught(tmp_path):
    """The same kernels built against an emulation whose 16-bit A fragment swaps registers 1
    and 2 (rows g+8 <-> columns +8) compute wrong convolutions: the emulated layouts matter,
    so the tests above would catch a kernel that disagreed with the PTX ISA."""
    inc = _cuda_include()
    if inc is None:
        pytest.skip("CUDA headers not found (cuda_bf16.h)")
    lib = _compile([EMU_DIR / "kernels.cc"], tmp_path / "wrong.so",
                   ["-std=c++20", "-O1", "-pthread", "-I", inc,
                    "-DJAXCONV_EMU_WRONG_FRAGMENT_LAYOUT"])
    c = dict(MMA_CASES["mma_c16_o24_3x3"], layout="NHWC")
    r, acts, wgts = _conv_inputs("mma_c16_o24_3x3", "NHWC")
    x, y, w = acts(r["x"]), acts(r["y"]), wgts(r["w"])
    for dtype in ("bfloat16", "float16"):
        got = _emu_conv(lib, 0, c, x.shape, w.shape, _np(x, dtype), _np(w, dtype),
                        _np(r["bias"], dtype), y.shape, dtype, force_tile=MMA_SMALL)
        assert not np.allclose(got.astype(np.float64), np.asarray(y), rtol=0.05, atol=0.05)
    # float32 (TF32, whose layout the switch leaves alone) still matches.
    got = _emu_conv(lib, 0, c, x.shape, w.shape, _np(x, "float32"), _np(w, "float32"),
                    _np(r["bias"], "float32"), y.shape, "float32", force_tile=MMA_SMALL)
    assert_close(jnp.asarray(got), y.astype("float32"), "float32")


# ---------------------------------------------------------------------------------------------
# The warp-level operations themselves (warp_probe.cc: one emulated warp), against the PTX ISA's
# layouts written out here independently of warp.h.


@pytest.fixture(scope="module")
def warp_probe(tmp_path_factory):
    inc = _cuda_include()
    if inc is None:
        pytest.skip("CUDA headers not found (cuda_bf16.h); the emulation needs the half types")
    return _compile([EMU_DIR / "warp_probe.cc"], tmp_path_factory.mktemp("warp") / "w.so",
                    ["-std=c++20", "-O1", "-pthread", "-I", inc])


def _u32(n):
    return np.zeros(n, np.uint32)


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("matrices", [1, 2, 4])
def test_emulated_ldmatrix(warp_probe, matrices, trans):
    rows = np.arange(32 * 8, dtype=np.uint16).reshape(32, 8) * 3 + 1
    row_step = 5  # lane l points at row 5l % 32: addresses need not be in lane order
    out = _u32(32 * 4)
    assert warp_probe.probe_ldmatrix(matrices, int(trans), row_step, _ptr(rows), _ptr(out)) == 0
    out = out.reshape(32, 4)
    for lane in range(32):
        for j in range(4):
            if j >= matrices:
                assert out[lane, j] == 0
                continue
            # Matrix j: row i is the row whose address lane 8j + i gave.
            mat = rows[[((8 * j + i) * row_step) % 32 for i in range(8)]]
            g, t = lane // 4, lane % 4
            lo, hi = ((mat[2 * t, g], mat[2 * t + 1, g]) if trans
                      else (mat[g, 2 * t], mat[g, 2 * t + 1]))
            assert out[lane, j] == int(lo) | (int(hi) << 16), (lane, j)


def _fragments_16bit(a, b):
    """a (16 x 16), b (16 x 8) as 16-bit values -> per-lane registers (PTX ISA m16n8k16)."""
    ra, rb = _u32(32 * 4).reshape(32, 4), _u32(32 * 2).reshape(32, 2)
    pack = lambda lo, hi: int(lo) | (int(hi) << 16)  # noqa: E731
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for reg, (r, c) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8),
                                      (g + 8, 2 * t + 8)]):
            ra[lane, reg] = pack(a[r, c], a[r, c + 1])
        for reg, k in enumerate([2 * t, 2 * t + 8]):
            rb[lane, reg] = pack(b[k, g], b[k + 1, g])
    return ra, rb


def _fragments_tf32(a, b):
    ra, rb = _u32(32 * 4).reshape(32, 4), _u32(32 * 2).reshape(32, 2)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for reg, (r, c) in enumerate([(g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)]):
            ra[lane, reg] = a[r, c]
        for reg, k in enumerate([t, t + 4]):
            rb[lane, reg] = b[k, g]
    return ra, rb


@pytest.mark.parametrize("kind", ["bfloat16", "float16", "tf32"])
def test_emulated_mma(warp_probe, kind):
    rng = np.random.default_rng(5)
    k = 8 if kind == "tf32" else 16
    a = rng.integers(-8, 9, (16, k)) / 8.0
    b = rng.integers(-8, 9, (k, 8)) / 8.0
    c = rng.integers(-8, 9, (16, 8)) / 4.0
    if kind == "tf32":
        ra, rb = _fragments_tf32(a.astype(np.float32).view(np.uint32),
                                 b.astype(np.float32).view(np.uint32))
    else:
        dt = ml_dtypes.bfloat16 if kind == "bfloat16" else np.float16
        ra, rb = _fragments_16bit(a.astype(dt).view(np.uint16), b.astype(dt).view(np.uint16))
    rc = np.zeros((32, 4), np.float32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        rc[lane] = [c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1]]
    rd = np.zeros((32, 4), np.float32)
    code = {"bfloat16": 0, "float16": 1, "tf32": 2}[kind]
    ra, rb = np.ascontiguousarray(ra), np.ascontiguousarray(rb)
    assert warp_probe.probe_mma(code, _ptr(ra), _ptr(rb), _ptr(rc), _ptr(rd)) == 0
    want = a @ b + c
    for lane in range(32):
        g, t = lane // 4, lane % 4
        assert list(rd[lane]) == [want[g, 2 * t], want[g, 2 * t + 1], want[g + 8, 2 * t],
                                  want[g + 8, 2 * t + 1]], lane


@pytest.mark.parametrize("mask", [1, 6, 16, 31])
def test_emulated_shuffles(warp_probe, mask):
    v = np.arange(32, dtype=np.float32) * 1.5 - 7
    out = np.zeros(64, np.float32)
    assert warp_probe.probe_shfl(mask, _ptr(v), _ptr(out)) == 0
    lanes = np.arange(32)
    np.testing.assert_array_equal(out[:32], v[lanes ^ mask])
    np.testing.assert_array_equal(out[32:], v[(lanes * 7 + 3) % 32])


def test_emulated_warp_operation_needs_a_full_warp(warp_probe):
    v, out = np.zeros(48, np.float32), np.zeros(96, np.float32)
    assert warp_probe.probe_partial_warp(_ptr(v), _ptr(out)) == 2


def test_emulated_cp_async_groups(warp_probe):
    """Copies land at the wait that releases their group, not before: a kernel that reads its
    stage early sees the old shared contents; wait_group 1 leaves the newest group in flight;
    a zero-fill copy writes zeros."""
    src = np.arange(32 * 8, dtype=np.float32) + 100
    out = np.zeros(32 * 24, np.float32)
    assert warp_probe.probe_cp_async(_ptr(src), _ptr(out)) == 0
    out, src = out.reshape(32, 3, 8), src.reshape(32, 8)
    for lane in range(32):
        before, after1, after0 = out[lane]
        np.testing.assert_array_equal(before, -1)
        np.testing.assert_array_equal(after1[:4], src[lane, :4])
        np.testing.assert_array_equal(after1[4:], -1)
        np.testing.assert_array_equal(after0[:4], src[lane, :4])
        np.testing.assert_array_equal(after0[4:], src[lane, 4:] if lane % 2 == 0 else 0)


def test_emulated_cp_async_left_in_flight_fails_the_launch(warp_probe):
    src, out = np.zeros(128, np.float32), np.zeros(32, np.float32)
    assert warp_probe.probe_cp_async_unwaited(_ptr(src), _ptr(out)) == 2


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
