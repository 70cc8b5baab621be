"""The tensor-core pass's precomputed-iterator kernel (ffi/cuda/conv2d_mma.cuh:
conv_pass_mma_tap_kernel) under the warp-level host emulation, against lax's float64 results.

That kernel serves NHWC operands whose chunks are all 16-byte copies with the input channels per
group a multiple of the stage's k (32 for 16-bit types, 16 for float32): the block walks the
reduction tap by tap with per-tile base offsets and per-row tap masks. The cases below are chosen
to reach it (emu_mma_pass_tap says so, checked first) with padding on every side, dilation,
groups, several n tiles, bwd_data stride phases with 1 and 2 tap slots (taps some phases lack)
and a kernel larger than the image, on both tensor-core tiles and every mma dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emulation import (
    DTYPE_CODES,
    MMA_DTYPES,
    MMA_LARGE,
    MMA_SMALL,
    as_dtype,
    conv_attrs,
    conv_case,
    emu_conv,
    grid_values,
    hwio,
    nhwc,
    vec,
)
from reference import assert_close, ref_conv2d

pytestmark = pytest.mark.slow("runs the tensor-core kernels under the host emulation")

TAP_CASES = {
    # forward 16-bit: B k-major (HWIO); bwd_data: B n-major; padding on both sides of both axes.
    "tap_c32_o32_3x3": conv_case(2, 32, 6, 7, 32, 3, pads=1),
    # groups of 32 in / 64 out channels, stride 2, dilation, uneven pads; bwd_data phases gcd 1.
    "tap_groups_strided_dilated": conv_case(
        1, 64, 9, 8, 128, (3, 2), stride=2, dilation=(2, 1), pads=((1, 2), (0, 1)), groups=2
    ),
    # stride 3, dilation 2: bwd_data phases with 2 tap slots, some reaching only 1 tap.
    "tap_phases_stride3_dilation2": conv_case(
        1, 32, 11, 10, 64, 3, stride=3, dilation=2, pads=(2, 1)
    ),
    # 1x1, several m tiles of both sizes, a 2-stage reduction per tap.
    "tap_1x1_many_rows": conv_case(3, 64, 9, 9, 32, 1),
    # kernel larger than the image: most taps read padding.
    "tap_kernel_larger_than_image": conv_case(1, 32, 2, 3, 32, 5, pads=2),
}


@functools.cache
def _oracle(name):
    c = TAP_CASES[name]
    rng = np.random.default_rng(1)
    x = grid_values(rng, (c["n"], c["c"], c["h"], c["w"]))
    w = grid_values(rng, (c["o"], c["c"] // c["groups"]) + c["k"])
    bias, bias_dx = grid_values(rng, (c["o"],)), grid_values(rng, (c["c"],))
    kw = dict(stride=c["stride"], padding=c["pads"], dilation=c["dilation"], groups=c["groups"])
    y_shape = jax.eval_shape(lambda x, w: ref_conv2d(x, w, **kw), x, w).shape
    dy = grid_values(rng, y_shape)
    y, vjp = jax.vjp(lambda x_, w_: ref_conv2d(x_, w_, **kw), x, w)
    dx, _ = vjp(dy)
    return dict(
        x=nhwc(x),
        w=hwio(w),
        bias=bias,
        bias_dx=bias_dx,
        dy=nhwc(dy),
        y=nhwc(y + bias.reshape(1, -1, 1, 1)),
        dx=nhwc(dx + bias_dx.reshape(1, -1, 1, 1)),
    )


def _takes_tap_kernel(lib, which, c, x_shape, w_shape, dtype):
    return lib.emu_mma_pass_tap(
        which, DTYPE_CODES[dtype], vec(x_shape), vec(w_shape), vec(conv_attrs(c))
    )


@pytest.mark.parametrize("tile", [MMA_LARGE, MMA_SMALL], ids=["128x128", "64x64"])
@pytest.mark.parametrize("name", sorted(TAP_CASES))
def test_emulated_mma_tap_kernel(conv_emu, name, tile):
    """Forward (16-bit: k-major B) and bwd_data (every mma dtype) through the tap kernel, against
    lax. Values are quarter-integers, exact in bf16/f16/TF32: only the final rounding differs."""
    c = dict(TAP_CASES[name], layout="NHWC")
    r = _oracle(name)
    x, w = r["x"], r["w"]
    for dtype in MMA_DTYPES:
        xa, wa, ba, bxa, dya = (as_dtype(r[k], dtype) for k in ("x", "w", "bias", "bias_dx", "dy"))
        if dtype != "float32":  # float32 forward: HWIO B is not contiguous along k (general kernel)
            assert _takes_tap_kernel(conv_emu, 0, c, x.shape, w.shape, dtype) == 1, (name, dtype)
            got = emu_conv(
                conv_emu, 0, c, x.shape, w.shape, xa, wa, ba, r["y"].shape, dtype, force_tile=tile
            )
            assert_close(jnp.asarray(got), r["y"].astype(dtype), dtype)
        assert _takes_tap_kernel(conv_emu, 1, c, x.shape, w.shape, dtype) == 1, (name, dtype)
        got = emu_conv(
            conv_emu, 1, c, x.shape, w.shape, dya, wa, bxa, x.shape, dtype, force_tile=tile
        )
        assert_close(jnp.asarray(got), r["dx"].astype(dtype), dtype)


@pytest.mark.parametrize("tile", [MMA_LARGE, MMA_SMALL], ids=["128x128", "64x64"])
def test_emulated_mma_tap_kernel_odd_output_channels(conv_emu, tile):
    """bwd_data through the tap kernel with 20 pass output channels (dx channels): the staged
    epilogue's 16-byte stores do not apply (20 % 8 != 0), it stores element by element, and the
    tile's channels past 20 are not written."""
    c = dict(conv_case(1, 20, 7, 6, 32, 3, pads=1), layout="NHWC")
    rng = np.random.default_rng(3)
    x = grid_values(rng, (1, 20, 7, 6))
    w = grid_values(rng, (32, 20, 3, 3))
    bias_dx = grid_values(rng, (20,))
    y, vjp = jax.vjp(lambda x_, w_: ref_conv2d(x_, w_, padding=c["pads"]), x, w)
    dy = grid_values(rng, y.shape)
    dx = nhwc(vjp(dy)[0] + bias_dx.reshape(1, -1, 1, 1))
    for dtype in ("bfloat16", "float16"):
        args = (1, c, nhwc(x).shape, hwio(w).shape)
        assert _takes_tap_kernel(conv_emu, 1, c, nhwc(x).shape, hwio(w).shape, dtype) == 1
        got = emu_conv(
            conv_emu,
            *args,
            as_dtype(nhwc(dy), dtype),
            as_dtype(hwio(w), dtype),
            as_dtype(bias_dx, dtype),
            dx.shape,
            dtype,
            force_tile=tile,
        )
        assert_close(jnp.asarray(got), dx.astype(dtype), dtype)


def test_tap_kernel_applies_only_where_a_stage_stays_in_one_tap(conv_emu):
    """Input channels per group not a multiple of the stage's k (16 with 16-bit types), NCHW,
    or int64-sized operands keep the general kernel."""
    c = dict(conv_case(1, 16, 6, 6, 32, 3, pads=1), layout="NHWC")
    xs, ws = (1, 6, 6, 16), (3, 3, 16, 32)
    assert _takes_tap_kernel(conv_emu, 0, c, xs, ws, "bfloat16") == 0
    assert _takes_tap_kernel(conv_emu, 1, c, xs, ws, "bfloat16") == 1  # pass Cin = 32
    assert _takes_tap_kernel(conv_emu, 0, c, xs, ws, "float32") == 0  # HWIO B not along k
    c = dict(c, layout="NCHW")
    assert _takes_tap_kernel(conv_emu, 1, c, (1, 16, 6, 6), (32, 16, 3, 3), "bfloat16") == 0


@functools.cache
def _filter_oracle(name):
    c = TAP_CASES[name]
    r = _oracle(name)
    kw = dict(stride=c["stride"], padding=c["pads"], dilation=c["dilation"], groups=c["groups"])
    x = jnp.transpose(r["x"], (0, 3, 1, 2))
    w = jnp.transpose(r["w"], (3, 2, 0, 1))
    dy = jnp.transpose(r["dy"], (0, 3, 1, 2))
    _, vjp = jax.vjp(lambda w_: ref_conv2d(x, w_, **kw), w)
    return hwio(vjp(dy)[0])


@pytest.mark.parametrize("tile", [MMA_LARGE, MMA_SMALL], ids=["128x128", "64x64"])
@pytest.mark.parametrize("name", sorted(TAP_CASES))
def test_emulated_mma_filter_pos_kernel(conv_emu, name, tile):
    """bwd_filter NHWC through the position-iterator kernel (conv_filter_mma_pos_kernel: per
    chunk (oh, ow) digits and x offset advanced by constant carries), every mma dtype, against
    lax's float64 dw; padding, strides, dilation and groups move the taps off the image."""
    c = dict(TAP_CASES[name], layout="NHWC")
    r = _oracle(name)
    dw = _filter_oracle(name)
    for dtype in MMA_DTYPES:
        assert (
            conv_emu.emu_mma_filter_pos(
                DTYPE_CODES[dtype], vec(r["x"].shape), vec(dw.shape), vec(conv_attrs(c))
            )
            == 1
        ), (name, dtype)
        got = emu_conv(
            conv_emu,
            2,
            c,
            r["x"].shape,
            dw.shape,
            as_dtype(r["x"], dtype),
            as_dtype(r["dy"], dtype),
            None,
            dw.shape,
            dtype,
            force_tile=tile,
        )
        assert_close(jnp.asarray(got), dw.astype(dtype), dtype)


def _bank_counts(lib):
    out = vec([0, 0, 0, 0])
    lib.emu_bank_counts(out)
    return dict(zip(("ldmatrix", "ldmatrix_conflicts", "stores", "store_conflicts"), out))


@pytest.mark.parametrize("plain", [False, True], ids=["swizzled", "plain_rows"])
@pytest.mark.parametrize("tile", [MMA_LARGE, MMA_SMALL], ids=["128x128", "64x64"])
def test_emulated_mma_shared_layouts_have_no_bank_conflicts(conv_emu, tile, plain):
    """The XOR-swizzled stage layouts (conv2d_mma_tile.cuh: mma_tile_offset) serve every
    ldmatrix / ldmatrix.trans and every warp's 16-byte cp.async stores without bank conflicts,
    counted by the emulation (warp.h), in the forward (k-major B), bwd_data (n-major B) and
    bwd_filter (both k-major) kernels; the same kernels on plain, unswizzled rows (a test switch
    of the emulation) still compute the right values but conflict, which shows the counts can
    tell."""
    name = "tap_c32_o32_3x3"
    c = dict(TAP_CASES[name], layout="NHWC")
    r = _oracle(name)
    dtype = "bfloat16"
    xa, wa, ba, bxa, dya = (as_dtype(r[k], dtype) for k in ("x", "w", "bias", "bias_dx", "dy"))
    dw = _filter_oracle(name)
    runs = {
        "forward": (0, xa, wa, ba, r["y"].shape, r["w"].shape, r["y"]),
        "bwd_data": (1, dya, wa, bxa, r["x"].shape, r["w"].shape, r["dx"]),
        "bwd_filter": (2, xa, dya, None, dw.shape, dw.shape, dw),
    }
    try:
        for direction, (which, a, b, bias, out_shape, w_shape, want) in runs.items():
            conv_emu.emu_bank_counting(1, int(plain))
            got = emu_conv(
                conv_emu,
                which,
                c,
                r["x"].shape,
                w_shape,
                a,
                b,
                bias,
                out_shape,
                dtype,
                force_tile=tile,
            )
            counts = _bank_counts(conv_emu)
            assert_close(jnp.asarray(got), want.astype(dtype), dtype)
            assert counts["ldmatrix"] > 0 and counts["stores"] > 0, (direction, counts)
            conflicts = counts["ldmatrix_conflicts"] + counts["store_conflicts"]
            if plain:
                assert counts["ldmatrix_conflicts"] > 0, (direction, counts)
            else:
                assert conflicts == 0, (direction, counts)
    finally:
        conv_emu.emu_bank_counting(0, 0)
