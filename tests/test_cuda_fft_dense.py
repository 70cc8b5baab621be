"""The CUDA dense / grouped FFT convolution (ffi/cuda/fft_conv_dense.cuh) and its choice
(ffi/cuda/fft_conv_choice.h) under the host emulation (tests/cuda_emulation/fft_dense_kernels.cc):
forward, bwd_data (stride-1 conv_transpose2d) and bwd_filter against float64 references (lax through
reference.ref_conv2d and its VJP) as max |err| / max |y| for standard-normal float32 operands,
dense and grouped, dilation, several transform sizes and tiles, both layouts; the non-finite
fallback; the forced-algorithm errors; the auto choice on the shape rule; determinism.

Skipped without a C++20 compiler or CUDA's headers (tests/emulation.py). On a GPU the same
kernels run through the handlers of ffi/cuda/conv2d.cu.
"""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emulation import DTYPE_CODES, NP_DTYPES, build_emulation, conv_attrs, conv_case, ptr, vec
from reference import ref_conv2d

pytestmark = pytest.mark.slow(
    "builds a CUDA host-emulation library, then emulates 256-thread blocks thread by thread"
)

TOL = 5e-5  # max |err| / max |y|, float32 transforms of standard-normal operands


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulation("fft_dense_kernels.cc", tmp_path_factory.mktemp("emu_fft_dense"))


def _layout(c, layout):
    """(x shape, w shape) of case c in `layout` and the maps from NCHW / OIHW arrays to it."""
    xs = (c["n"], c["c"], c["h"], c["w"])
    ws = (c["o"], c["c"] // c["groups"]) + c["k"]
    if layout == "NCHW":
        return xs, ws, (lambda a: a), (lambda a: a)
    return (
        (xs[0], xs[2], xs[3], xs[1]),
        ws[2:] + (ws[1], ws[0]),
        lambda a: np.transpose(a, (0, 2, 3, 1)),
        lambda a: np.transpose(a, (2, 3, 1, 0)),
    )


def _operands(c, seed=0):
    """Standard-normal float32 x, w, dy, biases (float32-exact float64) and the float64 oracle:
    y = conv(x, w) + bias_o, dx = conv_transpose(dy, w) + bias_c."""
    rng = np.random.default_rng(seed)
    f32 = lambda s: rng.standard_normal(s).astype(np.float32).astype(np.float64)
    x = f32((c["n"], c["c"], c["h"], c["w"]))
    w = f32((c["o"], c["c"] // c["groups"]) + c["k"])
    kw = dict(stride=(1, 1), padding=c["pads"], dilation=c["dilation"], groups=c["groups"])
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
    y, vjp = jax.vjp(lambda x_, w_: ref_conv2d(x_, w_, **kw), f64(x), f64(w))
    dy = f32(y.shape)
    dx, dw = vjp(f64(dy))
    bo, bc = f32((c["o"],)), f32((c["c"],))
    y = np.asarray(y) + bo.reshape(1, -1, 1, 1)
    dx = np.asarray(dx) + bc.reshape(1, -1, 1, 1)
    return dict(x=x, w=w, dy=dy, bo=bo, bc=bc, y=y, dx=dx, dw=np.asarray(dw))


def _run(emu, c, layout, which, a, w, bias, out_shape, plan=(0, 0, 0, 0), dtype="float32",
         max_blocks=3):  # fmt: skip
    """emu_fft_dense_conv on NCHW / OIHW arrays (forward a = x, w; bwd_data a = dy, w;
    bwd_filter a = x, w = dy); the result as NCHW (OIHW) float64."""
    xs, ws, act, wgt = _layout(c, layout)
    conv = lambda v: (
        None if v is None else np.ascontiguousarray(np.asarray(v).astype(NP_DTYPES[dtype]))
    )
    out_map = wgt if which == 2 else act
    out = np.full(out_map(np.zeros(out_shape)).shape, np.nan, NP_DTYPES[dtype])
    rc = emu.emu_fft_dense_conv(
        which,
        DTYPE_CODES[dtype],
        vec(xs),
        vec(ws),
        vec(conv_attrs(dict(c, layout=layout))),
        vec(plan),
        ptr(conv(act(a))),
        ptr(conv(act(w) if which == 2 else wgt(w))),
        ptr(conv(bias)),
        ptr(out),
        ctypes.c_uint(max_blocks),
    )
    assert rc == 0, f"emu_fft_dense_conv returned {rc}"
    back = (lambda v: v) if layout == "NCHW" else (lambda v: np.transpose(v, (0, 3, 1, 2)))
    if which == 2 and layout == "NHWC":
        back = lambda v: np.transpose(v, (3, 2, 0, 1))  # HWIO -> OIHW
    return back(out.astype(np.float64))


def _check(emu, c, layout, which, plan=(0, 0, 0, 0), max_blocks=3):
    o = _operands(c)
    a, b, bias, want = {
        0: (o["x"], o["w"], o["bo"], o["y"]),
        1: (o["dy"], o["w"], o["bc"], o["dx"]),
        2: (o["x"], o["dy"], None, o["dw"]),
    }[which]
    got = _run(emu, c, layout, which, a, b, bias, want.shape, plan, max_blocks=max_blocks)
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= TOL, f"max|err|/max|y| = {err:.3g}"


# Dense, grouped, channel-multiplier depthwise (one input, two outputs per group), dilation,
# asymmetric and negative pads, several tiles per plane, non-square kernels, a kernel larger
# than the image; more rows (N * tiles) than one 32-row GEMM block and more channels per group
# than one 16-deep k chunk.
CASES = {
    "dense_5x5": (conv_case(2, 3, 12, 12, 4, 5, pads=2), (0, 0, 0, 0)),
    "dense_tiles_16": (conv_case(2, 3, 21, 19, 5, 5, pads=2), (16, 16, 12, 12)),
    "dense_rect_tiles": (
        conv_case(1, 4, 20, 17, 3, (3, 5), pads=((1, 2), (2, 0))),
        (8, 32, 6, 28),
    ),
    "grouped_dilated": (
        conv_case(2, 6, 13, 11, 4, 3, dilation=(2, 3), pads=3, groups=2),
        (16, 16, 0, 0),
    ),
    "channel_multiplier": (conv_case(1, 3, 10, 10, 6, 3, pads=1, groups=3), (16, 8, 14, 6)),
    "negative_pads": (conv_case(1, 2, 12, 12, 3, 3, pads=((-1, 2), (1, -2))), (8, 8, 6, 6)),
    "kernel_larger_than_image": (conv_case(1, 2, 3, 3, 2, 5, pads=2), (0, 0, 0, 0)),
    "many_rows_deep_k": (conv_case(3, 20, 9, 9, 35, 3, pads=1), (4, 4, 2, 2)),
}


def _resolve(c, plan):
    """A plan (P, Q, 0, 0) takes the largest tiles P - KE + 1."""
    if plan[0] and not plan[2]:
        keh = (c["k"][0] - 1) * c["dilation"][0] + 1
        kew = (c["k"][1] - 1) * c["dilation"][1] + 1
        return (plan[0], plan[1], plan[0] - keh + 1, plan[1] - kew + 1)
    return plan


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_fft_dense_float32_error(emu, name, layout, which):
    c, plan = CASES[name]
    _check(emu, c, layout, which, _resolve(c, plan))


@pytest.mark.parametrize("which", [0, 1])
def test_fft_dense_non_finite_falls_back_to_direct(emu, which):
    """An inf in x (dy) and a NaN in w: the output is non-finite exactly where the float64
    direct convolution's is (taps outside the plane are skipped, never multiplied by zero), and
    equal to it elsewhere."""
    c = conv_case(1, 4, 10, 10, 4, 3, pads=1, groups=2)
    o = _operands(c)
    a = (o["x"] if which == 0 else o["dy"]).copy()
    w = o["w"].copy()
    a[0, 1, 4, 4] = np.inf
    w[3, 0, 0, 0] = np.nan  # group 1's second output channel, tap (0, 0)
    bias = o["bo"] if which == 0 else o["bc"]
    want = _direct(a, w, bias, c, which)
    got = _run(emu, c, "NCHW", which, a, w, bias, want.shape, (16, 16, 14, 14))
    fin = np.isfinite(want)
    assert not fin.all()
    np.testing.assert_array_equal(np.isfinite(got), fin)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5)


def test_fft_dense_bwd_filter_non_finite_falls_back_to_direct(emu):
    """An inf in x and a NaN in dy: dw is non-finite exactly where the float64 direct sum over
    the positions the direct kernel visits is, and equal to it elsewhere."""
    c = conv_case(1, 4, 8, 8, 4, 3, pads=1, groups=2)
    o = _operands(c)
    x, dy = o["x"].copy(), o["dy"].copy()
    x[0, 0, 0, 0] = np.inf  # group 0
    dy[0, 3, 5, 5] = np.nan  # output channel 3, group 1
    want = np.zeros(o["w"].shape)
    for oc in range(4):
        for cl in range(2):
            cin = (oc // 2) * 2 + cl
            for kh in range(3):
                for kw in range(3):
                    s = 0.0
                    for u in range(8):
                        for v in range(8):
                            ih, iw = u + kh - 1, v + kw - 1
                            if 0 <= ih < 8 and 0 <= iw < 8:
                                s += x[0, cin, ih, iw] * dy[0, oc, u, v]
                    want[oc, cl, kh, kw] = s
    got = _run(emu, c, "NCHW", 2, x, dy, None, want.shape, (8, 8, 6, 6))
    fin = np.isfinite(want)
    assert not fin.all() and fin.any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isfinite(got), fin)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5)


def _direct(a, w, bias, c, which):
    """float64 stride-1 convolution (which 0) or its transpose (which 1), tap by tap, taps
    outside the plane skipped (lax mixes a channel's inf into NaN through zero taps)."""
    n, ca, h, wd = a.shape
    kh_n, kw_n = c["k"]
    dh, dw = c["dilation"]
    (pt, pb), (pl, pr) = c["pads"]
    g = c["groups"]
    keh, kew = (kh_n - 1) * dh + 1, (kw_n - 1) * dw + 1
    if which == 0:
        oh, ow = h + pt + pb - keh + 1, wd + pl + pr - kew + 1
        ph, pw, flip = pt, pl, False
        cout = c["o"]
        cdg, crg = c["c"] // g, c["o"] // g
        wt = lambda cr, cl: w[cr, cl]
    else:
        oh, ow = c["h"], c["w"]
        ph, pw, flip = keh - 1 - pt, kew - 1 - pl, True
        cout = c["c"]
        cdg, crg = c["o"] // g, c["c"] // g
        wt = lambda cr, cl: w[(cr // crg) * cdg + cl, cr % crg]
    out = np.zeros((n, cout, oh, ow)) + bias.reshape(1, -1, 1, 1)
    for b in range(n):
        for cr in range(cout):
            grp = cr // crg
            for cl in range(cdg):
                f = wt(cr, cl)
                for i in range(kh_n):
                    for j in range(kw_n):
                        tap = f[kh_n - 1 - i, kw_n - 1 - j] if flip else f[i, j]
                        for u in range(oh):
                            ih = u + i * dh - ph
                            if not 0 <= ih < h:
                                continue
                            for v in range(ow):
                                iw = v + j * dw - pw
                                if 0 <= iw < wd:
                                    out[b, cr, u, v] += a[b, grp * cdg + cl, ih, iw] * tap
    return out


def test_fft_dense_is_deterministic(emu):
    """Same inputs, same bits, whatever the grid (1 or 3 emulated blocks)."""
    c = conv_case(2, 6, 11, 11, 4, 3, pads=1, groups=2)
    o = _operands(c)
    runs = [_run(emu, c, "NHWC", 0, o["x"], o["w"], o["bo"], o["y"].shape, (8, 8, 6, 6),
                 max_blocks=mb) for mb in (1, 3, 3)]  # fmt: skip
    for r in runs[1:]:
        np.testing.assert_array_equal(r.view(np.uint64), runs[0].view(np.uint64))


def _choice(emu, which, c, dtype="float32"):
    xs, ws, _, _ = _layout(c, "NCHW")
    plan = (ctypes.c_int64 * 5)()
    msg = ctypes.create_string_buffer(512)
    rc = emu.emu_dense_choice(
        which,
        DTYPE_CODES[dtype],
        vec(xs),
        vec(ws),
        vec(conv_attrs(dict(c, layout="NCHW"))),
        plan,
        msg,
        ctypes.c_int64(512),
    )
    return rc, tuple(plan), msg.value.decode()


FORCED_ERRORS = {
    "stride2": (0, conv_case(1, 4, 16, 16, 8, 5, stride=2, pads=2), "float32", "need stride 1"),
    "float64": (1, conv_case(1, 4, 16, 16, 8, 5, pads=2), "float64", "float64 runs the direct"),
    "bwd_filter_stride2": (
        2,
        conv_case(1, 4, 16, 16, 8, 5, stride=2, pads=2),
        "float32",
        "need stride 1",
    ),
    "kernel_over_64": (0, conv_case(1, 2, 70, 70, 2, 33, dilation=2, pads=32), "float32", "(64)"),
    "workspace": (0, conv_case(64, 512, 64, 64, 512, 7, pads=3), "float32", "512 MiB"),
}


@pytest.mark.parametrize("name", list(FORCED_ERRORS))
def test_forced_fft_dense_that_cannot_run_is_an_error(emu, monkeypatch, name):
    which, c, dtype, why = FORCED_ERRORS[name]
    monkeypatch.setenv("JAXCONV_CUDA_CONV_ALGO", "fft")
    rc, _, msg = _choice(emu, which, c, dtype=dtype)
    assert rc == 2
    assert msg.startswith("JAXCONV_CUDA_CONV_ALGO=fft cannot run this call: ") and why in msg, msg
    monkeypatch.setenv("JAXCONV_CUDA_CONV_ALGO", "auto")
    assert _choice(emu, which, c, dtype=dtype)[0] == 0  # auto: direct, no error


# (N, C = O, plane, kernel): the shape rule of the (uncalibrated) model.
FFT_SHAPES = [(32, 64, 56, 9), (32, 64, 56, 11), (32, 128, 28, 13), (32, 128, 28, 15)]
DIRECT_SHAPES = [(32, 64, 56, 3), (32, 64, 56, 1), (32, 128, 28, 3), (32, 256, 14, 3),
                 (32, 512, 7, 3), (32, 256, 14, 1), (8, 2048, 7, 1), (8, 64, 56, 3)]  # fmt: skip


def test_auto_choice_follows_the_shape_rule(emu, monkeypatch):
    monkeypatch.delenv("JAXCONV_CUDA_CONV_ALGO", raising=False)
    for n, ch, hw, k in FFT_SHAPES:
        c = conv_case(n, ch, hw, hw, ch, k, pads=k // 2)
        for which in (0, 1):
            rc, plan, _ = _choice(emu, which, c)
            assert rc == 4, (n, ch, hw, k, which, rc)
            assert 0 < plan[4] <= 512 << 20
    for n, ch, hw, k in DIRECT_SHAPES:
        c = conv_case(n, ch, hw, hw, ch, k, pads=k // 2)
        for which in (0, 1, 2):
            assert _choice(emu, which, c)[0] == 0, (n, ch, hw, k, which)
    c = conv_case(32, 64, 56, 56, 64, 11, pads=5)
    assert _choice(emu, 2, c)[0] == 4  # bwd_filter: the same model
    # Forced, a 3x3 layer runs the dense FFT; direct never does.
    c = conv_case(2, 16, 14, 14, 16, 3, pads=1)
    monkeypatch.setenv("JAXCONV_CUDA_CONV_ALGO", "fft")
    assert _choice(emu, 0, c)[0] == 4
    monkeypatch.setenv("JAXCONV_CUDA_CONV_ALGO", "direct")
    assert _choice(emu, 0, conv_case(8, 64, 56, 56, 64, 9, pads=4))[0] == 0
