"""The CUDA FFT depthwise convolution (ffi/cuda/fft_conv.cuh) and its choice
(ffi/cuda/fft_conv_choice.h) under the host emulation (tests/cuda_emulation/fft_kernels.cc):
forward, bwd_data and bwd_filter against float64 references (lax through reference.ref_conv2d
and its VJP)
as max |err| / max |y| for standard-normal float32 operands, per transform size and tile, both
layouts, dilation, several tiles; the half types; the non-finite fallback; the forced-algorithm
errors; determinism; the emulated __syncthreads_or the kernel relies on.

Skipped without a C++20 compiler or CUDA's headers (tests/emulation.py). On a GPU the same
kernel runs through the handlers of ffi/cuda/conv2d.cu.
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

THREADS = 256  # kFftThreads


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulation("fft_kernels.cc", tmp_path_factory.mktemp("emu_fft"))


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


def _oracle(c, x, w, bias, dy):
    """float64: y = conv(x, w) + bias and, at dy, dx = conv_transpose(dy, w) + bias and the
    filter gradient dw (NCHW / OIHW)."""
    kw = dict(stride=c["stride"], padding=c["pads"], dilation=c["dilation"], groups=c["groups"])
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
    y, vjp = jax.vjp(lambda x_, w_: ref_conv2d(x_, w_, **kw), f64(x), f64(w))
    dx, dw = vjp(f64(dy))
    b = np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
    return np.asarray(y) + b, np.asarray(dx) + b, np.asarray(dw)


def _run(emu, c, layout, which, a, b, bias, plan=(0, 0, 0, 0), dtype="float32", max_blocks=3):
    """emu_fft_conv on NCHW / OIHW arrays: forward a = x, b = w; bwd_data a = dy, b = w;
    bwd_filter a = x, b = dy (bias None). The result as NCHW (OIHW) float64."""
    xs, ws, act, wgt = _layout(c, layout)
    cl = dict(c, layout=layout)
    conv = lambda v: (
        None if v is None else np.ascontiguousarray(np.asarray(v).astype(NP_DTYPES[dtype]))
    )
    a_l, b_l, bias_l = conv(act(a)), conv(act(b) if which == 2 else wgt(b)), conv(bias)
    out_map = wgt if which == 2 else act
    out = np.full(out_map(np.zeros(c["out_shape"][which])).shape, np.nan, NP_DTYPES[dtype])
    rc = emu.emu_fft_conv(
        which,
        DTYPE_CODES[dtype],
        vec(xs),
        vec(ws),
        vec(conv_attrs(cl)),
        vec(plan),
        ptr(a_l),
        ptr(b_l),
        ptr(bias_l),
        ptr(out),
        ctypes.c_uint(max_blocks),
    )
    assert rc == 0, f"emu_fft_conv returned {rc}"
    back = (lambda v: v) if layout == "NCHW" else (lambda v: np.transpose(v, (0, 3, 1, 2)))
    if which == 2 and layout == "NHWC":
        back = lambda v: np.transpose(v, (3, 2, 0, 1))  # HWIO -> OIHW
    return back(out.astype(np.float64))


def _operands(c, seed=0):
    """Standard-normal float32 x, w, bias, dy (as float32-exact float64 arrays) and the oracle."""
    rng = np.random.default_rng(seed)
    f32 = lambda s: rng.standard_normal(s).astype(np.float32).astype(np.float64)
    x = f32((c["n"], c["c"], c["h"], c["w"]))
    w = f32((c["o"], 1) + c["k"])
    bias = f32((c["c"],))
    y_shape = jax.eval_shape(
        lambda a, b: ref_conv2d(
            a, b, stride=(1, 1), padding=c["pads"], dilation=c["dilation"], groups=c["groups"]
        ),
        jnp.zeros(x.shape),
        jnp.zeros(w.shape),
    ).shape
    dy = f32(y_shape)
    c["out_shape"] = {0: y_shape, 1: x.shape, 2: w.shape}
    y, dx, dw = _oracle(c, x, w, bias, dy)
    return x, w, bias, dy, y, dx, dw


def _direct_depthwise(a, w, bias, k, pad, which):
    """float64 direct depthwise stride-1 convolution (which 0) or its transpose (which 1),
    tap by tap, taps outside the plane skipped (not multiplied by a zero: inf * 0 would be
    NaN). lax's grouped convolution is no oracle here: it mixes the channels' inf and NaN."""
    n, c, h, wd = a.shape
    (kh_n, kw_n), (pt, pl) = k, pad
    oh, ow = (h + 2 * pt - kh_n + 1, wd + 2 * pl - kw_n + 1) if which == 0 else (h, wd)
    out = np.zeros((n, c, oh, ow)) + bias.reshape(1, -1, 1, 1)
    for kh in range(kh_n):
        for kw in range(kw_n):
            # forward reads a[u + kh - pt]; the transpose a[u + pt - kh]
            dh, dw_ = (kh - pt, kw - pl) if which == 0 else (pt - kh, pl - kw)
            shifted = np.zeros((n, c, oh, ow))
            mask = np.zeros((oh, ow), bool)
            u = np.arange(oh)[:, None] + dh
            v = np.arange(ow)[None, :] + dw_
            inside = (u >= 0) & (u < h) & (v >= 0) & (v < wd)
            mask |= inside
            uu, vv = np.where(inside)
            shifted[:, :, uu, vv] = a[:, :, uu + dh, vv + dw_]
            out += np.where(mask, shifted * w[:, 0, kh, kw].reshape(1, -1, 1, 1), 0.0)
    return out


def _dw(n, c, h, w, k, **kw):
    return conv_case(n, c, h, w, c, k, groups=c, **kw)


# (case, plan P, Q, TH, TW or zeros for the chosen one): every transform side 8..64, square and
# oblong, whole plane and several tiles (with a partial last tile), dilation, asymmetric and
# negative pads, an oblong kernel.
CASES = {
    "7x7_chosen_whole_plane": (_dw(2, 3, 12, 12, 7, pads=3), (0, 0, 0, 0)),
    "7x7_8x8_many_tiles": (_dw(1, 2, 13, 11, 7, pads=3), (8, 8, 2, 2)),
    "5x5_dil2_16x16_tiles": (
        _dw(1, 2, 20, 18, 5, dilation=2, pads=((4, 3), (2, 5))),
        (16, 16, 8, 8),
    ),
    "3x7_dil_rect_16x32": (
        _dw(2, 2, 11, 23, (3, 7), dilation=(2, 1), pads=((-1, 2), (3, 1))),
        (16, 32, 12, 20),
    ),
    "13x13_32x32": (_dw(1, 3, 30, 27, 13, pads=6), (32, 32, 20, 20)),
    "31x31_64x64_whole": (_dw(1, 2, 20, 24, 31, pads=15), (0, 0, 0, 0)),
    "9x9_64x16_oblong": (_dw(1, 2, 40, 20, 9, pads=4), (64, 16, 56, 8)),
}


DIRECTIONS = [0, 1, 2]
DIRECTION_IDS = ["forward", "bwd_data", "bwd_filter"]


def _direction(which, x, w, bias, dy, y, dx, dw):
    """(a, b, bias, want) of direction `which` for _run."""
    return [(x, w, bias, y), (dy, w, bias, dx), (x, dy, None, dw)][which]


@pytest.mark.parametrize("which", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", list(CASES))
def test_fft_conv_float32_error(emu, name, layout, which):
    """max |err| / max |y| <= 1e-5 against float64 for standard-normal float32 operands."""
    c, plan = CASES[name]
    c = dict(c)
    a, b, bias, want = _direction(which, *_operands(c))
    got = _run(emu, c, layout, which, a, b, bias, plan)
    rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert rel <= 1e-5, (name, layout, which, rel)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fft_conv_half_types(emu, dtype):
    """Half operands load into float32 and round once on store: against the float64 oracle of
    the rounded operands, the error is that last rounding (half an ulp of the largest value)."""
    c = dict(CASES["5x5_dil2_16x16_tiles"][0])
    x, w, bias, dy, *_ = _operands(c)
    rnd = lambda a: np.asarray(a).astype(NP_DTYPES[dtype]).astype(np.float64)
    x, w, bias, dy = map(rnd, (x, w, bias, dy))
    y, dx, dw = _oracle(c, x, w, bias, dy)
    ulp = {"float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    for which in DIRECTIONS:
        a, b, bias_, want = _direction(which, x, w, bias, dy, y, dx, dw)
        got = _run(emu, c, "NHWC", which, a, b, bias_, (16, 16, 8, 8), dtype=dtype)
        rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
        assert rel <= ulp, (which, rel)


@pytest.mark.parametrize("which", [0, 1], ids=["forward", "bwd_data"])
def test_fft_conv_non_finite_falls_back_to_direct(emu, which):
    """A NaN in one tile and an inf weight in another channel: the result is non-finite exactly
    where the float64 direct convolution's is, and close to it elsewhere (the affected blocks
    compute their tiles tap by tap; the others stay FFT)."""
    c = dict(_dw(1, 3, 20, 20, 5, pads=2))
    x, w, bias, dy, y, dx, _ = _operands(c)
    # the direct oracle agrees with lax's where the operands are finite
    finite_want = _direct_depthwise(x if which == 0 else dy, w, bias, (5, 5), (2, 2), which)
    np.testing.assert_allclose(finite_want, y if which == 0 else dx, rtol=1e-12, atol=1e-12)
    a = (x if which == 0 else dy).copy()
    a[0, 0, 3, 4] = np.nan
    a[0, 1, 15, 15] = np.inf
    w = w.copy()
    w[2, 0, 1, 3] = -np.inf
    with np.errstate(invalid="ignore"):  # inf - inf in the oracle, as in the kernel
        want = _direct_depthwise(a, w, bias, (5, 5), (2, 2), which)
    got = _run(emu, c, "NCHW", which, a, w, bias, (16, 16, 12, 12))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    fin = np.isfinite(want)
    assert fin[0, 0].sum() > 300 and fin[0, 1].sum() > 300  # the planes are not all NaN
    rel = np.max(np.abs(got[fin] - want[fin])) / np.max(np.abs(want[fin]))
    assert rel <= 1e-5


def _direct_depthwise_filter(x, dy, k, pad):
    """float64 direct depthwise stride-1 filter gradient: dw[c, kh, kw] = sum over n and the dy
    positions of x[n, c, u + kh - pt, v + kw - pl] * dy[n, c, u, v], x outside the plane
    skipped (an inf dy times a padding zero would be NaN)."""
    n, c, h, wd = x.shape
    oh, ow = dy.shape[2:]
    (kh_n, kw_n), (pt, pl) = k, pad
    dw = np.zeros((c, 1, kh_n, kw_n))
    for kh in range(kh_n):
        for kw in range(kw_n):
            u = np.arange(oh)[:, None] + kh - pt
            v = np.arange(ow)[None, :] + kw - pl
            uu, vv = np.where((u >= 0) & (u < h) & (v >= 0) & (v < wd))
            prod = x[:, :, uu + kh - pt, vv + kw - pl] * dy[:, :, uu, vv]
            dw[:, 0, kh, kw] = prod.sum(axis=(0, 2))
    return dw


def test_fft_conv_bwd_filter_non_finite_falls_back_to_direct(emu):
    """bwd_filter with a NaN in x (channel 0) and an inf in dy (channel 1): non-finite exactly
    where the direct sums are, channel 2 (FFT in every block) close to the oracle."""
    c = dict(_dw(2, 3, 20, 20, 5, pads=2))
    x, w, bias, dy, _, _, dw = _operands(c)
    np.testing.assert_allclose(_direct_depthwise_filter(x, dy, (5, 5), (2, 2)), dw, rtol=1e-12)
    x, dy = x.copy(), dy.copy()
    x[1, 0, 3, 4] = np.nan
    dy[0, 1, 19, 0] = np.inf
    with np.errstate(invalid="ignore"):
        want = _direct_depthwise_filter(x, dy, (5, 5), (2, 2))
    got = _run(emu, c, "NHWC", 2, x, dy, None, (16, 16, 12, 12))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isfinite(want[2]).all() and not np.isfinite(want[1]).all()
    rel = np.max(np.abs(got[2] - want[2])) / np.max(np.abs(want[2]))
    assert rel <= 1e-5


def test_fft_conv_is_deterministic(emu):
    """Two runs, and runs over 3 and 2 blocks (another item-to-block assignment), bitwise."""
    c, plan = CASES["3x7_dil_rect_16x32"]
    c = dict(c)
    x, w, bias, dy, *_ = _operands(c)
    for which, a, b, bias_ in ((0, x, w, bias), (2, x, dy, None)):
        runs = [_run(emu, c, "NHWC", which, a, b, bias_, plan, max_blocks=m) for m in (3, 3, 2)]
        for r in runs[1:]:
            np.testing.assert_array_equal(r.view(np.uint64), runs[0].view(np.uint64))


def _choice(emu, which, c, layout="NCHW", dtype="float32"):
    xs, ws, _, _ = _layout(c, layout)
    plan = (ctypes.c_int64 * 4)()
    msg = ctypes.create_string_buffer(512)
    rc = emu.emu_cuda_conv_choice(
        which,
        DTYPE_CODES[dtype],
        vec(xs),
        vec(ws),
        vec(conv_attrs(dict(c, layout=layout))),
        plan,
        msg,
        ctypes.c_int64(512),
    )
    return rc, tuple(plan), msg.value.decode()


FORCED_ERRORS = {
    "stride2": (0, _dw(1, 4, 16, 16, 5, stride=2, pads=2), "float32", "need stride 1"),
    # (dense and grouped calls run fft_conv_dense.cuh: tests/test_cuda_fft_dense.py)
    "float64": (1, _dw(1, 4, 16, 16, 5, pads=2), "float64", "float64 runs the direct"),
    "bwd_filter_float64": (2, _dw(1, 4, 16, 16, 5, pads=2), "float64", "float64 runs the direct"),
    "kernel_over_64": (0, _dw(1, 2, 70, 70, 33, dilation=2, pads=32), "float32", "(64)"),
}


@pytest.mark.parametrize("name", list(FORCED_ERRORS))
def test_forced_fft_that_cannot_run_is_an_error(emu, monkeypatch, name):
    which, c, dtype, why = FORCED_ERRORS[name]
    monkeypatch.setenv("JAXCONV_CUDA_CONV_ALGO", "fft")
    rc, _, msg = _choice(emu, which, c, dtype=dtype)
    assert rc == 2
    assert msg.startswith("JAXCONV_CUDA_CONV_ALGO=fft cannot run this call: ") and why in msg, msg
    monkeypatch.setenv("JAXCONV_CUDA_CONV_ALGO", "auto")
    assert _choice(emu, which, c, dtype=dtype)[0] == 0  # auto: direct, no error


def test_choice_follows_the_variable_and_the_model(emu, monkeypatch):
    big = _dw(2, 8, 56, 56, 31, pads=15)  # RepLKNet's 31x31 @56: FFT by the (estimated) model
    small = _dw(2, 8, 56, 56, 3, pads=1)  # 3x3: direct
    monkeypatch.delenv("JAXCONV_CUDA_CONV_ALGO", raising=False)
    rc, plan, _ = _choice(emu, 0, big)
    assert rc == 1 and plan[0] == 64 and plan[1] == 64 and plan[2] == plan[3] == 34
    assert _choice(emu, 1, big, "NHWC")[0] == 1
    assert _choice(emu, 2, big)[0] == 1  # bwd_filter: the same model
    assert _choice(emu, 0, small)[0] == 0
    monkeypatch.setenv("JAXCONV_CUDA_CONV_ALGO", "direct")
    assert _choice(emu, 0, big)[0] == 0
    monkeypatch.setenv("JAXCONV_CUDA_CONV_ALGO", "winograd")
    assert _choice(emu, 0, big)[0] == 0
    monkeypatch.setenv("JAXCONV_CUDA_CONV_ALGO", "fft")
    rc, plan, _ = _choice(emu, 0, small)
    assert rc == 1 and plan[0] * plan[1] > 0
    monkeypatch.setenv("JAXCONV_CUDA_CONV_ALGO", "fast")
    rc, _, msg = _choice(emu, 0, small)
    assert rc == 2 and "JAXCONV_CUDA_CONV_ALGO='fast' is not one of auto, direct" in msg


def test_emulated_syncthreads_or(emu):
    """__syncthreads_or returns the block-wide OR to every thread, round after round (a round
    with no hot thread after one with: the emulation's slots are cleared in between)."""
    hot = [-1, 0, 255, -1, 17, -1, -1, 128]
    arr = (ctypes.c_int * len(hot))(*hot)
    out = np.full(len(hot) * THREADS, -7, np.int32)
    assert emu.emu_syncthreads_or(arr, len(hot), out.ctypes.data_as(ctypes.c_void_p)) == 0
    got = out.reshape(len(hot), THREADS)
    for r, h in enumerate(hot):
        assert np.all((got[r] != 0) == (h >= 0)), (r, h)
