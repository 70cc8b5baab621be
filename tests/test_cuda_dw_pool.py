"""The memory-bound CUDA kernels under the host emulation: max pooling (indexed and values-only
forward, NHWC channel vectors, 32-bit FastDivmod index math, the int64 path) and depthwise
convolution, against the oracles of reference.py (lax.reduce_window / the NumPy pooling loop,
lax.conv_general_dilated), in all dtypes and both layouts, plus a seeded fuzz over random
geometries.

The kernels (ffi/cuda/*_kernels.cuh) compile with a host C++ compiler through
tests/cuda_emulation/emulate.h (tests/emulation.py); skipped without a C++20
compiler or CUDA's headers. On a GPU the same kernels run for real in test_pool.py/test_conv.py.
"""

from __future__ import annotations

import ctypes
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from emulation import (
    DTYPE_CODES,
    LAYOUT_CODES,
    MAX_BLOCKS,
    NP_DTYPES,
    build_emulation,
    conv_attrs,
    conv_case,
    grid_values,
    ptr,
    vec,
)
from reference import ref_max_pool2d, ref_max_pool2d_lax, tol

pytestmark = pytest.mark.slow(
    "builds a CUDA host-emulation library (a C++ compile of tens of "
    "seconds per worker), then emulates kernels thread by thread"
)


DTYPES = list(DTYPE_CODES)
VECTOR_WIDTH = {"float32": 4, "float64": 2, "float16": 8, "bfloat16": 8}  # 16 bytes


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulation("pool_dw_kernels.cc", tmp_path_factory.mktemp("emu_dw_pool"))


def _buffer(shape, dtype, fill, misalign):
    """A C-contiguous array of `shape`, 16-byte aligned, or one element past an aligned start
    when `misalign` (so the kernels must take their element-wise lanes)."""
    dt = np.dtype(dtype)
    size = int(np.prod(shape))
    raw = np.full(size + 64, fill, dt)
    start = (-raw.ctypes.data % 16) // dt.itemsize
    start += 1 if misalign else 0
    out = raw[start : start + size].reshape(shape)
    assert (out.ctypes.data % 16 == 0) != misalign
    return out


# ---------------------------------------------------------------------------------------------
# FastDivmod and the index-width window helpers.

DIVISORS = [
    1,
    2,
    3,
    5,
    6,
    7,
    8,
    9,
    12,
    25,
    49,
    64,
    96,
    100,
    255,
    256,
    257,
    1000,
    4095,
    65535,
    65536,
    65537,
    1 << 20,
    (1 << 20) + 1,
    12345679,
    (1 << 30) - 1,
    1 << 30,
    (1 << 30) + 1,
    (1 << 31) - 1,
]


@pytest.mark.parametrize("d", DIVISORS)
def test_fast_divmod_matches_division(emu, d):
    rng = np.random.default_rng(d)
    top = (1 << 31) - 1
    edges = [
        0,
        1,
        d - 1,
        d,
        d + 1,
        2 * d - 1,
        2 * d,
        top,
        top - 1,
        top - d,
        (top // d) * d,
        (top // d) * d - 1,
    ]
    n = np.concatenate(
        [
            np.array([e for e in edges if 0 <= e <= top], np.uint32),
            rng.integers(0, top + 1, 20000, dtype=np.uint32),
            rng.integers(0, min(top, 64 * d) + 1, 2000, dtype=np.uint32),
        ]
    )
    q, r = np.zeros_like(n), np.zeros_like(n)
    u32 = lambda a: a.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))
    assert (
        emu.emu_fast_divmod(ctypes.c_uint32(d), u32(n), ctypes.c_int64(n.size), u32(q), u32(r)) == 0
    )
    np.testing.assert_array_equal(q, n // np.uint32(d))
    np.testing.assert_array_equal(r, n % np.uint32(d))


@pytest.mark.parametrize("d", DIVISORS)
def test_fast_divmod64_matches_division(emu, d):
    rng = np.random.default_rng(d + 1)
    top = (1 << 62) - 1
    edges = [
        0,
        1,
        d - 1,
        d,
        d + 1,
        top,
        top - 1,
        (top // d) * d,
        (top // d) * d - 1,
        (1 << 31) * d,
        (1 << 31) * d - 1,
    ]
    n = np.concatenate(
        [
            np.array([e for e in edges if 0 <= e <= top], np.uint64),
            rng.integers(0, top, 20000, dtype=np.uint64, endpoint=True),
            rng.integers(0, 1 << 33, 2000, dtype=np.uint64),
        ]
    )
    q = np.zeros_like(n)
    u64 = lambda a: a.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64))
    assert emu.emu_fast_divmod64(ctypes.c_uint64(d), u64(n), ctypes.c_int64(n.size), u64(q)) == 0
    np.testing.assert_array_equal(q, n // np.uint64(d))


def test_tap_helpers_match_brute_force(emu):
    out = (ctypes.c_int64 * 4)()
    for s in range(1, 5):
        for d in range(1, 4):
            for k in range(1, 5):
                for pad in range(4):
                    n_in = 9
                    n_out = max(1, (n_in + 2 * pad - d * (k - 1) - 1) // s + 1)
                    for i in range(max(n_in, n_out)):
                        emu.emu_tap_helpers(
                            *(ctypes.c_int64(v) for v in (i, s, pad, d, k, n_in, n_out)), out
                        )
                        taps = [t for t in range(k) if 0 <= i * s - pad + t * d < n_in]
                        lo, hi = out[0], out[1]
                        assert list(range(lo, hi)) == taps or (not taps and hi <= lo), (
                            "taps",
                            i,
                            s,
                            d,
                            k,
                            pad,
                            lo,
                            hi,
                        )
                        if i < n_in:
                            spans = [
                                o
                                for o in range(n_out)
                                if o * s - pad <= i <= o * s - pad + (k - 1) * d
                            ]
                            assert list(range(out[2], out[3])) == spans, (
                                "covering",
                                i,
                                s,
                                d,
                                k,
                                pad,
                            )


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
                assert (
                    emu.emu_pool_kernel(
                        0,
                        code,
                        vec(xa.shape),
                        attrs,
                        ptr(xa),
                        None,
                        ptr(y),
                        ptr(got_idx),
                        bits,
                        MAX_BLOCKS,
                    )
                    == 0
                ), tag
                np.testing.assert_array_equal(got_idx, idx, err_msg=tag)
                np.testing.assert_array_equal(y.astype(np.float64), vals, err_msg=tag)
                # The values-only forward: the same y, bit for bit (NaN included).
                y_values = _buffer(vals.shape, NP_DTYPES[dtype], 7, misalign)
                assert (
                    emu.emu_pool_kernel(
                        2,
                        code,
                        vec(xa.shape),
                        attrs,
                        ptr(xa),
                        None,
                        ptr(y_values),
                        None,
                        bits,
                        MAX_BLOCKS,
                    )
                    == 0
                ), tag
                np.testing.assert_array_equal(
                    y_values.view(f"u{y.itemsize}"), y.view(f"u{y.itemsize}"), err_msg=tag
                )
                dya = _buffer(dy.shape, NP_DTYPES[dtype], 0, misalign)
                dya[...] = dy
                ia = _buffer(idx.shape, np.int32, 0, misalign)
                ia[...] = idx
                got_dx = _buffer(x.shape, NP_DTYPES[dtype], np.nan, misalign)
                assert (
                    emu.emu_pool_kernel(
                        1,
                        code,
                        vec(xa.shape),
                        attrs,
                        ptr(dya),
                        ptr(ia),
                        ptr(got_dx),
                        None,
                        bits,
                        MAX_BLOCKS,
                    )
                    == 0
                ), tag
                # dy and its sums are quarter-integers below 2^8: exact in every dtype
                np.testing.assert_allclose(
                    got_dx.astype(np.float64), dx, rtol=rtol, atol=atol, err_msg=tag
                )


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", sorted(POOL_CASES))
def test_emulated_pool_vector_kernels(emu, name, layout):
    """Every dtype on the int32 path; the int64 path in one full and one half type."""
    _check_pool(emu, POOL_CASES[name], layout, DTYPES, (32,))
    _check_pool(emu, POOL_CASES[name], layout, ["float32", "float16"], (64,))


def test_pool_picks_the_32_bit_path_for_small_tensors(emu):
    """index_bits=0 goes through max_pool2d_forward/backward, which pick the int32 path here;
    an int32 request on a geometry past the 2^30-element bound is refused."""
    _check_pool(emu, POOL_CASES["3x3s2_pad1_c8"], "NHWC", ["bfloat16"], (0,))
    attrs = vec([2, 2, 2, 2, 1, 1, 0, 0, 0, 0, 0, LAYOUT_CODES["NHWC"]])
    big = vec([1 << 10, 1 << 10, 1 << 10, 2])  # 2^31 elements: never allocated, refused first
    assert emu.emu_pool_kernel(0, 0, big, attrs, None, None, None, None, 32, 1) == 1


def test_emulated_pool_fuzz(emu):
    """Seeded random geometries (layout, dtype, index width and alignment vary per draw)."""
    rng = np.random.default_rng(20261202)
    for draw in range(24):
        k = tuple(int(v) for v in rng.integers(1, 4, 2))
        s = tuple(int(v) for v in rng.integers(1, 4, 2))
        d = tuple(int(v) for v in rng.integers(1, 3, 2))
        pads = tuple(
            (int(rng.integers(0, k[i] // 2 + 1)), int(rng.integers(0, k[i] // 2 + 1)))
            for i in range(2)
        )
        h, w = (int(v) for v in rng.integers(1, 10, 2))
        eff = [d[i] * (k[i] - 1) + 1 for i in range(2)]
        h, w = max(h, eff[0] - sum(pads[0])), max(w, eff[1] - sum(pads[1]))
        shape = (int(rng.integers(1, 3)), int(rng.integers(1, 19)), h, w)
        case = (shape, k, s, pads, d, bool(rng.integers(0, 2)))
        layout = ["NCHW", "NHWC"][draw % 2]
        dtype = DTYPES[draw % 4]
        _check_pool(emu, case, layout, [dtype], (32, 64)[draw % 2 : draw % 2 + 1], seed=draw)


# ---------------------------------------------------------------------------------------------
# Direct convolution: depthwise (groups == C, channel multiplier M = O / C) and few channels
# (C <= 4).


# jax#26266 (dilated grouped/depthwise convolutions wrong on H100) is the *_dilated cases.
DIRECT_CASES = {
    "dw_3x3_pad1": conv_case(2, 6, 7, 7, 6, 3, pads=1, groups=6),
    "dw_multiplier2_stride2": conv_case(2, 5, 8, 7, 10, 3, stride=2, pads=1, groups=5),
    "dw_multiplier3_dilated": conv_case(1, 4, 9, 10, 12, 3, dilation=2, pads=2, groups=4),
    "dw_dilated_anisotropic": conv_case(
        2, 3, 11, 9, 3, (3, 2), stride=(1, 2), dilation=(3, 2), pads=((3, 1), (2, 0)), groups=3
    ),
    "dw_5x5_stride2_dilated": conv_case(1, 8, 12, 12, 8, 5, stride=2, dilation=2, pads=4, groups=8),
    "dw_negative_pads": conv_case(1, 4, 7, 8, 8, 3, pads=((-1, 2), (1, -2)), groups=4),
    "dw_many_channels": conv_case(1, 40, 4, 4, 40, 3, pads=1, groups=40),
    "lenet_c1_5x5": conv_case(2, 1, 12, 12, 6, 5),
    "stem_c3_7x7_stride2": conv_case(1, 3, 13, 12, 8, 7, stride=2, pads=3),
    "c4_groups2": conv_case(2, 4, 6, 6, 6, 3, stride=(2, 1), pads=((1, 0), (0, 1)), groups=2),
    "c2_dilated_stride3": conv_case(1, 2, 11, 10, 3, 3, stride=3, dilation=2, pads=(2, 1)),
    "kernel_larger_than_image": conv_case(1, 2, 2, 2, 4, 5, pads=2, groups=2),
    # Positions enough for bwd_filter's split (plan_direct_filter): 2 splits in NCHW, 4 in NHWC
    # (test_direct_filter_split_plan checks the counts).
    "dw_split_positions": conv_case(2, 2, 48, 48, 2, 3, pads=1, groups=2),
    "stem_c3_split_positions": conv_case(2, 3, 30, 30, 4, 3, pads=1),
}


@functools.cache
def _direct_oracle(key):
    """lax's results (NCHW, float64): y = conv(x, w) + bias, and at dy the VJP of the bias-free
    convolution, dx (plus bias_dx) and dw."""
    import jax

    from reference import ref_conv2d

    c, seed = dict(key[0]), key[1]
    rng = np.random.default_rng(seed)
    x = grid_values(rng, (c["n"], c["c"], c["h"], c["w"]))
    w = grid_values(rng, (c["o"], c["c"] // c["groups"]) + c["k"])
    bias, bias_dx = grid_values(rng, (c["o"],)), grid_values(rng, (c["c"],))
    kw = dict(stride=c["stride"], padding=c["pads"], dilation=c["dilation"], groups=c["groups"])
    y, vjp = jax.vjp(lambda x_, w_: ref_conv2d(x_, w_, **kw), x, w)
    dy = grid_values(rng, y.shape)
    dx, dw = vjp(dy)
    return dict(
        x=x,
        w=w,
        bias=bias,
        bias_dx=bias_dx,
        dy=dy,
        y=y + bias.reshape(1, -1, 1, 1),
        dx=dx + bias_dx.reshape(1, -1, 1, 1),
        dw=dw,
    )


def _check_direct(emu, c, layout, dtypes, index_bits_list, seed=0):
    from reference import assert_close

    r = _direct_oracle((tuple(sorted(c.items())), seed))
    acts = (
        (lambda a: np.asarray(a))
        if layout == "NCHW"
        else (lambda a: np.asarray(a).transpose(0, 2, 3, 1))
    )
    wgts = (
        (lambda a: np.asarray(a))
        if layout == "NCHW"
        else (lambda a: np.asarray(a).transpose(2, 3, 1, 0))
    )
    x, dy, y, dx = (acts(r[k]) for k in ("x", "dy", "y", "dx"))
    w, dw = wgts(r["w"]), wgts(r["dw"])
    attrs = vec(conv_attrs(c, layout))
    for dtype in dtypes:
        code = DTYPE_CODES[dtype]
        cast = lambda a: np.ascontiguousarray(np.asarray(a).astype(NP_DTYPES[dtype]))
        xa, wa, ba, bxa, dya = (cast(a) for a in (x, w, r["bias"], r["bias_dx"], dy))
        for bits in index_bits_list:
            tag = f"{dtype} index_bits={bits}"
            for which, a, b, bias, want in (
                (0, xa, wa, ba, y),
                (1, dya, wa, bxa, dx),
                (2, xa, dya, None, dw),
            ):
                got = np.full(want.shape, np.nan, NP_DTYPES[dtype])
                rc = emu.emu_direct_conv(
                    which,
                    code,
                    vec(x.shape),
                    vec(w.shape),
                    attrs,
                    ptr(a),
                    ptr(b),
                    ptr(bias),
                    ptr(got),
                    bits,
                    MAX_BLOCKS,
                )
                assert rc == 0, (tag, which, rc)
                assert_close(jnp.asarray(got), jnp.asarray(want).astype(dtype), dtype)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", sorted(DIRECT_CASES))
def test_emulated_direct_conv_kernels(emu, name, layout):
    """Every dtype on the int32 path; the int64 path (same kernels, other index width) in one
    full and one half type to keep the emulation's thread count down."""
    _check_direct(emu, DIRECT_CASES[name], layout, DTYPES, (32,))
    _check_direct(emu, DIRECT_CASES[name], layout, ["float32", "bfloat16"], (64,))


def test_direct_conv_takes_only_depthwise_and_few_channels(emu):
    """conv2d.cu sends a geometry to the direct kernels only when groups == C or C <= 4."""
    attrs = vec(conv_attrs(conv_case(1, 8, 5, 5, 8, 3, groups=2), "NCHW"))
    x = np.zeros((1, 8, 5, 5), np.float32)
    w = np.zeros((8, 4, 3, 3), np.float32)
    y = np.zeros((1, 8, 3, 3), np.float32)
    assert (
        emu.emu_direct_conv(
            0, 0, vec(x.shape), vec(w.shape), attrs, ptr(x), ptr(w), None, ptr(y), 0, MAX_BLOCKS
        )
        == 3
    )


def test_emulated_direct_conv_fuzz(emu):
    """Seeded random depthwise / few-channel geometries (layout, dtype and index width vary)."""
    rng = np.random.default_rng(26266)
    for draw in range(16):
        depthwise = draw % 2 == 0
        ch = int(rng.integers(1, 9)) if depthwise else int(rng.integers(1, 5))
        groups = ch if depthwise else int(rng.choice([g for g in (1, 2, 4) if ch % g == 0]))
        o = groups * int(rng.integers(1, 4))
        k = tuple(int(v) for v in rng.integers(1, 5, 2))
        s = tuple(int(v) for v in rng.integers(1, 4, 2))
        d = tuple(int(v) for v in rng.integers(1, 4, 2))
        pads = tuple((int(rng.integers(0, 4)), int(rng.integers(0, 4))) for _ in range(2))
        eff = [d[i] * (k[i] - 1) + 1 for i in range(2)]
        h = max(int(rng.integers(1, 12)), eff[0] - sum(pads[0]))
        w = max(int(rng.integers(1, 12)), eff[1] - sum(pads[1]))
        c = conv_case(
            int(rng.integers(1, 3)), ch, h, w, o, k, stride=s, dilation=d, pads=pads, groups=groups
        )
        layout = ["NCHW", "NHWC"][(draw // 2) % 2]
        _check_direct(emu, c, layout, [DTYPES[draw % 4]], ((32, 64)[(draw // 4) % 2],), seed=draw)


# ---------------------------------------------------------------------------------------------
# The direct bwd_filter's split over positions (plan_direct_filter): a function of the shape
# only, enough blocks for an H100, partial sums added in split order.

H100_SMS = 132


def _filter_plan(emu, c, layout, dtype="float32"):
    """plan_direct_filter as the launch uses it: dict of channel_lanes, items, splits, chunk,
    blocks, workspace (bytes)."""
    from emulation import layout_shapes

    xs, ws = layout_shapes({**c, "layout": layout})
    out = (ctypes.c_int64 * 6)()
    rc = emu.emu_direct_filter_plan(
        DTYPE_CODES[dtype], vec(xs), vec(ws), vec(conv_attrs(c, layout)), out
    )
    assert rc == 0, rc
    return dict(zip(("channel_lanes", "items", "splits", "chunk", "blocks", "workspace"), out))


def _bench_direct_cases():
    """Every MobileNet layer and the ResNet-50 stem of the bench, at its GPU batch."""
    from jaxconv.bench import cases

    out = {}
    for case in cases("mobilenet", "gpu") + cases("resnet50", "gpu")[:1]:
        assert case.groups == case.c or case.c <= 4, case.name  # takes the direct kernels
        out[f"{case.set}/{case.name}"] = conv_case(
            case.n,
            case.c,
            case.h,
            case.w,
            case.out_channels,
            case.kernel,
            stride=case.stride,
            pads=case.padding,
            groups=case.groups,
        )
    return out


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_direct_filter_fills_an_h100_on_every_bench_shape(emu, layout):
    """Issue 21 item 4: the direct bwd_filter of every MobileNet / ResNet-stem shape of the bench
    launches at least 4 blocks per SM of a 132-SM H100 (before the split: 9 blocks for the
    32-channel 3x3 depthwise layer in NHWC), and the split covers the positions exactly."""
    for name, c in _bench_direct_cases().items():
        positions = (
            c["n"]
            * ((c["h"] + sum(c["pads"][0]) - c["k"][0]) // c["stride"][0] + 1)
            * ((c["w"] + sum(c["pads"][1]) - c["k"][1]) // c["stride"][1] + 1)
        )
        for dtype in DTYPES:
            f = _filter_plan(emu, c, layout, dtype)
            assert f["blocks"] == f["items"] * f["splits"], (name, f)
            assert f["blocks"] >= 4 * H100_SMS, (name, layout, dtype, f)
            # No empty split, none missing.
            assert (f["splits"] - 1) * f["chunk"] < positions <= f["splits"] * f["chunk"], (name, f)
            acc = 8 if dtype == "float64" else 4
            o, kg = c["o"], c["c"] // c["groups"] * c["k"][0] * c["k"][1]
            want_ws = f["splits"] * o * kg * acc if f["splits"] > 1 else 0
            assert f["workspace"] == want_ws, (name, f)


def test_direct_filter_split_plan(emu):
    """The split cases of DIRECT_CASES do split (so test_emulated_direct_conv_kernels checks the
    partial sums and their second pass), and tiny reductions do not."""
    assert _filter_plan(emu, DIRECT_CASES["dw_split_positions"], "NCHW")["splits"] == 2
    assert _filter_plan(emu, DIRECT_CASES["dw_split_positions"], "NHWC")["splits"] == 4
    assert _filter_plan(emu, DIRECT_CASES["stem_c3_split_positions"], "NHWC")["splits"] == 3
    tiny = _filter_plan(emu, DIRECT_CASES["dw_3x3_pad1"], "NHWC")
    assert tiny["splits"] == 1 and tiny["workspace"] == 0


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_direct_filter_split_is_bitwise_deterministic(emu, layout):
    """Random (not grid) values, so that the summation order shows in the bits: repeated runs,
    and runs whose emulated grid holds another number of blocks (each block then loops over
    other (item, split) pairs), give identical bits; the values match a float64 reference."""
    import jax

    from reference import assert_close, ref_conv2d

    c = DIRECT_CASES["dw_split_positions"]
    assert _filter_plan(emu, c, layout)["splits"] > 1
    rng = np.random.default_rng(7)
    x = rng.standard_normal((c["n"], c["c"], c["h"], c["w"]))
    w = rng.standard_normal((c["o"], c["c"] // c["groups"]) + c["k"])
    kw = dict(stride=c["stride"], padding=c["pads"], dilation=c["dilation"], groups=c["groups"])
    y, vjp = jax.vjp(lambda x_, w_: ref_conv2d(x_, w_, **kw), jnp.asarray(x), jnp.asarray(w))
    dy = rng.standard_normal(y.shape)
    (dw_ref,) = vjp(jnp.asarray(dy))[1:]
    if layout == "NHWC":
        x, dy, dw_ref = (
            x.transpose(0, 2, 3, 1),
            dy.transpose(0, 2, 3, 1),
            dw_ref.transpose(2, 3, 1, 0),
        )
    xa, dya = (np.ascontiguousarray(a, np.float32) for a in (x, dy))
    w_shape = (c["o"], c["c"] // c["groups"]) + c["k"] if layout == "NCHW" else c["k"] + (1, c["o"])
    runs = []
    for max_blocks in (MAX_BLOCKS, MAX_BLOCKS, 5, 1):
        got = np.full(w_shape, np.nan, np.float32)
        rc = emu.emu_direct_conv(
            2,
            0,
            vec(xa.shape),
            vec(w_shape),
            vec(conv_attrs(c, layout)),
            ptr(xa),
            ptr(dya),
            None,
            ptr(got),
            0,
            max_blocks,
        )
        assert rc == 0, rc
        runs.append(got)
    for other in runs[1:]:
        np.testing.assert_array_equal(other.view(np.uint32), runs[0].view(np.uint32))
    assert_close(jnp.asarray(runs[0]), jnp.asarray(dw_ref).astype("float32"), "float32")
