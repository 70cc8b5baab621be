"""The kernels' internal code paths, each forced by a shape, checked against lax (on every
backend; the paths named are the CPU's, and the same shapes reach the CUDA tiles' edges).

The fast CPU convolution splits work by shape: K-slices of the reduction (K > 384), column blocks
that run across images (output planes under 128 cells) or split an image, row blocks, in-place 1x1
operands, the indirect forward GEMM (im2col read from x: unpadded NCHW small planes, NHWC with few
channels), whole-row im2col copies in NHWC, stride phases of bwd_data (with taps that some phases
lack) or its scatter form (col2im: small outputs, few input channels), the depthwise kernel, panel
and micro-tile edges (channel counts that are not multiples of 6, 12 or 16), and every
instruction-set capability the CPU has (JAXCONV_CPU_CAPABILITY). Every case here is small, but
chosen so that one of those paths is taken; values, input gradients and weight gradients are
compared with lax at HIGHEST precision.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv

from child import run_python
from reference import ConvCase, on, tol

# conv2d cases and the path each takes; padding ((top, bottom), (left, right)) where asymmetric.
C = ConvCase
CASES = {
    "plain 3x3": C(n=2, c=3, h=9, w=11, o=5, padding=1),
    "anisotropic strided dilated grouped": C(
        n=2,
        c=4,
        h=9,
        w=11,
        o=6,
        kernel=(3, 2),
        stride=(2, 3),
        padding=((2, 0), (1, 2)),
        dilation=(1, 2),
        groups=2,
    ),
    "K just under one slice": C(n=1, c=40, h=13, w=12, o=20, padding=1),
    "K sliced, small planes across images": C(n=2, c=50, h=7, w=7, o=33, padding=1),
    "1x1 in place, K sliced": C(n=3, c=300, h=5, w=6, o=17, kernel=(1, 1)),
    "stem-like 7x7/2": C(n=2, c=8, h=20, w=20, o=7, kernel=(7, 7), stride=2, padding=3),
    "depthwise stride 2": C(n=2, c=6, h=17, w=15, o=6, stride=2, padding=1, groups=6),
    "depthwise stride 1 dilated": C(n=2, c=5, h=10, w=9, o=5, padding=2, dilation=2, groups=5),
    "depthwise anisotropic, channel tail": C(
        n=2,
        c=37,
        h=9,
        w=8,
        o=37,
        kernel=(3, 2),
        stride=(3, 1),
        padding=((1, 2), (0, 1)),
        dilation=(1, 2),
        groups=37,
    ),
    "stride 3 phases": C(n=1, c=4, h=6, w=6, o=4, stride=3),
    "strided 1x1 grouped (phases without taps)": C(
        n=2, c=12, h=16, w=16, o=24, kernel=(1, 1), stride=2, groups=3
    ),
    "1x1 output": C(n=1, c=5, h=5, w=5, o=3, kernel=(5, 5)),
    "planes >= 128 split, odd channel counts": C(
        n=2, c=3, h=12, w=40, o=130, kernel=(2, 2), padding=((0, 1), (1, 0)), dilation=(2, 1)
    ),
    # Forward on the indirect GEMM (NCHW, no tap in the padding, output planes under 128 cells,
    # a panel's worth of output channels per group): the im2col read straight from x, tiles
    # [position][channel] stored transposed (two panels, the second 3 columns wide; 180
    # positions in blocks of 48, the last ending in a 4-row tile), or written in place when the
    # output plane is one cell (LeNet's C5), here with K in two slices and 40 channels (a panel
    # pair and a half-empty panel). "col2im LeNet-like" below is LeNet's C3 forward.
    "indirect strided dilated grouped, panel tail": C(
        n=3, c=6, h=13, w=12, o=38, kernel=(3, 2), stride=(2, 1), dilation=(1, 2), groups=2
    ),
    "indirect 1x1 output plane, K sliced": C(n=5, c=17, h=5, w=5, o=40, kernel=(5, 5)),
    # bwd_data in scatter form (output much smaller than input):
    "col2im LeNet-like": C(n=3, c=6, h=14, w=14, o=16, kernel=(5, 5)),
    "col2im strided grouped padded": C(
        n=2, c=4, h=9, w=10, o=6, kernel=(5, 4), stride=(2, 3), padding=((1, 0), (2, 1)), groups=2
    ),
    "col2im output channels sliced": C(n=2, c=8, h=6, w=6, o=400, kernel=(5, 5)),
    # Few input channels (an input layer): bwd_data in scatter form (NHWC: a row of taps added
    # as one run, clipped at the borders), NHWC bwd_filter from whole packed im2col rows, over
    # positions cut into equal slices (578 = 2 x 17 x 17: three of 193).
    "few channels stem 3->40 7x7/2": C(
        n=2, c=3, h=33, w=34, o=40, kernel=(7, 7), stride=2, padding=3
    ),
    # ... and the per-tap forms of both: taps two columns apart, and grouped channels that are
    # not dense in a cell.
    "few channels dilated along w": C(n=2, c=2, h=15, w=16, o=8, padding=2, dilation=(1, 2)),
    "few channels grouped strided": C(
        n=2, c=4, h=12, w=13, o=16, kernel=(5, 5), stride=2, padding=2, groups=2
    ),
    # Depthwise with a large kernel: the cost model takes the FFT (ffi/cpu/fft.cc) in all three
    # directions (tests/test_fft.py checks the choice and the error bounds).
    "depthwise 21x21 on the FFT": C(
        n=2, c=20, h=30, w=28, o=20, kernel=(21, 21), padding=10, groups=20
    ),
}


def _check(case: ConvCase, backend, layout, dtype):
    x, w, b = on(backend, *case.operands(layout, dtype))
    y, vjp = jax.vjp(case.function(layout), x, w, b)
    y_ref, vjp_ref = jax.vjp(case.reference(layout), x, w, b)
    g = on(backend, jnp.asarray(np.random.default_rng(1).standard_normal(y.shape), dtype))
    rtol, atol = tol(dtype)
    for got, want in zip((y,) + vjp(g), (y_ref,) + vjp_ref(g)):
        scale = float(jnp.max(jnp.abs(want.astype(jnp.float64)))) + 1.0
        np.testing.assert_allclose(
            np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=rtol, atol=atol * scale
        )


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", list(CASES))
def test_conv_paths_float32(backend, name, layout):
    _check(CASES[name], backend, layout, jnp.float32)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.bfloat16])
@pytest.mark.parametrize(
    "name",
    [
        "K sliced, small planes across images",
        "stem-like 7x7/2",
        "depthwise stride 2",
        "stride 3 phases",
        "col2im LeNet-like",
        "few channels stem 3->40 7x7/2",
        "indirect strided dilated grouped, panel tail",
        "indirect 1x1 output plane, K sliced",
    ],
)
def test_conv_paths_other_dtypes(backend, name, dtype, layout):
    _check(CASES[name], backend, layout, dtype)


def test_conv_transpose_with_output_padding_uses_negative_pads(backend):
    """conv_transpose2d with output_padding is bwd_data with a negative bottom/right pad."""
    from reference import ref_conv_transpose2d

    rng = np.random.default_rng(3)
    for layout in ("NCHW", "NHWC"):
        xs = (2, 6, 5, 7) if layout == "NCHW" else (2, 5, 7, 6)
        ws = (6, 4, 3, 3) if layout == "NCHW" else (3, 3, 4, 6)
        x, w = on(
            backend,
            jnp.asarray(rng.standard_normal(xs), jnp.float32),
            jnp.asarray(rng.standard_normal(ws), jnp.float32),
        )
        kw = dict(stride=(3, 2), padding=((1, 1), (0, 0)), output_padding=(2, 1), layout=layout)
        got = jaxconv.conv_transpose2d(x, w, **kw)
        want = ref_conv_transpose2d(x, w, **kw)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_depthwise_conv_transpose_with_bias(backend):
    """Transposed depthwise convolution is the depthwise bwd_data kernel with a bias."""
    from reference import ref_conv_transpose2d

    rng = np.random.default_rng(4)
    for layout in ("NCHW", "NHWC"):
        xs = (2, 5, 6, 7) if layout == "NCHW" else (2, 6, 7, 5)
        ws = (5, 1, 3, 3) if layout == "NCHW" else (3, 3, 1, 5)
        x, w, b = on(
            backend,
            jnp.asarray(rng.standard_normal(xs), jnp.float32),
            jnp.asarray(rng.standard_normal(ws), jnp.float32),
            jnp.asarray(rng.standard_normal(5), jnp.float32),
        )
        kw = dict(
            stride=(2, 2), padding=((1, 1), (1, 1)), output_padding=(1, 1), groups=5, layout=layout
        )
        np.testing.assert_allclose(
            jaxconv.conv_transpose2d(x, w, b, **kw),
            ref_conv_transpose2d(x, w, b, **kw),
            rtol=1e-4,
            atol=1e-4,
        )


# ---------------------------------------------------------------------------------------------
# Max pooling: rows wide enough for the vectorized interior (16 outputs per block in NCHW,
# 16 channels per block in NHWC) plus border windows, and rows narrower than one register, with
# ties, NaN and -inf inside.

POOLS = {
    # (C, H, W, kernel, stride, padding, dilation)
    "2x2/2": (3, 6, 70, (2, 2), (2, 2), ((0, 0), (0, 0)), (1, 1)),
    "3x3/2 pad 1": (3, 7, 69, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    "3x3/1 pad 1": (2, 5, 41, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    "anisotropic stride 3 dilated": (2, 9, 80, (2, 3), (1, 3), ((1, 0), (2, 1)), (2, 2)),
    "37 channels": (37, 5, 6, (3, 2), (2, 1), ((1, 1), (0, 1)), (1, 1)),
    # Stride 2 with dilated columns (no tap pairs), 27 interior outputs: 3 float / 4 double
    # registers side by side, the last step overlapping.
    "stride 2 dilated columns": (3, 6, 60, (2, 3), (2, 2), ((0, 0), (1, 1)), (1, 2)),
    "2 registers of outputs, 11 channels": (11, 4, 40, (2, 2), (2, 2), ((0, 0), (0, 0)), (1, 1)),
    # Fewer interior outputs than a register (NCHW: one block through the phase rows, the lanes
    # past the row's end computed and dropped): LeNet's 10 -> 5, and 3 interior columns padded.
    "LeNet 2x2/2 10x10": (16, 10, 10, (2, 2), (2, 2), ((0, 0), (0, 0)), (1, 1)),
    "3x3/1 pad 1, 5 columns": (3, 4, 5, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    # Dilated rows over a 2-row input: output row 0's taps (rows -1 and 2) are both padding, so
    # its interior columns take the all-padding branch (-inf, index -1) beside a vector row.
    "rows of padding only, wide rows": (2, 2, 40, (2, 2), (1, 1), ((1, 2), (0, 0)), (3, 1)),
}


def _pool_input(shape_nchw, layout, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, shape_nchw).astype(np.float64)  # many ties
    flat = x.reshape(-1)
    picks = rng.choice(flat.size, size=6, replace=False)
    flat[picks] = [np.nan, np.nan, -np.inf, -np.inf, np.inf, 7]
    if layout == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    return jnp.asarray(x, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", list(POOLS))
def test_pool_paths(backend, name, layout, dtype):
    from reference import ref_max_pool2d

    c, h, w, kernel, stride, padding, dilation = POOLS[name]
    x = on(backend, _pool_input((2, c, h, w), layout, dtype, seed=len(name)))
    y, idx = jaxconv.max_pool2d(
        x, kernel, stride, padding, dilation, return_indices=True, layout=layout
    )
    want, want_idx = ref_max_pool2d(x, kernel, stride, padding, dilation, layout=layout)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_array_equal(np.asarray(y, np.float64), want)
    # The values-only forward (no indices) takes the same paths: y bit for bit.
    y_values = jaxconv.max_pool2d(x, kernel, stride, padding, dilation, layout=layout)
    unsigned = f"u{np.dtype(y.dtype).itemsize}"
    np.testing.assert_array_equal(np.asarray(y_values).view(unsigned), np.asarray(y).view(unsigned))
    # The gradient lands on the selected cells: a scatter-add of the cotangent at the indices.
    g = on(backend, jnp.asarray(np.random.default_rng(2).standard_normal(y.shape), dtype))
    acc = jnp.float64 if dtype == jnp.float64 else jnp.float32
    dx = jax.grad(
        lambda x: jnp.sum(
            jaxconv.max_pool2d(x, kernel, stride, padding, dilation, layout=layout).astype(acc)
            * g.astype(acc)
        )
    )(x)
    gi, ii = np.asarray(g, np.float64), want_idx
    xs = np.asarray(x).shape
    if layout == "NHWC":
        gi, ii = gi.transpose(0, 3, 1, 2), ii.transpose(0, 3, 1, 2)
        n_, h_, w_, c_ = xs
    else:
        n_, c_, h_, w_ = xs
    expect = np.zeros((n_, c_, h_ * w_))
    for ni in range(n_):
        for ci in range(c_):
            # An index of -1 (a window of padding only) sends nothing (numpy would read it as
            # the plane's last cell).
            sel = ii[ni, ci].reshape(-1) >= 0
            np.add.at(expect[ni, ci], ii[ni, ci].reshape(-1)[sel], gi[ni, ci].reshape(-1)[sel])
    expect = expect.reshape(n_, c_, h_, w_)
    if layout == "NHWC":
        expect = expect.transpose(0, 2, 3, 1)
    rtol, atol = tol(dtype)
    np.testing.assert_allclose(np.asarray(dx, np.float64), expect, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# Every instruction-set capability this CPU has (baseline, avx2, avx512, avx512_bf16:
# ffi/cpu/kernel_table.h).
# The tests above run the one chosen for this machine; a child process forced to each other one
# by JAXCONV_CPU_CAPABILITY runs the paths whose kernels differ per capability: GEMM micro-tile
# and panel tails (o = 5, 17, 130), K slices, stride phases and col2im, depthwise with a channel
# tail, pooling registers and tails, Winograd's transforms, and the indirect GEMM's tiles (float32
# and float64), each checked against lax.

CAPABILITY_ENV = "JAXCONV_CPU_CAPABILITY"
_CAPABILITY_CHECKS = (
    "import os, jax; jax.config.update('jax_enable_x64', True);"
    "import pytest, test_kernel_paths as t, test_winograd as tw, jax.numpy as jnp, jaxconv;"
    "assert jaxconv._ffi.cpu_capability() == os.environ['JAXCONV_CPU_CAPABILITY'];"
    "[t._check(t.CASES[n], 'cpu', lay, jnp.float32) for n in "
    "('plain 3x3', '1x1 in place, K sliced', 'planes >= 128 split, odd channel counts', "
    "'stride 3 phases', 'col2im strided grouped padded', 'depthwise anisotropic, channel tail', "
    "'depthwise 21x21 on the FFT', 'indirect strided dilated grouped, panel tail', "
    "'indirect 1x1 output plane, K sliced', 'col2im LeNet-like') for lay in ('NCHW', 'NHWC')];"
    "[t._check(t.CASES[n], 'cpu', 'NHWC', jnp.float64) for n in ('K sliced, small planes across "
    "images', 'depthwise stride 2')];"
    "[t._check(t.CASES[n], 'cpu', 'NCHW', jnp.float64) for n in ('indirect strided dilated "
    "grouped, panel tail', 'indirect 1x1 output plane, K sliced')];"
    "[t.test_pool_paths('cpu', n, lay, jnp.float32) for n in ('3x3/2 pad 1', '37 channels') "
    "for lay in ('NCHW', 'NHWC')];"
    "mp = pytest.MonkeyPatch();"
    "[tw.test_forward_and_input_gradient_within_bound('cpu', mp, tw.SHAPES[i], lay, a) "
    "for i in (0, 2) for lay in ('NCHW', 'NHWC') for a in ('winograd2', 'winograd4')];"
    "print('ok')"
)


def _other_capabilities():
    active = jaxconv._ffi.cpu_capability()
    return [c for c in jaxconv._ffi.cpu_capabilities() if c != active]


@pytest.mark.cpu_only("the capabilities are instruction sets of the CPU kernels")
@pytest.mark.slow("a child process per capability compiles every case anew")
@pytest.mark.parametrize("capability", _other_capabilities())
def test_paths_under_every_capability(backend, capability):
    proc = run_python(
        "-c", _CAPABILITY_CHECKS, env={CAPABILITY_ENV: capability, "JAX_PLATFORMS": "cpu"}
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_capabilities_reported():
    """The default is the highest capability the CPU has; the list starts at the baseline."""
    caps = jaxconv._ffi.cpu_capabilities()
    assert caps[0] == "baseline" and set(caps) <= {"baseline", "avx2", "avx512", "avx512_bf16"}
    import os

    if not os.environ.get(CAPABILITY_ENV):
        assert jaxconv._ffi.cpu_capability() == caps[-1]


@pytest.mark.cpu_only("JAXCONV_CPU_CAPABILITY is read by the CPU module")
@pytest.mark.parametrize("value", ["avx1024", "AVX2"])
def test_unknown_capability_fails_import(backend, value):
    proc = run_python("-c", "import jaxconv", env={CAPABILITY_ENV: value})
    assert proc.returncode != 0
    assert (
        f"ValueError: environment variable {CAPABILITY_ENV}='{value}' is not one of "
        "baseline, avx2, avx512, avx512_bf16"
    ) in proc.stderr, proc.stderr[-3000:]


@pytest.mark.cpu_only("JAXCONV_CPU_CAPABILITY is read by the CPU module")
def test_capability_the_cpu_lacks_fails_import(backend):
    missing = [
        c for c in ("avx2", "avx512", "avx512_bf16") if c not in jaxconv._ffi.cpu_capabilities()
    ]
    if not missing:
        pytest.skip("this CPU has every capability: none to ask for that it lacks")
    proc = run_python("-c", "import jaxconv", env={CAPABILITY_ENV: missing[-1]})
    assert proc.returncode != 0
    assert (
        f"{CAPABILITY_ENV}='{missing[-1]}' asks for a capability this CPU (or this build) lacks"
    ) in proc.stderr, proc.stderr[-3000:]
