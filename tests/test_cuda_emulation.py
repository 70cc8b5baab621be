"""The SIMT CUDA kernels (ffi/cuda/conv2d_kernels.cuh and max_pool2d_kernels.cuh, with the same
host-side planning the handlers use) under the host emulation (tests/emulation.py), against
float64 lax: all three conv directions in every dtype and both layouts, bwd_filter's split plan,
and max pooling's values, indices and backward. On a GPU the same kernels run for real in every
other test file through the `backend` fixture."""

from __future__ import annotations

import ctypes
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from emulation import (
    CONV_CASES,
    DTYPE_CODES,
    DTYPES,
    LAYOUT_CODES,
    MAX_BLOCKS,
    as_dtype,
    conv_attrs,
    conv_oracle,
    emu_conv,
    hwio,
    nhwc,
    ptr,
    sentinel,
    vec,
)
from reference import assert_close, ref_max_pool2d, tol

pytestmark = pytest.mark.slow(
    "builds a CUDA host-emulation library (a C++ compile of tens of "
    "seconds per worker), then emulates kernels thread by thread"
)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_emulated_conv_kernels(conv_emu, name, layout):
    """The kernels as a device without tensor cores runs them (every dtype on SIMT)."""
    c = dict(CONV_CASES[name], layout=layout)
    r = conv_oracle(name)
    acts = (lambda a: a) if layout == "NCHW" else nhwc
    wgts = (lambda a: a) if layout == "NCHW" else hwio
    x, dy, y, dx = (acts(r[k]) for k in ("x", "dy", "y", "dx"))
    w, dw = wgts(r["w"]), wgts(r["dw"])
    for dtype in DTYPES:
        xa, wa, ba, bxa, dya = (as_dtype(a, dtype) for a in (x, w, r["bias"], r["bias_dx"], dy))
        got = emu_conv(conv_emu, 0, c, x.shape, w.shape, xa, wa, ba, y.shape, dtype)
        assert_close(jnp.asarray(got), y.astype(dtype), dtype)
        got = emu_conv(conv_emu, 1, c, x.shape, w.shape, dya, wa, bxa, x.shape, dtype)
        assert_close(jnp.asarray(got), dx.astype(dtype), dtype)
        got = emu_conv(conv_emu, 2, c, x.shape, w.shape, xa, dya, None, w.shape, dtype)
        assert_close(jnp.asarray(got), dw.astype(dtype), dtype)


@pytest.mark.parametrize(
    "name, tile_bk, split",
    [("1x1_many_positions", 64, True), ("3x3_many_positions", 16, True), ("3x3_pad1", 16, False)],
)
def test_emulated_bwd_filter_split_plan(conv_emu, name, tile_bk, split):
    """The *_many_positions cases above do split bwd_filter's reduction (small and wide tile)
    into partial sums covering the positions exactly, each at least 4 steps long; 3x3_pad1 has
    too few positions to split."""
    c = dict(CONV_CASES[name], layout="NCHW")
    xs, ws = (c["n"], c["c"], c["h"], c["w"]), (c["o"], c["c"]) + c["k"]
    positions = c["n"] * c["h"] * c["w"]  # stride 1, "same" padding
    plan = (ctypes.c_int64 * 5)()
    assert conv_emu.emu_filter_plan(vec(xs), vec(ws), vec(conv_attrs(c)), 1, 0, 0, plan) == 0
    splits, chunk, tiles, ws_bytes, _ = tuple(plan)
    assert (splits > 1) == split, tuple(plan)
    assert chunk % tile_bk == 0 and (chunk >= 4 * tile_bk or not split)
    assert splits * chunk >= positions > (splits - 1) * chunk
    assert ws_bytes == (splits * c["o"] * c["c"] * c["k"][0] * c["k"][1] * 8 if split else 0)


def test_emulated_bwd_filter_empty_batch(conv_emu):
    c = dict(CONV_CASES["3x3_pad1"], layout="NCHW")
    xs, ws = (0, 3, 7, 7), (5, 3, 3, 3)
    dw = emu_conv(conv_emu, 2, c, xs, ws, np.zeros(xs), np.zeros((0, 5, 7, 7)), None, ws, "float64")
    assert np.array_equal(dw, np.zeros(ws))


# Pooling: (N, C, H, W), kernel, stride, pads, dilation, ceil_mode.
POOL_CASES = {
    "3x3s2_pad1": ((2, 3, 7, 7), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), False),
    "2x2s2_ceil": ((1, 2, 5, 5), (2, 2), (2, 2), ((0, 0), (0, 0)), (1, 1), True),
    "dilated_anisotropic": ((2, 2, 6, 5), (3, 2), (1, 2), ((1, 1), (0, 1)), (2, 1), False),
    "window_only_padding": ((1, 2, 2, 2), (2, 2), (1, 1), ((1, 1), (1, 1)), (3, 3), False),
    "many_blocks": ((4, 8, 12, 12), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), False),
}


@functools.cache
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
def test_emulated_pool_kernels(conv_emu, name, layout):
    _, kernel, stride, pads, dilation, ceil_mode = POOL_CASES[name]
    x, vals, idx, dy, dx = _pool_oracle(name)
    if layout == "NHWC":
        x, vals, idx, dy, dx = (a.transpose(0, 2, 3, 1) for a in (x, vals, idx, dy, dx))
    attrs = vec(
        [
            *kernel,
            *stride,
            *dilation,
            pads[0][0],
            pads[0][1],
            pads[1][0],
            pads[1][1],
            int(ceil_mode),
            LAYOUT_CODES[layout],
        ]
    )
    idx = np.ascontiguousarray(idx)
    for dtype in DTYPES:
        xa, dya = as_dtype(x, dtype), as_dtype(dy, dtype)
        y, got_idx = sentinel(vals.shape, dtype), np.full(vals.shape, -7, np.int32)
        assert (
            conv_emu.emu_pool(
                0,
                DTYPE_CODES[dtype],
                vec(xa.shape),
                attrs,
                ptr(xa),
                None,
                ptr(y),
                ptr(got_idx),
                MAX_BLOCKS,
            )
            == 0
        )
        np.testing.assert_array_equal(got_idx, idx, err_msg=dtype)
        # exact, with NaN where the oracle has it
        np.testing.assert_array_equal(y.astype(np.float64), vals, err_msg=dtype)
        got_dx = sentinel(xa.shape, dtype)
        assert (
            conv_emu.emu_pool(
                1,
                DTYPE_CODES[dtype],
                vec(xa.shape),
                attrs,
                ptr(dya),
                ptr(idx),
                ptr(got_dx),
                None,
                MAX_BLOCKS,
            )
            == 0
        )
        rtol, atol = tol(dtype)
        np.testing.assert_allclose(
            got_dx.astype(np.float64), dx, rtol=rtol, atol=atol, err_msg=dtype
        )
