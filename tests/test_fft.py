"""FFT convolution on the CPU (ffi/cpu/fft.cc) and the one algorithm choice (ffi/cpu/conv_algo.cc).

Depthwise layers at stride 1 (any dilation) may run on the FFT in all three directions: forward,
bwd_data (so also stride-1 conv_transpose2d) and bwd_filter. JAXCONV_CPU_CONV_ALGO=fft forces it
and fails, naming why, on a call it cannot run; auto takes it where the cost model says it wins.

Error bound, as max |got - ref| / max |ref| against a float64 lax reference, standard-normal
float32 operands: 1e-5 in every direction, per transform plan (whole plane and overlap-save tiles).
Measured on these shapes: at most about 3e-7.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxconv
from jaxconv import _jaxconv_cpu

from child import run_python
from reference import on, ref_conv2d, ref_conv_transpose2d, tol

pytestmark = pytest.mark.cpu_only("the FFT kernels and the algorithm choice are the CPU's")

ALGO_ENV = "JAXCONV_CPU_CONV_ALGO"
BOUND = 1e-5


def _rel_err(got, want):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    return np.abs(got - want).max() / np.abs(want).max()


def _pads(padding):
    return [v for pair in padding for v in pair]


def algorithm(
    direction, x_nchw, w_oihw, padding, dilation, groups, layout, stride=(1, 1), float64=False
):
    """The algorithm the CPU kernels take for this call (the module's conv_algorithm)."""
    attrs = [*stride, *dilation, *_pads(padding), groups, 0 if layout == "NCHW" else 1]
    return _jaxconv_cpu.conv_algorithm(direction, float64, list(x_nchw), list(w_oihw), attrs)


def plan(name):
    """'fft PxQ/THxTW' -> (P, Q, TH, TW)."""
    assert name.startswith("fft "), name
    size, tile = name.split()[1].split("/")
    return tuple(map(int, size.split("x"))) + tuple(map(int, tile.split("x")))


def _operands(rng, n, c, h, w, k, layout):
    x64 = rng.standard_normal((n, c, h, w))
    w64 = rng.standard_normal((c, 1, k[0], k[1]))
    if layout == "NHWC":
        x64, w64 = x64.transpose(0, 2, 3, 1), w64.transpose(2, 3, 1, 0)
    return jnp.asarray(x64), jnp.asarray(w64)


def _check_all_directions(x64, w64, padding, dilation, groups, layout, bound=BOUND, seed=0):
    """Forward, input gradient (bwd_data) and weight gradient (bwd_filter) in float32 against
    the float64 reference."""
    x, w = x64.astype(jnp.float32), w64.astype(jnp.float32)

    def ours(x, w):
        return jaxconv.conv2d(
            x, w, padding=padding, dilation=dilation, groups=groups, layout=layout
        )

    def ref(x, w):
        return ref_conv2d(x, w, padding=padding, dilation=dilation, groups=groups, layout=layout)

    y, vjp = jax.vjp(ours, x, w)
    y_ref, vjp_ref = jax.vjp(ref, x64, w64)
    ct64 = jnp.asarray(np.random.default_rng(seed).standard_normal(y_ref.shape))
    dx, dw = vjp(ct64.astype(jnp.float32))
    dx_ref, dw_ref = vjp_ref(ct64)
    errs = {
        "fwd": _rel_err(y, y_ref),
        "bwd_data": _rel_err(dx, dx_ref),
        "bwd_filter": _rel_err(dw, dw_ref),
    }
    assert max(errs.values()) <= bound, errs
    return errs


# (N, C, H, W, (KH, KW), padding, dilation, expected plan per direction: "whole" or "tiles").
# Channel counts that are not a multiple of the 16 channels one complex transform carries;
# asymmetric and large padding (bwd_data's padding KE - 1 - pad then goes negative); dilation.
CASES = [
    (2, 20, 13, 17, (5, 5), ((2, 2), (1, 3)), (1, 2), "whole"),
    (1, 9, 24, 21, (13, 11), ((6, 6), (12, 0)), (1, 1), "whole"),
    (1, 16, 60, 40, (3, 3), ((1, 1), (1, 1)), (1, 1), "tiles"),
    (1, 5, 150, 30, (9, 3), ((8, 8), (1, 4)), (2, 1), "tiles"),
]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: "x".join(map(str, c[:4])) + f"_k{c[4][0]}x{c[4][1]}_d{c[6][0]}{c[6][1]}_{c[7]}",
)
def test_error_bound_per_plan_and_direction(backend, monkeypatch, case, layout):
    n, c, h, w_, k, padding, dilation, kind = case
    rng = np.random.default_rng(abs(hash((case[:5], layout))) % 2**32)
    x64, w64 = on(backend, *_operands(rng, n, c, h, w_, k, layout))
    monkeypatch.setenv(ALGO_ENV, "fft")
    oh = h + padding[0][0] + padding[0][1] - dilation[0] * (k[0] - 1)
    ow = w_ + padding[1][0] + padding[1][1] - dilation[1] * (k[1] - 1)
    for direction, (u, v) in (("fwd", (oh, ow)), ("bwd_data", (h, w_)), ("bwd_filter", (oh, ow))):
        p, q, th, tw = plan(
            algorithm(direction, (n, c, h, w_), (c, 1, *k), padding, dilation, c, layout)
        )
        ke = [d * (kk - 1) + 1 for d, kk in zip(dilation, k)]
        assert p >= th + ke[0] - 1 and q >= tw + ke[1] - 1, (direction, p, q, th, tw)
        whole = th == u and tw == v
        assert whole == (kind == "whole"), (direction, p, q, th, tw)
    _check_all_directions(x64, w64, padding, dilation, c, layout)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_conv_transpose_stride1_within_bound(backend, monkeypatch, layout):
    """Stride-1 depthwise conv_transpose2d is bwd_data: on the FFT when forced."""
    rng = np.random.default_rng(3)
    n, c, h, w_, k = 2, 12, 15, 11, 7
    x64 = rng.standard_normal((n, c, h, w_) if layout == "NCHW" else (n, h, w_, c))
    w64 = rng.standard_normal((c, 1, k, k) if layout == "NCHW" else (k, k, 1, c))
    x64, w64 = on(backend, jnp.asarray(x64), jnp.asarray(w64))
    monkeypatch.setenv(ALGO_ENV, "fft")
    y = jaxconv.conv_transpose2d(
        x64.astype(jnp.float32), w64.astype(jnp.float32), padding=2, groups=c, layout=layout
    )
    y_ref = ref_conv_transpose2d(x64, w64, padding=((2, 2), (2, 2)), groups=c, layout=layout)
    assert _rel_err(y, y_ref) <= BOUND


def test_auto_takes_the_fft_for_the_kernel_paths_case(backend):
    """tests/test_kernel_paths.py's 'depthwise 21x21 on the FFT' case is on the FFT by default."""
    for layout in ("NCHW", "NHWC"):
        for d in ("fwd", "bwd_data", "bwd_filter"):
            assert algorithm(
                d, (2, 20, 30, 28), (20, 1, 21, 21), ((10, 10), (10, 10)), (1, 1), 20, layout
            ).startswith("fft "), (layout, d)


@pytest.mark.slow("a child process on the baseline kernel table compiles every case anew")
def test_baseline_table_without_avx2(backend):
    """JAXCONV_CPU_CAPABILITY=baseline: the baseline build of fft.cc (two SSE registers per vector)
    meets the same bounds, whole plane (NCHW) and overlap-save (NHWC)."""
    code = (
        "import os, test_fft as t, jax.numpy as jnp, numpy as np, jax;"
        "jax.config.update('jax_enable_x64', True);"
        "os.environ['JAXCONV_CPU_CONV_ALGO'] = 'fft';"
        "[t._check_all_directions(*t._operands(np.random.default_rng(1), n, c, h, w, k, lay),"
        " pad, dil, c, lay) for (n, c, h, w, k, pad, dil, _), lay in"
        " ((t.CASES[0], 'NCHW'), (t.CASES[2], 'NHWC'))]; print('ok')"
    )
    proc = run_python(
        "-c", code, env={"JAXCONV_CPU_CAPABILITY": "baseline", "JAX_PLATFORMS": "cpu"}
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_types_through_float32(backend, monkeypatch, dtype):
    rng = np.random.default_rng(4)
    x, w = _operands(rng, 2, 18, 20, 20, (9, 9), "NHWC")
    x, w = on(backend, x.astype(dtype), w.astype(dtype))
    f = lambda x, w: jaxconv.conv2d(x, w, padding=4, groups=18, layout="NHWC")
    ref = lambda x, w: ref_conv2d(x, w, padding=((4, 4), (4, 4)), groups=18, layout="NHWC")
    monkeypatch.setenv(ALGO_ENV, "fft")
    y, vjp = jax.vjp(f, x, w)
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    assert y.dtype == dtype
    rtol, atol = tol(dtype)
    scale = float(jnp.abs(y_ref.astype(jnp.float32)).max())
    np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=rtol, atol=atol * scale
    )
    for got, want in zip(vjp(y), vjp_ref(y)):
        scale = float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=rtol, atol=atol * scale
        )


def test_second_order_gradients_match_lax(backend, monkeypatch):
    """Gradients of gradients run the same three FFT kernels (the custom_vjp rules call one
    another); a Hessian-vector product against lax's in float64."""
    rng = np.random.default_rng(6)
    x64, w64 = on(backend, *_operands(rng, 1, 16, 12, 12, (7, 7), "NCHW"))
    monkeypatch.setenv(ALGO_ENV, "fft")

    def loss(conv, x, w):
        return jnp.sum(jnp.tanh(conv(x, w)))

    ours = lambda x, w: jaxconv.conv2d(x, w, padding=3, groups=16)
    ref = lambda x, w: ref_conv2d(x, w, padding=((3, 3), (3, 3)), groups=16)
    tx, tw = (jnp.asarray(rng.standard_normal(a.shape)) for a in (x64, w64))

    def hvp(conv, x, w, tx, tw):  # reverse over reverse (custom_vjp has no jvp)
        g = jax.grad(lambda x, w: loss(conv, x, w), argnums=(0, 1))
        return jax.grad(
            lambda x, w: sum(jnp.vdot(a, b) for a, b in zip(g(x, w), (tx, tw))), argnums=(0, 1)
        )(x, w)

    f32 = lambda *a: tuple(v.astype(jnp.float32) for v in a)
    got = hvp(ours, *f32(x64, w64, tx, tw))
    want = hvp(ref, x64, w64, tx, tw)
    for g, r in zip(got, want):
        assert _rel_err(g, r) <= 1e-4


def test_forcing_changes_the_bits(backend, monkeypatch):
    """The FFT rounds differently from the direct kernel, so forcing it must change the bits of
    a depthwise float32 result (and of every gradient): it really runs."""
    rng = np.random.default_rng(8)
    x, w = _operands(rng, 1, 16, 12, 12, (5, 5), "NHWC")
    x, w = on(backend, x.astype(jnp.float32), w.astype(jnp.float32))
    f = jax.jit(
        jax.value_and_grad(
            lambda x, w: jnp.sum(jaxconv.conv2d(x, w, padding=2, groups=16, layout="NHWC") ** 2),
            argnums=(0, 1),
        )
    )

    def run(algo):
        monkeypatch.setenv(ALGO_ENV, algo)
        return jax.tree.map(np.asarray, f(x, w))

    direct, fft = run("direct"), run("fft")
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(fft)):
        assert not np.array_equal(a, b)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("where", ["x", "w", "dy"])
def test_non_finite_values_take_the_direct_path(backend, monkeypatch, bad, where):
    """One inf in a transform would spread NaN over a whole plane; such calls fall back to the
    direct kernel, so inf and NaN land where lax puts them."""
    rng = np.random.default_rng(5)
    x = np.asarray(rng.standard_normal((1, 16, 10, 10)), np.float32)
    w = np.asarray(rng.standard_normal((16, 1, 5, 5)), np.float32)
    ct = np.asarray(rng.standard_normal((1, 16, 10, 10)), np.float32)
    if where == "w":
        w[3, 0, 2, 2] = bad
    else:
        {"x": x, "dy": ct}[where][0, 3, 4, 4] = bad
    monkeypatch.setenv(ALGO_ENV, "fft")
    args = on(backend, jnp.asarray(x), jnp.asarray(w))
    y, vjp = jax.vjp(lambda x, w: jaxconv.conv2d(x, w, padding=2, groups=16), *args)
    y_ref, vjp_ref = jax.vjp(
        lambda x, w: ref_conv2d(x, w, padding=((2, 2), (2, 2)), groups=16), *args
    )
    cts = on(backend, jnp.asarray(ct))
    for got, want in zip((y, *vjp(cts)), (y_ref, *vjp_ref(cts))):
        got, want = np.asarray(got), np.asarray(want)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "what, call, why",
    [
        (
            "stride 2",
            lambda x, w: jaxconv.conv2d(x, w, stride=2, padding=1, groups=8),
            "need stride 1",
        ),
        (
            "dense stride 2",
            lambda x, w: jaxconv.conv2d(x, jnp.ones((8, 8, 3, 3), x.dtype), stride=2, padding=1),
            "need stride 1",
        ),
        (
            "float64",
            lambda x, w: jaxconv.conv2d(
                x.astype(jnp.float64), w.astype(jnp.float64), padding=1, groups=8
            ),
            "float64",
        ),
        (
            "kernel over 128",
            lambda x, w: jaxconv.conv2d(x, w, padding=1, dilation=70, groups=8),
            "larger than the largest transform",
        ),
    ],
)
def test_forced_fft_where_it_cannot_run_is_an_error(backend, monkeypatch, what, call, why):
    x = jnp.ones((1, 8, 160, 12), jnp.float32)
    w = jnp.ones((8, 1, 3, 1), jnp.float32)
    x, w = on(backend, x, w)
    monkeypatch.setenv(ALGO_ENV, "fft")
    with pytest.raises(Exception, match=f"{ALGO_ENV}=fft cannot run this call: .*{why}"):
        jax.block_until_ready(call(x, w))


def test_unknown_algorithm_names_fft(backend, monkeypatch):
    monkeypatch.setenv(ALGO_ENV, "fourier")
    x, w = on(backend, jnp.ones((1, 4, 6, 6), jnp.float32), jnp.ones((4, 1, 3, 3), jnp.float32))
    with pytest.raises(
        Exception, match="'fourier' is not one of auto, direct, winograd, winograd2, winograd4, fft"
    ):
        jax.block_until_ready(jaxconv.conv2d(x, w, padding=1, groups=4))


@pytest.mark.parametrize("algo", ["", "auto"])
def test_auto_choice(backend, monkeypatch, algo):
    """Auto takes the FFT for large depthwise kernels, and in NCHW for 7x7 and larger on narrow
    planes, and keeps the direct kernel for small ones (and for everything it does not apply
    to), as docs/design.md's crossover table says; Winograd's choice is unchanged."""
    monkeypatch.setenv(ALGO_ENV, algo)
    same = lambda k: ((k // 2, k // 2), (k // 2, k // 2))
    for layout in ("NCHW", "NHWC"):
        assert algorithm(
            "fwd", (2, 128, 56, 56), (128, 1, 31, 31), same(31), (1, 1), 128, layout
        ).startswith("fft")
        assert algorithm(
            "bwd_filter", (2, 256, 28, 28), (256, 1, 13, 13), same(13), (1, 1), 256, layout
        ).startswith("fft")
        dw = lambda d, k, hw, c=128: algorithm(
            d, (8, c, hw, hw), (c, 1, k, k), same(k), (1, 1), c, layout
        )
        for k, hw in ((3, 56), (3, 112), (5, 56), (7, 56), (3, 28)):
            for d in ("fwd", "bwd_data", "bwd_filter"):
                # NCHW 7x7 @56 bwd_data: the FFT measured 0.57-0.78x direct (below).
                if not (layout == "NCHW" and (k, hw, d) == (7, 56, "bwd_data")):
                    assert dw(d, k, hw) == "direct", (k, hw, d)
        for k, hw in ((7, 14), (7, 7), (13, 7)):
            for d in ("fwd", "bwd_data", "bwd_filter"):
                # NHWC's direct kernel beats the FFT on these narrow planes (1.1-2.3x); NCHW's
                # (short rows, a plane at a time) loses to it by 2.5-10x (docs/design.md).
                got = dw(d, k, hw, 384)
                assert got.startswith("fft") if layout == "NCHW" else got == "direct", (k, hw, d)
        if layout == "NCHW":
            assert dw("bwd_data", 7, 56).startswith("fft")
            assert dw("fwd", 7, 28, 192).startswith("fft")
            assert dw("fwd", 5, 28, 144) == "direct"  # FFT measured 1.6x slower
        assert (
            algorithm(
                "fwd",
                (2, 128, 56, 56),
                (128, 1, 31, 31),
                same(31),
                (1, 1),
                128,
                layout,
                stride=(2, 2),
            )
            == "direct"
        )
        assert (
            algorithm(
                "fwd",
                (2, 128, 56, 56),
                (128, 1, 31, 31),
                same(31),
                (1, 1),
                128,
                layout,
                float64=True,
            )
            == "direct"
        )
        assert (
            algorithm("fwd", (8, 64, 56, 56), (64, 64, 3, 3), same(3), (1, 1), 1, layout)
            == "winograd4"
        )
        # 512 @7: F(4x4) only where the direct forward is the weaker (NHWC; choose_tile).
        assert algorithm("fwd", (8, 512, 7, 7), (512, 512, 3, 3), same(3), (1, 1), 1, layout) == (
            "winograd4" if layout == "NHWC" else "direct"
        )


def test_auto_result_within_bound(backend, monkeypatch):
    monkeypatch.setenv(ALGO_ENV, "auto")
    rng = np.random.default_rng(12)
    x64, w64 = on(backend, *_operands(rng, 1, 32, 30, 30, (27, 27), "NHWC"))
    assert algorithm(
        "fwd", (1, 32, 30, 30), (32, 1, 27, 27), ((13, 13), (13, 13)), (1, 1), 32, "NHWC"
    ).startswith("fft")
    _check_all_directions(x64, w64, ((13, 13), (13, 13)), (1, 1), 32, "NHWC")


@st.composite
def depthwise_configs(draw):
    k = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    dil = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    ke = [d * (kk - 1) + 1 for d, kk in zip(dil, k)]
    pad = tuple((draw(st.integers(0, e)), draw(st.integers(0, e))) for e in ke)
    hw = [draw(st.integers(max(1, e - lo - hi), 24)) for e, (lo, hi) in zip(ke, pad)]
    c = draw(st.integers(1, 20))
    n = draw(st.integers(1, 2))
    layout = draw(st.sampled_from(["NCHW", "NHWC"]))
    return n, c, hw[0], hw[1], k, pad, dil, layout


@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@pytest.mark.slow("hypothesis: several random shapes, each compiled")
@given(cfg=depthwise_configs())
def test_forced_fft_on_random_shapes(backend, monkeypatch, cfg):
    n, c, h, w_, k, pad, dil, layout = cfg
    rng = np.random.default_rng(abs(hash(cfg)) % 2**32)
    x64, w64 = on(backend, *_operands(rng, n, c, h, w_, k, layout))
    monkeypatch.setenv(ALGO_ENV, "fft")
    _check_all_directions(x64, w64, pad, dil, c, layout)


def test_bwd_filter_of_an_empty_batch_is_zero(backend, monkeypatch):
    """A raw bwd_filter call with N = 0 (Python never makes one) on the FFT: dw = 0."""
    monkeypatch.setenv(ALGO_ENV, "fft")
    attrs = dict(
        stride_h=1,
        stride_w=1,
        dilation_h=1,
        dilation_w=1,
        pad_top=2,
        pad_bottom=2,
        pad_left=2,
        pad_right=2,
        groups=8,
        layout=0,
    )
    x = jnp.ones((0, 8, 9, 9), jnp.float32)
    dy = jnp.ones((0, 8, 9, 9), jnp.float32)
    dw = jax.ffi.ffi_call(
        "jaxconv_conv2d_bwd_filter", jax.ShapeDtypeStruct((8, 1, 5, 5), jnp.float32)
    )(x, dy, **{k: np.int64(v) for k, v in attrs.items()})
    np.testing.assert_array_equal(np.asarray(dw), np.zeros((8, 1, 5, 5), np.float32))
