"""The host emulation of CUDA, shared by the test files that run the CUDA kernels without a GPU.

The kernels (ffi/cuda/*.cuh) compile with a host C++20 compiler against
tests/cuda_emulation/emulate.h: blocks run in turn, threads as real threads, __syncthreads a real
barrier, and the grid is capped so each block loops over several tiles. Warps are 32 of those
threads that meet in every warp-level operation (tests/cuda_emulation/warp.h: mma.sync, ldmatrix,
shuffles with the PTX ISA layouts, cp.async landing at its wait). Each emulation library is one
.cc file of tests/cuda_emulation exporting plain C functions; this module builds it (skipping the
test where there is no compiler or no CUDA headers for the half types), converts arguments for
ctypes, and holds the conv cases and their float64 oracle that several files check against.

The libraries' fixtures (one build per test session and worker) are in conftest.py.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from reference import ref_conv2d

ROOT = Path(__file__).resolve().parents[1]
FFI_DIR = ROOT / "ffi"
EMU_DIR = Path(__file__).resolve().parent / "cuda_emulation"

# ---------------------------------------------------------------------------------------------
# Building a library.


def cxx():
    """A host C++ compiler: $CXX, c++, g++ or clang++ (None if there is none)."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cuda_include():
    """CUDA's include directory (for cuda_bf16.h / cuda_fp16.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, str(Path(nvcc).resolve().parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_bf16.h").exists():
            return str(Path(c) / "include")
    return None


def compile_library(sources, out: Path, flags):
    """Compiles `sources` (with ffi/ on the include path) into the shared library `out` and
    loads it; skips the test without a compiler, fails it with the compiler's message."""
    compiler = cxx()
    if compiler is None:
        pytest.skip("no C++ compiler")
    cmd = [
        compiler,
        *flags,
        "-fPIC",
        "-shared",
        "-I",
        str(FFI_DIR),
        *map(str, sources),
        "-o",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
    return ctypes.CDLL(str(out))


def build_emulation(source: str, out_dir: Path, extra_flags=()):
    """tests/cuda_emulation/<source> built against the emulation (C++20, threads, CUDA's half
    types); skips the test where CUDA's headers are missing."""
    inc = cuda_include()
    if inc is None:
        pytest.skip("CUDA headers not found (cuda_bf16.h); the emulation needs the half types")
    return compile_library(
        [EMU_DIR / source],
        out_dir / (Path(source).stem + ".so"),
        ["-std=c++20", "-O1", "-pthread", "-I", inc, *extra_flags],
    )


# ---------------------------------------------------------------------------------------------
# Arguments for ctypes.

DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}  # as the handlers' enum
NP_DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}
DTYPES = ["float64", "float32", "float16", "bfloat16"]
LAYOUT_CODES = {"NCHW": 0, "NHWC": 1}
MAX_BLOCKS = 3  # each emulated launch runs at most 3 blocks; they loop over the rest


def vec(values):
    """An int64 C array."""
    return (ctypes.c_int64 * len(values))(*values)


def call(fn, *ints, n_out):
    """fn(int64..., int64 out[n_out]) -> the n_out outputs as a tuple."""
    out = (ctypes.c_int64 * n_out)()
    fn(*(ctypes.c_int64(v) for v in ints), out)
    return tuple(out)


def ptr(a):
    """A NumPy array's data pointer (None stays a null pointer)."""
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def as_dtype(a, dtype):
    """A C-contiguous NumPy copy of `a` in `dtype` (a name of DTYPE_CODES)."""
    return np.ascontiguousarray(np.asarray(a).astype(NP_DTYPES[dtype]))


def sentinel(shape, dtype):
    """Outputs start as NaN so that a cell the kernel never writes fails the comparison."""
    return np.full(shape, np.nan, NP_DTYPES[dtype])


# ---------------------------------------------------------------------------------------------
# Conv cases, their geometry attributes, and the float64 oracle.


def conv_case(n, c, h, w, o, k, *, stride=1, dilation=1, pads=0, groups=1):
    """One convolution problem in NCHW terms (the test adds "layout")."""
    two = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    if isinstance(pads, int):
        pads = (pads, pads)
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in pads)
    return dict(
        n=n,
        c=c,
        h=h,
        w=w,
        o=o,
        k=two(k),
        stride=two(stride),
        dilation=two(dilation),
        pads=pads,
        groups=groups,
    )


def conv_attrs(c, layout=None):
    """The conv FFI attributes in the handlers' order (docs/design.md, "FFI contract")."""
    (pt, pb), (pl, pr) = c["pads"]
    return [
        c["stride"][0],
        c["stride"][1],
        c["dilation"][0],
        c["dilation"][1],
        pt,
        pb,
        pl,
        pr,
        c["groups"],
        LAYOUT_CODES[layout or c["layout"]],
    ]


def layout_shapes(c):
    """(x shape, w shape) of case `c` in its layout (NCHW/OIHW or NHWC/HWIO)."""
    xs, ws = (c["n"], c["c"], c["h"], c["w"]), (c["o"], c["c"] // c["groups"]) + c["k"]
    if c.get("layout", "NCHW") == "NHWC":
        xs, ws = (xs[0], xs[2], xs[3], xs[1]), ws[2:] + (ws[1], ws[0])
    return xs, ws


def emu_conv(
    lib,
    which,
    c,
    x_shape,
    w_shape,
    a,
    b,
    bias,
    out_shape,
    dtype,
    *,
    tensor_cores=False,
    allow_tf32=False,
    force_tile=0,
):
    """One direction (0 forward, 1 bwd_data, 2 bwd_filter) through kernels.cc's emu_conv, the
    handlers' planning and launches. tensor_cores / allow_tf32: the handlers' PassOptions
    (sm_80+, the allow_tf32 attribute); force_tile MMA_LARGE / MMA_SMALL (and their _INT64
    forms) runs that tensor-core tile whatever the shape."""
    out = sentinel(out_shape, dtype)
    rc = lib.emu_conv(
        which,
        DTYPE_CODES[dtype],
        vec(x_shape),
        vec(w_shape),
        vec(conv_attrs(c)),
        ptr(a),
        ptr(b),
        ptr(bias),
        ptr(out),
        MAX_BLOCKS,
        int(tensor_cores),
        int(allow_tf32),
        int(force_tile),
    )
    assert rc == 0, f"emu_conv returned {rc}"
    return out


# Chosen to reach every path: both pass tiles (<= 16 and > 16 output channels per group) and
# several n tiles (> 64), several m tiles and k steps, groups and depthwise, strides with every
# gcd against the dilation (bwd_data phases and their tap spacing), negative pads, a stride past
# the image (fewer phases than the stride), a kernel larger than the image, and bwd_filter with
# its small and wide tiles, split into partial sums (the *_many_positions cases) or not.
CONV_CASES = {
    "3x3_pad1": conv_case(2, 3, 7, 7, 5, 3, pads=1),
    "wide_two_n_tiles_stride2": conv_case(1, 4, 9, 9, 70, 3, stride=2, pads=((1, 0), (0, 1))),
    "groups_dilation_negative_pads": conv_case(
        2, 4, 7, 8, 6, (3, 2), stride=(2, 1), dilation=(1, 2), pads=((-1, 2), (1, -2)), groups=2
    ),
    "depthwise_stride2": conv_case(2, 6, 6, 6, 6, 3, stride=2, pads=1, groups=6),
    "1x1_many_positions": conv_case(4, 2, 16, 16, 3, 1),
    "3x3_many_positions": conv_case(2, 2, 16, 16, 3, 3, pads=1),
    "kernel_larger_than_image": conv_case(1, 3, 2, 2, 4, 5, pads=2),
    "stride_past_image": conv_case(2, 2, 3, 4, 3, 2, stride=(4, 3)),
    "stride2_dilation2": conv_case(1, 2, 11, 11, 3, 3, stride=2, dilation=2, pads=2),
    "stride3_dilation2": conv_case(1, 2, 11, 10, 3, 3, stride=3, dilation=2, pads=(2, 1)),
    "long_reduction_wide": conv_case(1, 20, 5, 5, 24, 3, pads=1),
}

# The tensor-core kernels (ffi/cuda/conv2d_mma.cuh): emu_pass_kernel / force_tile codes.
MMA_LARGE, MMA_SMALL = 2, 3  # 0 SIMT wide, 1 SIMT tall
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
    "mma_groups_dilated": conv_case(
        2, 32, 7, 8, 48, (3, 2), stride=(2, 1), dilation=(1, 2), pads=((-1, 2), (1, -2)), groups=2
    ),
    # stride 3 with dilation 2: bwd_data phases with 2 tap slots; odd channels: all gathered.
    "mma_odd_channels_phases": conv_case(1, 6, 11, 10, 18, 3, stride=3, dilation=2, pads=(2, 1)),
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


def grid_values(rng, shape):
    """Quarter-integers in [-1, 1]: exact in every dtype, so one float64 oracle serves all four
    (products and sums of them are exact in float32 too; only the final rounding differs)."""
    return jnp.asarray(rng.integers(-4, 5, shape) / 4.0, jnp.float64)


def nhwc(a):
    return jnp.transpose(a, (0, 2, 3, 1))


def hwio(w):
    return jnp.transpose(w, (2, 3, 1, 0))


@functools.cache
def conv_oracle(name):
    """Inputs and lax's results (NCHW, float64) of ALL_CONV_CASES[name]: y = conv(x, w) + bias,
    and at dy the VJP of the bias-free convolution, dx (plus bias_dx, the transposed
    convolution's bias) and dw."""
    c = ALL_CONV_CASES[name]
    rng = np.random.default_rng(0)
    x = grid_values(rng, (c["n"], c["c"], c["h"], c["w"]))
    w = grid_values(rng, (c["o"], c["c"] // c["groups"]) + c["k"])
    bias, bias_dx = grid_values(rng, (c["o"],)), grid_values(rng, (c["c"],))
    kw = dict(stride=c["stride"], padding=c["pads"], dilation=c["dilation"], groups=c["groups"])

    @jax.jit
    def oracle(x, w, bias, bias_dx, dy):
        y, vjp = jax.vjp(lambda x_, w_: ref_conv2d(x_, w_, **kw), x, w)
        dx, dw = vjp(dy)
        return y + bias.reshape(1, -1, 1, 1), dx + bias_dx.reshape(1, -1, 1, 1), dw

    y_shape = jax.eval_shape(lambda x, w: ref_conv2d(x, w, **kw), x, w).shape
    dy = grid_values(rng, y_shape)
    y, dx, dw = oracle(x, w, bias, bias_dx, dy)
    return dict(x=x, w=w, bias=bias, bias_dx=bias_dx, dy=dy, y=y, dx=dx, dw=dw)


def conv_inputs(name, layout):
    """conv_oracle(name) and the functions taking its activations and weights to `layout`."""
    r = conv_oracle(name)
    acts = (lambda a: a) if layout == "NCHW" else nhwc
    wgts = (lambda a: a) if layout == "NCHW" else hwio
    return r, acts, wgts
