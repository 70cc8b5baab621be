"""The tensor-core kernels (ffi/cuda/conv2d_mma.cuh: mma.sync, ldmatrix, cp.async) under the
warp-level host emulation (tests/emulation.py): forward, bwd_data and bwd_filter on both tiles,
bf16/f16/TF32, both layouts, against float64 lax; the kernel choice per shape class; TF32
rounding; int32 vs int64 offsets; a seeded fuzz; and a build with a wrong fragment layout that
must fail."""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emulation import (
    ALL_CONV_CASES,
    CONV_CASES,
    DTYPE_CODES,
    DTYPES,
    MMA_CASES,
    MMA_DTYPES,
    MMA_FILTER_CASES,
    MMA_LARGE,
    MMA_LARGE_INT64,
    MMA_SMALL,
    MMA_SMALL_INT64,
    as_dtype,
    build_emulation,
    conv_attrs,
    conv_case,
    conv_inputs,
    emu_conv,
    grid_values,
    hwio,
    layout_shapes,
    nhwc,
    vec,
)
from reference import assert_close, ref_conv2d

pytestmark = pytest.mark.slow(
    "builds a CUDA host-emulation library (a C++ compile of tens of "
    "seconds per worker), then emulates kernels thread by thread"
)


@pytest.mark.parametrize("tile", [MMA_LARGE, MMA_SMALL], ids=["128x128", "64x64"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", sorted(MMA_CASES))
def test_emulated_mma_pass(conv_emu, name, layout, tile):
    """Forward and bwd_data on both tensor-core tiles, every mma dtype, against lax. Values
    are quarter-integers, exact in bf16/f16/TF32, so only the final rounding may differ."""
    c = dict(MMA_CASES[name], layout=layout)
    r, acts, wgts = conv_inputs(name, layout)
    x, dy, y, dx = (acts(r[k]) for k in ("x", "dy", "y", "dx"))
    w = wgts(r["w"])
    for dtype in MMA_DTYPES:
        xa, wa, ba, bxa, dya = (as_dtype(a, dtype) for a in (x, w, r["bias"], r["bias_dx"], dy))
        got = emu_conv(
            conv_emu, 0, c, x.shape, w.shape, xa, wa, ba, y.shape, dtype, force_tile=tile
        )
        assert_close(jnp.asarray(got), y.astype(dtype), dtype)
        got = emu_conv(
            conv_emu, 1, c, x.shape, w.shape, dya, wa, bxa, x.shape, dtype, force_tile=tile
        )
        assert_close(jnp.asarray(got), dx.astype(dtype), dtype)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize(
    "name",
    ["long_reduction_wide", "wide_two_n_tiles_stride2", "depthwise_stride2", "mma_c16_o24_3x3"],
)
def test_emulated_conv_on_a_tensor_core_device(conv_emu, name, layout):
    """The handlers' dispatch on sm_80+ with TF32 allowed: every dtype through
    choose_pass_kernel (tensor cores where the shape class qualifies, SIMT for the rest and
    for float64)."""
    c = dict(ALL_CONV_CASES[name], layout=layout)
    r, acts, wgts = conv_inputs(name, layout)
    x, dy, y, dx = (acts(r[k]) for k in ("x", "dy", "y", "dx"))
    w = wgts(r["w"])
    for dtype in DTYPES:
        xa, wa, ba, bxa, dya = (as_dtype(a, dtype) for a in (x, w, r["bias"], r["bias_dx"], dy))
        got = emu_conv(
            conv_emu,
            0,
            c,
            x.shape,
            w.shape,
            xa,
            wa,
            ba,
            y.shape,
            dtype,
            tensor_cores=True,
            allow_tf32=True,
        )
        assert_close(jnp.asarray(got), y.astype(dtype), dtype)
        got = emu_conv(
            conv_emu,
            1,
            c,
            x.shape,
            w.shape,
            dya,
            wa,
            bxa,
            x.shape,
            dtype,
            tensor_cores=True,
            allow_tf32=True,
        )
        assert_close(jnp.asarray(got), dx.astype(dtype), dtype)


def _filter_plan(lib, c, dtype, *, tensor_cores=True, allow_tf32=True):
    """{splits, chunk, tiles, workspace bytes, kernel} of bwd_filter (emu_filter_plan)."""
    xs, ws = layout_shapes(c)
    plan = (ctypes.c_int64 * 5)()
    assert (
        lib.emu_filter_plan(
            vec(xs),
            vec(ws),
            vec(conv_attrs(c)),
            DTYPE_CODES[dtype],
            int(tensor_cores),
            int(allow_tf32),
            plan,
        )
        == 0
    )
    return dict(zip(("splits", "chunk", "tiles", "ws_bytes", "kernel"), tuple(plan)))


@pytest.mark.parametrize("tile", [MMA_LARGE, MMA_SMALL], ids=["128x128", "64x64"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", sorted({**MMA_CASES, **MMA_FILTER_CASES}))
def test_emulated_mma_bwd_filter(conv_emu, name, layout, tile):
    """bwd_filter on both tensor-core tiles, every mma dtype, against lax's float64 dw. Values
    are quarter-integers, so the products and partial sums are exact and only the final
    rounding may differ; the split cases check the float32 partial sums too."""
    c = dict(ALL_CONV_CASES[name], layout=layout)
    r, acts, wgts = conv_inputs(name, layout)
    x, dy, w, dw = acts(r["x"]), acts(r["dy"]), wgts(r["w"]), wgts(r["dw"])
    for dtype in MMA_DTYPES:
        got = emu_conv(
            conv_emu,
            2,
            c,
            x.shape,
            w.shape,
            as_dtype(x, dtype),
            as_dtype(dy, dtype),
            None,
            w.shape,
            dtype,
            force_tile=tile,
        )
        assert_close(jnp.asarray(got), dw.astype(dtype), dtype)


def test_emulated_mma_bwd_filter_splits(conv_emu):
    """The split case does split on tensor cores (16 and 32 positions per step), each split at
    least 4 steps, and the NCHW case with OH * OW = 64 takes the 16-byte dy loads."""
    for layout in ("NCHW", "NHWC"):
        c = dict(MMA_FILTER_CASES["mma_filter_split"], layout=layout)
        for dtype, bk in (("float32", 16), ("bfloat16", 32)):
            plan = _filter_plan(conv_emu, c, dtype)
            assert plan["kernel"] == MMA_SMALL, plan
            assert plan["splits"] > 1 and plan["chunk"] % bk == 0 and plan["chunk"] >= 4 * bk
            assert plan["ws_bytes"] == plan["splits"] * 24 * 16 * 9 * 4  # float32 partials


def test_filter_kernel_choice_by_shape_class(conv_emu):
    """choose_filter_kernel: tensor cores for bf16/f16 and TF32-allowed float32 with >= 16 values
    per group on both dW sides, the 128 x 128 tile when both exceed 64; SIMT otherwise."""
    big = dict(conv_case(8, 256, 14, 14, 256, 3, pads=1), layout="NHWC")
    small = dict(MMA_CASES["mma_c16_o24_3x3"], layout="NHWC")
    few_outputs = dict(CONV_CASES["3x3_many_positions"], layout="NCHW")  # dW 3 x 18 per group
    tiny = dict(CONV_CASES["1x1_many_positions"], layout="NCHW")  # dW 3 x 2
    assert _filter_plan(conv_emu, big, "bfloat16")["kernel"] == MMA_LARGE
    assert _filter_plan(conv_emu, big, "float16")["kernel"] == MMA_LARGE
    assert _filter_plan(conv_emu, big, "float32")["kernel"] == MMA_LARGE
    assert _filter_plan(conv_emu, small, "bfloat16")["kernel"] == MMA_SMALL
    assert _filter_plan(conv_emu, big, "float32", allow_tf32=False)["kernel"] == 0  # SIMT wide
    assert _filter_plan(conv_emu, big, "float64")["kernel"] == 0
    assert _filter_plan(conv_emu, big, "bfloat16", tensor_cores=False)["kernel"] == 0
    assert _filter_plan(conv_emu, few_outputs, "bfloat16")["kernel"] == 0  # < 16 rows: SIMT wide
    assert _filter_plan(conv_emu, tiny, "bfloat16")["kernel"] == 1  # SIMT 16 x 16


def test_emulated_bwd_filter_tf32_rounds_float32_operands(conv_emu):
    """With allow_tf32, float32 bwd_filter multiplies TF32-rounded operands on tensor cores;
    without it the same call runs the SIMT kernel in full float32."""
    c = dict(MMA_FILTER_CASES["mma_filter_split"], layout="NHWC")
    xs, ws = layout_shapes(c)
    rng = np.random.default_rng(4)
    x = rng.standard_normal(xs).astype(np.float32)
    w0 = np.zeros(ws, np.float64)
    kw = dict(padding=c["pads"], layout="NHWC")
    y, vjp = jax.vjp(lambda w_: ref_conv2d(jnp.asarray(x, jnp.float64), w_, **kw), w0)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    want = np.asarray(vjp(jnp.asarray(dy, jnp.float64))[0])
    tf32 = emu_conv(
        conv_emu, 2, c, xs, ws, x, dy, None, ws, "float32", tensor_cores=True, allow_tf32=True
    )
    full = emu_conv(
        conv_emu, 2, c, xs, ws, x, dy, None, ws, "float32", tensor_cores=True, allow_tf32=False
    )
    scale = np.abs(want).max()
    tf32_err, full_err = np.abs(tf32 - want).max() / scale, np.abs(full - want).max() / scale
    assert full_err < 1e-5, full_err
    assert 1e-5 < tf32_err < 5e-3, tf32_err


@pytest.mark.parametrize(
    "name, layout",
    [
        ("mma_c16_o24_3x3", "NHWC"),
        ("mma_odd_channels_phases", "NCHW"),
        ("mma_filter_split", "NCHW"),
    ],
)
def test_emulated_mma_int64_offsets(conv_emu, name, layout):
    """The int64-offset instantiations of the tensor-core kernels (used when an operand has
    2^31 elements or more) compute the same bits as the int32 ones, in all three directions;
    the int32 ones are checked against lax above."""
    c = dict(ALL_CONV_CASES[name], layout=layout)
    r, acts, wgts = conv_inputs(name, layout)
    x, dy, y, dx = (acts(r[k]) for k in ("x", "dy", "y", "dx"))
    w, dw = wgts(r["w"]), wgts(r["dw"])
    for dtype in MMA_DTYPES:
        xa, wa, ba, bxa, dya = (as_dtype(a, dtype) for a in (x, w, r["bias"], r["bias_dx"], dy))
        calls = [(0, xa, wa, ba, y), (1, dya, wa, bxa, dx), (2, xa, dya, None, dw)]
        for tile32, tile64 in ((MMA_LARGE, MMA_LARGE_INT64), (MMA_SMALL, MMA_SMALL_INT64)):
            for which, a, b, bias, want in calls:
                got32, got64 = (
                    emu_conv(
                        conv_emu,
                        which,
                        c,
                        x.shape,
                        w.shape,
                        a,
                        b,
                        bias,
                        want.shape,
                        dtype,
                        force_tile=t,
                    )
                    for t in (tile32, tile64)
                )
                assert_close(jnp.asarray(got64), want.astype(dtype), dtype)
                np.testing.assert_array_equal(
                    got64.view(np.uint8),
                    got32.view(np.uint8),
                    err_msg=f"{which} {dtype} tile {tile64}",
                )


def test_mma_offset_width_by_operand_size(conv_emu):
    """mma_index32: int32 offsets while every operand of the direction has fewer than 2^31
    elements, int64 from 2^31 (shapes only; nothing is allocated)."""

    def width(which, x_shape, w_shape, pads=1):
        attrs = vec([1, 1, 1, 1, pads, pads, pads, pads, 1, 0])
        return conv_emu.emu_mma_index32(which, vec(x_shape), vec(w_shape), attrs)

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
    return lib.emu_pass_kernel(
        which,
        DTYPE_CODES[dtype],
        vec(xs),
        vec(ws),
        vec(conv_attrs(dict(c, layout="NCHW"))),
        int(tensor_cores),
        int(allow_tf32),
    )


def test_pass_kernel_choice_by_shape_class(conv_emu):
    big = conv_case(64, 256, 56, 56, 256, 3, pads=1)  # 1568 tiles of 128 x 128
    small = CONV_CASES["long_reduction_wide"]
    depthwise = CONV_CASES["depthwise_stride2"]
    assert _pass_kernel(conv_emu, 0, big, "bfloat16") == MMA_LARGE
    assert _pass_kernel(conv_emu, 1, big, "float16") == MMA_LARGE
    assert _pass_kernel(conv_emu, 0, small, "bfloat16") == MMA_SMALL
    assert _pass_kernel(conv_emu, 0, big, "float32") == MMA_LARGE  # TF32 allowed
    assert _pass_kernel(conv_emu, 0, big, "float32", allow_tf32=False) == 0  # full float32: SIMT
    assert _pass_kernel(conv_emu, 0, big, "float64") == 0
    assert _pass_kernel(conv_emu, 0, big, "bfloat16", tensor_cores=False) == 0  # before sm_80
    assert _pass_kernel(conv_emu, 0, depthwise, "bfloat16") == 1  # 1 channel per group: SIMT tall


def test_emulated_tf32_rounds_float32_operands(conv_emu):
    """With allow_tf32 the float32 forward multiplies TF32-rounded operands (errors far above
    float32's, within TF32's); without it the same call is float32-exact to rounding."""
    c = dict(MMA_CASES["mma_c16_o24_3x3"], layout="NHWC")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((c["n"], c["h"], c["w"], c["c"])).astype(np.float32)
    w = rng.standard_normal(c["k"] + (c["c"], c["o"])).astype(np.float32)
    want = np.asarray(
        ref_conv2d(
            jnp.asarray(x, jnp.float64),
            jnp.asarray(w, jnp.float64),
            padding=c["pads"],
            layout="NHWC",
        )
    )
    tf32 = emu_conv(
        conv_emu,
        0,
        c,
        x.shape,
        w.shape,
        x,
        w,
        None,
        want.shape,
        "float32",
        tensor_cores=True,
        allow_tf32=True,
    )
    full = emu_conv(
        conv_emu,
        0,
        c,
        x.shape,
        w.shape,
        x,
        w,
        None,
        want.shape,
        "float32",
        tensor_cores=True,
        allow_tf32=False,
    )
    scale = np.abs(want).max()
    tf32_err, full_err = np.abs(tf32 - want).max() / scale, np.abs(full - want).max() / scale
    assert full_err < 1e-5, full_err
    assert 1e-5 < tf32_err < 5e-3, tf32_err


def test_emulated_mma_fuzz(conv_emu):
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
        c = conv_case(
            int(rng.integers(1, 3)),
            cin,
            h,
            wd,
            cout,
            k,
            stride=stride,
            dilation=dilation,
            pads=pads,
            groups=groups,
        )
        layout = str(rng.choice(["NCHW", "NHWC"]))
        dtype = str(rng.choice(MMA_DTYPES))
        tile = int(rng.choice([MMA_LARGE, MMA_SMALL]))
        kw = dict(stride=c["stride"], padding=c["pads"], dilation=c["dilation"], groups=groups)
        x = grid_values(rng, (c["n"], cin, h, wd))
        w = grid_values(rng, (cout, cin // groups) + k)
        y, vjp = jax.vjp(lambda x_, w_: ref_conv2d(x_, w_, **kw), x, w)
        dy = grid_values(rng, y.shape)
        dx, dw = vjp(dy)
        acts, wgts = ((lambda a: a), (lambda a: a)) if layout == "NCHW" else (nhwc, hwio)
        c = dict(c, layout=layout)
        xs, ws = acts(x).shape, wgts(w).shape
        msg = f"trial {trial}: {c} {dtype} tile {tile}"
        got = emu_conv(
            conv_emu,
            0,
            c,
            xs,
            ws,
            as_dtype(acts(x), dtype),
            as_dtype(wgts(w), dtype),
            None,
            acts(y).shape,
            dtype,
            force_tile=tile,
        )
        assert_close(jnp.asarray(got), acts(y).astype(dtype), dtype), msg
        got = emu_conv(
            conv_emu,
            1,
            c,
            xs,
            ws,
            as_dtype(acts(dy), dtype),
            as_dtype(wgts(w), dtype),
            None,
            xs,
            dtype,
            force_tile=tile,
        )
        assert_close(jnp.asarray(got), acts(dx).astype(dtype), dtype), msg
        got = emu_conv(
            conv_emu,
            2,
            c,
            xs,
            ws,
            as_dtype(acts(x), dtype),
            as_dtype(acts(dy), dtype),
            None,
            ws,
            dtype,
            force_tile=tile,
        )
        assert_close(jnp.asarray(got), wgts(dw).astype(dtype), dtype), msg


def test_wrong_fragment_layout_is_caught(tmp_path):
    """The same kernels built against an emulation whose 16-bit A fragment swaps registers 1
    and 2 (rows g+8 <-> columns +8) compute wrong convolutions: the emulated layouts matter,
    so the tests above would catch a kernel that disagreed with the PTX ISA."""
    lib = build_emulation("kernels.cc", tmp_path, ["-DJAXCONV_EMU_WRONG_FRAGMENT_LAYOUT"])
    c = dict(MMA_CASES["mma_c16_o24_3x3"], layout="NHWC")
    r, acts, wgts = conv_inputs("mma_c16_o24_3x3", "NHWC")
    x, y, w = acts(r["x"]), acts(r["y"]), wgts(r["w"])
    for dtype in ("bfloat16", "float16"):
        got = emu_conv(
            lib,
            0,
            c,
            x.shape,
            w.shape,
            as_dtype(x, dtype),
            as_dtype(w, dtype),
            as_dtype(r["bias"], dtype),
            y.shape,
            dtype,
            force_tile=MMA_SMALL,
        )
        assert not np.allclose(got.astype(np.float64), np.asarray(y), rtol=0.05, atol=0.05)
    # float32 (TF32, whose layout the switch leaves alone) still matches.
    got = emu_conv(
        lib,
        0,
        c,
        x.shape,
        w.shape,
        as_dtype(x, "float32"),
        as_dtype(w, "float32"),
        as_dtype(r["bias"], "float32"),
        y.shape,
        "float32",
        force_tile=MMA_SMALL,
    )
    assert_close(jnp.asarray(got), y.astype("float32"), "float32")


# ---------------------------------------------------------------------------------------------
# The warp-level operations themselves (warp_probe.cc: one emulated warp), against the PTX ISA's
# layouts written out here independently of warp.h.
