"""Dense and grouped FFT convolution on the CPU (ffi/cpu/fft_dense.cc) and its algorithm choice.

Layers with more than one input or output channel per group run, at stride 1 (any dilation), a
complex GEMM per frequency between the input spectra and the filter spectra, in all three
directions (forward, bwd_data so also stride-1 conv_transpose2d, bwd_filter), both layouts.

Error bound, as max |got - ref| / max |ref| against a float64 lax reference, standard-normal
float32 operands: 5e-5 in every direction, per transform plan (whole plane and overlap-save tiles).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from test_fft import ALGO_ENV, _check_all_directions, _rel_err, algorithm, plan

import jaxconv

from reference import on, ref_conv2d, ref_conv_transpose2d, tol

pytestmark = pytest.mark.cpu_only("the FFT kernels and the algorithm choice are the CPU's")

BOUND = 5e-5


def _operands(rng, n, c, o, groups, h, w, k, layout):
    x64 = rng.standard_normal((n, c, h, w))
    w64 = rng.standard_normal((o, c // groups, k[0], k[1]))
    if layout == "NHWC":
        x64, w64 = x64.transpose(0, 2, 3, 1), w64.transpose(2, 3, 1, 0)
    return jnp.asarray(x64), jnp.asarray(w64)


# (N, C, O, groups, H, W, (KH, KW), padding, dilation, expected plan: "whole" or "tiles").
# Channel counts off the 16 of one transform and the 8 of one vector; grouped layers with
# per-group sides off 8 (the GEMM's vectors cross groups), a channel multiplier (1 -> 3 per
# group); per-group outputs a multiple of 8 (NHWC bwd_filter's swapped sums); asymmetric padding;
# dilation; odd transform sizes (the plans below, by the cost model).
CASES = [
    (1, 6, 8, 1, 4, 4, (7, 7), ((3, 3), (3, 3)), (1, 1), "whole"),  # 10x10 transforms
    (2, 5, 7, 1, 13, 17, (5, 5), ((2, 2), (1, 3)), (1, 2), "tiles"),  # 18x15, 9x25
    (1, 24, 20, 1, 19, 16, (11, 9), ((5, 5), (8, 0)), (1, 1), "tiles"),  # 20x16
    (2, 12, 18, 3, 12, 14, (7, 7), ((3, 3), (3, 3)), (1, 1), "tiles"),  # 12x20
    (1, 4, 12, 4, 15, 15, (5, 3), ((2, 2), (1, 1)), (1, 1), "tiles"),  # 20x5, 12x5
    (1, 3, 10, 1, 120, 90, (3, 3), ((1, 1), (1, 1)), (1, 1), "tiles"),  # 12x20
    (1, 6, 4, 2, 140, 20, (9, 3), ((8, 8), (1, 4)), (2, 1), "tiles"),  # 64x10, 64x12
    # per-group outputs a multiple of 8: NHWC bwd_filter's S in the swapped (ci, o) layout
    (2, 6, 24, 3, 11, 9, (5, 5), ((2, 2), (2, 2)), (1, 1), "tiles"),  # 15x9
]


def _case_id(c):
    n, ci, o, g, h, w, k = c[:7]
    return f"{n}x{ci}->{o}g{g}_{h}x{w}_k{k[0]}x{k[1]}_d{c[8][0]}{c[8][1]}_{c[9]}"


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_error_bound_per_plan_and_direction(backend, monkeypatch, case, layout):
    n, c, o, groups, h, w_, k, padding, dilation, kind = case
    rng = np.random.default_rng(abs(hash((case[:7], layout))) % 2**32)
    x64, w64 = on(backend, *_operands(rng, n, c, o, groups, h, w_, k, layout))
    monkeypatch.setenv(ALGO_ENV, "fft")
    oh = h + padding[0][0] + padding[0][1] - dilation[0] * (k[0] - 1)
    ow = w_ + padding[1][0] + padding[1][1] - dilation[1] * (k[1] - 1)
    for direction, (u, v) in (("fwd", (oh, ow)), ("bwd_data", (h, w_)), ("bwd_filter", (oh, ow))):
        p, q, th, tw = plan(
            algorithm(
                direction, (n, c, h, w_), (o, c // groups, *k), padding, dilation, groups, layout
            )
        )
        ke = [d * (kk - 1) + 1 for d, kk in zip(dilation, k)]
        assert p >= th + ke[0] - 1 and q >= tw + ke[1] - 1, (direction, p, q, th, tw)
        whole = th == u and tw == v
        assert whole == (kind == "whole"), (direction, p, q, th, tw)
    _check_all_directions(x64, w64, padding, dilation, groups, layout, bound=BOUND)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_conv_transpose_stride1_within_bound(backend, monkeypatch, layout):
    """Stride-1 dense conv_transpose2d is bwd_data: on the FFT when forced."""
    rng = np.random.default_rng(3)
    n, c, o, h, w_, k = 2, 10, 6, 15, 11, 7
    x64 = rng.standard_normal((n, c, h, w_) if layout == "NCHW" else (n, h, w_, c))
    # conv_transpose2d's weight is the forward conv's: (O, C, KH, KW) maps O -> C channels here.
    w64 = rng.standard_normal((c, o, k, k) if layout == "NCHW" else (k, k, o, c))
    x64, w64 = on(backend, jnp.asarray(x64), jnp.asarray(w64))
    monkeypatch.setenv(ALGO_ENV, "fft")
    y = jaxconv.conv_transpose2d(
        x64.astype(jnp.float32), w64.astype(jnp.float32), padding=2, layout=layout
    )
    y_ref = ref_conv_transpose2d(x64, w64, padding=((2, 2), (2, 2)), layout=layout)
    assert _rel_err(y, y_ref) <= BOUND


@pytest.mark.parametrize("groups", [1, 2])
def test_gradients_through_the_fft(backend, monkeypatch, groups):
    """check_grads (reverse mode, float32, so a loose tolerance for the finite differences)
    with every direction on the dense FFT."""
    rng = np.random.default_rng(7)
    x, w = _operands(rng, 1, 4, 6, groups, 9, 8, (5, 5), "NHWC")
    x, w = on(backend, x.astype(jnp.float32), w.astype(jnp.float32))
    monkeypatch.setenv(ALGO_ENV, "fft")
    f = lambda x, w: jaxconv.conv2d(x, w, padding=2, groups=groups, layout="NHWC")
    assert algorithm(
        "bwd_filter", (1, 4, 9, 8), (6, 4 // groups, 5, 5), ((2, 2), (2, 2)), (1, 1), groups, "NHWC"
    ).startswith("fft")
    check_grads(f, (x, w), order=1, modes=["rev"], atol=5e-2, rtol=5e-2, eps=1e-2)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_types_through_float32(backend, monkeypatch, dtype):
    rng = np.random.default_rng(4)
    x, w = _operands(rng, 2, 8, 12, 1, 16, 16, (9, 9), "NCHW")
    x, w = on(backend, x.astype(dtype), w.astype(dtype))
    f = lambda x, w: jaxconv.conv2d(x, w, padding=4)
    ref = lambda x, w: ref_conv2d(x, w, padding=((4, 4), (4, 4)))
    monkeypatch.setenv(ALGO_ENV, "fft")
    y, vjp = jax.vjp(f, x, w)
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    assert y.dtype == dtype
    rtol, atol = tol(dtype)
    for got, want in zip((y, *vjp(y)), (y_ref, *vjp_ref(y))):
        scale = float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=rtol, atol=atol * scale
        )


@pytest.mark.parametrize("bad", [np.inf, np.nan])
@pytest.mark.parametrize("where", ["x", "w", "dy"])
def test_non_finite_values_take_the_direct_path(backend, monkeypatch, bad, where):
    """One inf in a transform would spread NaN over whole planes of every output channel; such
    calls fall back to the direct kernel, so inf and NaN land where lax puts them."""
    rng = np.random.default_rng(5)
    x = np.asarray(rng.standard_normal((1, 6, 10, 10)), np.float32)
    w = np.asarray(rng.standard_normal((5, 6, 5, 5)), np.float32)
    ct = np.asarray(rng.standard_normal((1, 5, 10, 10)), np.float32)
    if where == "w":
        w[3, 1, 2, 2] = bad
    else:
        {"x": x, "dy": ct}[where][0, 3, 4, 4] = bad
    monkeypatch.setenv(ALGO_ENV, "fft")
    args = on(backend, jnp.asarray(x), jnp.asarray(w))
    y, vjp = jax.vjp(lambda x, w: jaxconv.conv2d(x, w, padding=2), *args)
    y_ref, vjp_ref = jax.vjp(lambda x, w: ref_conv2d(x, w, padding=((2, 2), (2, 2))), *args)
    cts = on(backend, jnp.asarray(ct))
    for got, want in zip((y, *vjp(cts)), (y_ref, *vjp_ref(cts))):
        got, want = np.asarray(got), np.asarray(want)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-4)


def test_forced_fft_with_too_large_spectra_is_an_error(backend, monkeypatch):
    """256 -> 256 channels and a 67x67 dilated kernel: the filter spectra of the smallest
    transform (72x72) take 72*37*256*256*8 bytes = 1.3 GiB, over the 1 GiB bound."""
    x = jnp.ones((1, 256, 68, 68), jnp.float32)
    w = jnp.ones((256, 256, 3, 3), jnp.float32)
    x, w = on(backend, x, w)
    monkeypatch.setenv(ALGO_ENV, "fft")
    with pytest.raises(Exception, match=f"{ALGO_ENV}=fft cannot run this call: .*exceed 1 GiB"):
        jax.block_until_ready(jaxconv.conv2d(x, w, padding=33, dilation=33))


@pytest.mark.parametrize("algo", ["", "auto"])
def test_auto_choice(backend, monkeypatch, algo):
    """Auto keeps the dense rows of the default bench (ResNet-50 3x3 and 1x1, LeNet 5x5) on
    direct or Winograd and takes the FFT for dense 11x11 and larger at stride 1 on planes of 28
    and more (docs/design.md's crossover table)."""
    monkeypatch.setenv(ALGO_ENV, algo)
    same = lambda k: ((k // 2, k // 2), (k // 2, k // 2))
    for layout in ("NCHW", "NHWC"):
        for d in ("fwd", "bwd_data", "bwd_filter"):
            for x, w, pad in (
                ((8, 64, 56, 56), (64, 64, 3, 3), same(3)),
                ((8, 256, 14, 14), (256, 256, 3, 3), same(3)),
                ((8, 512, 7, 7), (512, 512, 3, 3), same(3)),
                ((8, 256, 56, 56), (64, 256, 1, 1), same(1)),
                ((8, 64, 56, 56), (256, 64, 1, 1), same(1)),
                ((8, 1, 28, 28), (6, 1, 5, 5), same(5)),
                ((8, 6, 14, 14), (16, 6, 5, 5), same(5)),
                ((8, 6, 14, 14), (16, 6, 5, 5), ((0, 0), (0, 0))),
            ):
                assert not algorithm(d, x, w, pad, (1, 1), 1, layout).startswith("fft"), (
                    x,
                    w,
                    d,
                    layout,
                )
            for x, w, pad in (
                ((2, 64, 56, 56), (64, 64, 11, 11), same(11)),
                ((2, 64, 28, 28), (64, 64, 13, 13), same(13)),
                ((2, 128, 28, 28), (128, 128, 15, 15), same(15)),
            ):
                assert algorithm(d, x, w, pad, (1, 1), 1, layout).startswith("fft"), (
                    x,
                    w,
                    d,
                    layout,
                )
        assert (
            algorithm(
                "fwd",
                (2, 3, 224, 224),
                (64, 3, 11, 11),
                ((2, 2), (2, 2)),
                (1, 1),
                1,
                layout,
                stride=(4, 4),
            )
            == "direct"
        )


@st.composite
def dense_configs(draw):
    k = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    ke = [d * (kk - 1) + 1 for d, kk in zip(dil, k)]
    pad = tuple((draw(st.integers(0, e)), draw(st.integers(0, e))) for e in ke)
    hw = [draw(st.integers(max(1, e - lo - hi), 20)) for e, (lo, hi) in zip(ke, pad)]
    groups = draw(st.integers(1, 3))
    c = groups * draw(st.integers(1, 6))
    o = groups * draw(st.integers(1, 6))
    if c == groups and o == groups:
        o = 2 * groups  # one channel per group both sides is the depthwise kernel (test_fft.py)
    n = draw(st.integers(1, 2))
    layout = draw(st.sampled_from(["NCHW", "NHWC"]))
    return n, c, o, groups, hw[0], hw[1], k, pad, dil, layout


@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@pytest.mark.slow("hypothesis: several random shapes, each compiled")
@given(cfg=dense_configs())
def test_forced_fft_on_random_shapes(backend, monkeypatch, cfg):
    n, c, o, groups, h, w_, k, pad, dil, layout = cfg
    rng = np.random.default_rng(abs(hash(cfg)) % 2**32)
    x64, w64 = on(backend, *_operands(rng, n, c, o, groups, h, w_, k, layout))
    monkeypatch.setenv(ALGO_ENV, "fft")
    _check_all_directions(x64, w64, pad, dil, groups, layout, bound=BOUND)
