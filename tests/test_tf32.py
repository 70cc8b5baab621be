"""float32 convolutions with TF32 allowed (precision=None on a GPU), each direction against a
float64 oracle, within a bound derived from TF32's rounding and the reduction length K.

The bound (per output element). A TF32 tensor-core product rounds each float32 operand to 10
explicit mantissa bits: a(1 + da), |da| <= u with u = 2^-11 for round-to-nearest (cvt.rna) and
2^-10 if the hardware truncates, so u = 2^-10 covers both. One product is then
ab(1 + da)(1 + db), off by at most (2u + u^2)|ab|. The K products are summed in float32 (the
tensor core's adds, the k-steps across tiles, bwd_filter's partial sums, the final store): with
unit roundoff e = 2^-23 (again covering truncation) a sum of K terms is off by at most
(K + 1) e sum|terms| to first order (Higham, recursive summation; +1 for the store). Hence

    |got - exact| <= ((2u + u^2) + (K + 2) e) * S,   S = sum over the K terms of |a| |b|,

with S computed in float64 as the same convolution of |a| and |b| (the backward directions are
the forward's VJPs, linear in each operand, so the VJP of |.| operands sums exactly |terms|).
For K = 288 (32 channels, 3x3) that is about 2.0e-3 * S; a typical S is sqrt(K) times an
output's magnitude, so errors of ~1e-2 relative to the output are allowed where float32 at
HIGHEST would be held to 1e-4: the reason tests/conftest.py runs the other float32 tests on a
GPU at HIGHEST.

On the cpu backend the kernels ignore allow_tf32 (full float32), so the same bound holds
trivially there; on a GPU it is the tensor-core path with TF32 (tests/test_precision.py checks
that precision=None sends allow_tf32 = 1). The emulated kernels (tensor cores with TF32 under
tests/cuda_emulation) are held to the same bound in test_emulated_tf32_within_bound.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxconv

from reference import on

U_TF32 = 2.0**-10  # operand rounding, truncation or nearest
E_F32 = 2.0**-23  # float32 accumulation, truncation or nearest


def tf32_bound(k: int) -> float:
    """Relative bound on |got - exact| / S for a reduction of k products (module docstring)."""
    return 2 * U_TF32 + U_TF32**2 + (k + 2) * E_F32


# (name, N, C, H, W, O, kernel, stride, padding, groups): channel counts that take the tensor
# cores on a GPU (at least 16 per group on both GEMM sides) in every direction.
CASES = [
    ("c32_o48_3x3", 2, 32, 9, 8, 48, 3, 1, 1, 1),
    ("c64_o96_s2", 2, 64, 11, 10, 96, 3, 2, 1, 1),
    ("g2_c32_o64", 2, 32, 8, 8, 64, 3, 1, 1, 2),
]


def _ref_conv(x, w, stride, padding, groups, layout):
    dn = ("NCHW", "OIHW", "NCHW") if layout == "NCHW" else ("NHWC", "HWIO", "NHWC")
    return lax.conv_general_dilated(
        x,
        w,
        (stride, stride),
        [(padding, padding)] * 2,
        feature_group_count=groups,
        dimension_numbers=dn,
        precision=lax.Precision.HIGHEST,
    )


def _case(name, layout):
    _, n, c, h, w, o, k, s, p, g = next(case for case in CASES if case[0] == name)
    rng = np.random.default_rng(7)
    xs = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
    ws = (o, c // g, k, k) if layout == "NCHW" else (k, k, c // g, o)
    x = rng.standard_normal(xs).astype(np.float32)
    wt = rng.standard_normal(ws).astype(np.float32)
    return x, wt, dict(stride=s, padding=p, groups=g), c // g * k * k, o // g * k * k


def _three_directions(fn, x, w, dy):
    """(y, dx, dw) of fn at (x, w) with cotangent dy."""
    y, vjp = jax.vjp(fn, x, w)
    dx, dw = vjp(dy)
    return y, dx, dw


@pytest.mark.tf32
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_tf32_within_bound(backend, name, layout):
    x, w, kw, k_fwd, k_bwd_data = _case(name, layout)
    conv = lambda a, b: jaxconv.conv2d(a, b, **kw, layout=layout)  # precision=None: TF32
    ref = lambda a, b: _ref_conv(a, b, kw["stride"], kw["padding"], kw["groups"], layout)
    y_shape = jax.eval_shape(ref, x, w).shape
    dy = np.random.default_rng(8).standard_normal(y_shape).astype(np.float32)
    k_bwd_filter = y_shape[0] * (
        y_shape[2] * y_shape[3] if layout == "NCHW" else y_shape[1] * y_shape[2]
    )

    got = _three_directions(jax.jit(conv), *on(backend, x, w, dy))
    x64, w64, dy64 = (jnp.asarray(a, jnp.float64) for a in (x, w, dy))
    exact = _three_directions(ref, x64, w64, dy64)
    sums = _three_directions(ref, jnp.abs(x64), jnp.abs(w64), jnp.abs(dy64))
    for what, g, e, s, k in zip(
        ("forward", "bwd_data", "bwd_filter"), got, exact, sums, (k_fwd, k_bwd_data, k_bwd_filter)
    ):
        assert g.dtype == jnp.float32, what
        err = np.abs(np.asarray(g, np.float64) - np.asarray(e))
        allowed = tf32_bound(k) * np.asarray(s)
        worst = float(np.max(err / np.maximum(allowed, 1e-300)))
        assert worst <= 1.0, (what, k, worst)


# ---- the same bound on the emulated tensor-core kernels (tests/cuda_emulation) ----------------
@pytest.mark.slow("builds the host emulation of the CUDA kernels")
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize(
    "name", ["mma_c16_o24_3x3", "mma_groups_dilated", "mma_filter_wide_groups"]
)
def test_emulated_tf32_within_bound(conv_emu, name, layout):
    """The tensor-core kernels with allow_tf32 (what a GPU runs for precision=None), all three
    directions, on random float32 operands (not the quarter-integers of test_cuda_mma.py, which
    TF32 represents exactly): within tf32_bound(K), and far above float32's own error, so the
    operands were rounded to TF32 and the bound is what holds them."""
    from emulation import ALL_CONV_CASES, emu_conv, hwio, nhwc
    from reference import ref_conv2d

    c = dict(ALL_CONV_CASES[name], layout=layout)
    kw = dict(stride=c["stride"], padding=c["pads"], dilation=c["dilation"], groups=c["groups"])
    rng = np.random.default_rng(11)
    x = rng.standard_normal((c["n"], c["c"], c["h"], c["w"])).astype(np.float32)
    w = rng.standard_normal((c["o"], c["c"] // c["groups"]) + c["k"]).astype(np.float32)
    ref = lambda a, b: ref_conv2d(a, b, **kw)  # NCHW, float64 in and out
    y_shape = jax.eval_shape(ref, jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64)).shape
    dy = rng.standard_normal(y_shape).astype(np.float32)
    x64, w64, dy64 = (jnp.asarray(a, jnp.float64) for a in (x, w, dy))
    exact = _three_directions(ref, x64, w64, dy64)
    sums = _three_directions(ref, jnp.abs(x64), jnp.abs(w64), jnp.abs(dy64))
    acts = (lambda a: np.asarray(a)) if layout == "NCHW" else (lambda a: np.asarray(nhwc(a)))
    wgts = (lambda a: np.asarray(a)) if layout == "NCHW" else (lambda a: np.asarray(hwio(a)))
    xl, wl, dyl = acts(x), wgts(w), acts(dy)
    run = lambda which, a, b, out_shape: emu_conv(
        conv_emu,
        which,
        c,
        xl.shape,
        wl.shape,
        np.ascontiguousarray(a),
        np.ascontiguousarray(b),
        None,
        out_shape,
        "float32",
        tensor_cores=True,
        allow_tf32=True,
    )
    got = (
        run(0, xl, wl, acts(exact[0]).shape),
        run(1, dyl, wl, xl.shape),
        run(2, xl, dyl, wl.shape),
    )
    g = c["groups"]
    k_fwd = c["c"] // g * c["k"][0] * c["k"][1]
    k_bwd_data = c["o"] // g * c["k"][0] * c["k"][1]
    k_bwd_filter = y_shape[0] * y_shape[2] * y_shape[3]
    for what, gt, e, s, k, to_layout in zip(
        ("forward", "bwd_data", "bwd_filter"),
        got,
        exact,
        sums,
        (k_fwd, k_bwd_data, k_bwd_filter),
        (acts, acts, wgts),
    ):
        err = np.abs(np.asarray(gt, np.float64) - to_layout(e))
        rel = err / np.maximum(tf32_bound(k) * to_layout(s), 1e-300)
        assert rel.max() <= 1.0, (what, k, rel.max())
        # TF32's rounding shows: an error of order 2^-11 / sqrt(K) of S somewhere, where float32
        # alone would give about 2^-24 (a missing rounding would leave this far below 1e-6).
        assert (err / np.maximum(to_layout(s), 1e-300)).max() > 1e-6, (what, "no TF32 rounding?")
