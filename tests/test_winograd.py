"""Winograd F(2x2,3x3) and F(4x4,3x3) on the CPU (ffi/cpu/winograd.cc).

3x3 stride-1 dilation-1 convolutions (forward, bwd_data = the input gradient and
conv_transpose2d, and bwd_filter = the weight gradient) may run on Winograd;
JAXCONV_CPU_CONV_ALGO picks the algorithm per call: auto (default), direct, winograd (tile by
shape), winograd2, winograd4.

Error bounds, as max |got - ref| / max |ref| against a float64 lax reference, standard-normal
inputs, float32 (measured on these shapes: direct <= 7.6e-7, F(2x2) <= 3.4e-7, F(4x4) <= 4.5e-6):
F(4x4)'s larger transform constants (up to 8 in A^T, 5 in B^T) cost about one decimal digit.

The weight gradient (bwd_filter) runs on Winograd too, as the adjoint of the forward's tiles
(BOUND_DW below: the same bounds; measured direct <= 5.5e-7, F(2x2) <= 6.2e-7, F(4x4) <= 6.8e-6),
in a summation order fixed by the shape (the same bits with one thread or two).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv

from child import run_python
from reference import on, random_array, ref_conv2d, ref_conv_transpose2d

ALGO_ENV = "JAXCONV_CPU_CONV_ALGO"
CAPABILITY_ENV = "JAXCONV_CPU_CAPABILITY"
# Relative bound per algorithm: max abs error over max abs reference value.
BOUND = {"direct": 2e-6, "winograd2": 2e-6, "winograd4": 2e-5}

# (N, C, O, H, W, padding, groups): odd planes (partial last tiles), asymmetric and large
# padding (tiles starting outside the input, pad > kernel), groups, channel counts that are not
# multiples of the 8-channel vectors or the 16-column GEMM panels.
#
# The last two have many channels on few tiles (ResNet-50's 3x3 512 @7 class, smaller), which
# winograd.cc runs on its panels schedule: Cin = 201 ends in a partial K-slice (slices of 64 for
# F(4x4), 128 for F(2x2)), Cout = 170 in a panel pair of one partial panel (10 columns), and the
# grouped one (72 -> 40 per group) loops the schedule over groups (F(4x4); its F(2x2) takes the
# whole schedule).
SHAPES = [
    (2, 16, 24, 9, 11, ((1, 1), (1, 1)), 1),
    (1, 40, 36, 14, 14, ((1, 1), (1, 1)), 1),
    (2, 12, 20, 7, 10, ((0, 2), (3, 1)), 2),
    (2, 32, 32, 6, 5, ((0, 0), (0, 0)), 1),
    (1, 5, 3, 5, 7, ((4, 3), (0, 5)), 1),
    (2, 201, 170, 7, 7, ((1, 1), (1, 1)), 1),
    (1, 144, 80, 7, 7, ((1, 1), (1, 1)), 2),
]


def _layout_arrays(x, w, layout):
    if layout == "NHWC":
        return x.transpose(0, 2, 3, 1), w.transpose(2, 3, 1, 0)
    return x, w


def _rel_err(got, want):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    return np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize("algo", ["direct", "winograd2", "winograd4"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"_g{s[6]}")
def test_forward_and_input_gradient_within_bound(backend, monkeypatch, shape, layout, algo):
    n, c, o, h, w_, pad, groups = shape
    rng = np.random.default_rng(hash((shape, layout)) % 2**32)
    x64 = rng.standard_normal((n, c, h, w_))
    w64 = rng.standard_normal((o, c // groups, 3, 3))
    b64 = rng.standard_normal(o)
    x64, w64 = _layout_arrays(x64, w64, layout)
    x64, w64, b64 = (jnp.asarray(a, jnp.float64) for a in (x64, w64, b64))
    x, w, b = on(backend, *(a.astype(jnp.float32) for a in (x64, w64, b64)))
    monkeypatch.setenv(ALGO_ENV, algo)

    y = jax.jit(lambda x, w, b: jaxconv.conv2d(x, w, b, padding=pad, groups=groups, layout=layout))(
        x, w, b
    )
    y_ref = ref_conv2d(x64, w64, b64, padding=pad, groups=groups, layout=layout)
    assert y.dtype == jnp.float32 and y.shape == y_ref.shape
    assert _rel_err(y, y_ref) <= BOUND[algo]

    # The input gradient of sum(y * r) is bwd_data(r): a 3x3 conv with the flipped filter.
    r = random_array(rng, y_ref.shape, jnp.float64)
    dx = jax.jit(
        jax.grad(
            lambda x, w: jnp.sum(
                jaxconv.conv2d(x, w, padding=pad, groups=groups, layout=layout)
                * r.astype(jnp.float32)
            )
        )
    )(x, w)
    dx_ref = jax.grad(
        lambda x: jnp.sum(ref_conv2d(x, w64, padding=pad, groups=groups, layout=layout) * r)
    )(x64)
    assert _rel_err(dx, dx_ref) <= BOUND[algo]


@pytest.mark.parametrize("algo", ["winograd2", "winograd4"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_conv_transpose_stride1_within_bound(backend, monkeypatch, layout, algo):
    # conv_transpose2d is the bwd_data target: with stride 1 and a 3x3 kernel it is Winograd's.
    rng = np.random.default_rng(7)
    x64 = jnp.asarray(rng.standard_normal((2, 24, 9, 8)))
    w64 = jnp.asarray(rng.standard_normal((24, 20, 3, 3)))  # (I, O, KH, KW) as in PyTorch
    b64 = jnp.asarray(rng.standard_normal(20))
    if layout == "NHWC":
        x64, w64 = x64.transpose(0, 2, 3, 1), w64.transpose(2, 3, 1, 0)  # HWIO for NHWC
    x, w, b = on(backend, *(a.astype(jnp.float32) for a in (x64, w64, b64)))
    monkeypatch.setenv(ALGO_ENV, algo)
    y = jaxconv.conv_transpose2d(x, w, b, padding=1, layout=layout)
    y_ref = ref_conv_transpose2d(x64, w64, b64, padding=((1, 1), (1, 1)), layout=layout)
    assert y.shape == y_ref.shape
    assert _rel_err(y, y_ref) <= BOUND[algo]


# Half types: bound on max|err| / max|y| (y: the float64 result on the same, exactly
# representable inputs). Every path rounds y once to the storage type (relative u_T = 2^-9
# bfloat16, 2^-12 float16 to nearest, at most u_T * max|y|); the float32 stages add the float32
# bounds above. The bfloat16 F(2x2) GEMM stage (avx512_bf16: vdpbf16ps) also rounds the
# transformed tiles V and filters U to bfloat16, each a relative 2^-9: M[e]'s error is then at
# most 2 * 2^-9 * sum |V U|, and the output transform adds up to 4 (of 16) such M terms per
# output. Against max|y| that measured <= 2.3 * 2^-9 on these shapes (standard-normal data,
# K up to 64 * 9), so the stated bound is 4 * 2^-9. F(4x4) would multiply the same roundings
# by its larger constants (28-35 * 2^-9 measured), so bfloat16 F(4x4) keeps the float32 stage.
U_HALF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


def half_bound(dtype, algo):
    """The relative bound for a half-type Winograd call under the active capability."""
    bf16_gemm = (
        dtype == "bfloat16"
        and algo == "winograd2"
        and jaxconv._ffi.cpu_gemm_kernels()["bfloat16"] == "vdpbf16ps"
    )
    return 4 * 2.0**-9 if bf16_gemm else U_HALF[dtype] + BOUND[algo]


# (N, C, O, H, W, padding): odd Cin (the pair padding), channels off the panels, partial tiles,
# a K (64 * 9 / 2 pairs) past one K slice of pairs only in the bwd_data of the last; the last,
# many channels on a 7x7 plane, runs the panels schedule (odd Cin: its last K-slice of pairs
# ends in the pad).
HALF_SHAPES = [
    (2, 16, 16, 10, 10, 1),
    (1, 37, 21, 9, 7, 1),
    (2, 64, 48, 8, 8, 1),
    (1, 300, 40, 6, 6, 1),
    (1, 201, 170, 7, 7, 1),
]


def check_half(backend, shape, layout, dtype, algo):
    """Forward and bwd_data of one half-type Winograd call within half_bound; returns the two
    relative errors."""
    n, c, o, h, w_, p = shape
    rng = np.random.default_rng(hash((shape, layout, dtype)) % 2**32)
    x64, w64 = _layout_arrays(
        rng.standard_normal((n, c, h, w_)), rng.standard_normal((o, c, 3, 3)), layout
    )
    x64, w64 = (np.asarray(jnp.asarray(a, dtype).astype(jnp.float64)) for a in (x64, w64))
    x, w = on(backend, jnp.asarray(x64, dtype), jnp.asarray(w64, dtype))
    pad = ((p, p), (p, p))
    conv = lambda x, w: jaxconv.conv2d(x, w, padding=p, layout=layout)
    y = jax.jit(conv)(x, w)
    y_ref = ref_conv2d(jnp.asarray(x64), jnp.asarray(w64), padding=pad, layout=layout)
    assert y.dtype == jnp.dtype(dtype) and y.shape == y_ref.shape
    bound = half_bound(dtype, algo)
    e_fwd = _rel_err(y, y_ref)
    assert e_fwd <= bound, (e_fwd / 2.0**-9, bound / 2.0**-9)
    r64 = np.asarray(jnp.asarray(rng.standard_normal(y_ref.shape), dtype).astype(jnp.float64))
    dx = jax.jit(jax.grad(lambda x: jnp.sum(conv(x, w) * r64.astype(dtype))))(x)
    dx_ref = jax.grad(
        lambda x: jnp.sum(ref_conv2d(x, jnp.asarray(w64), padding=pad, layout=layout) * r64)
    )(jnp.asarray(x64))
    assert dx.dtype == jnp.dtype(dtype)
    e_bwd = _rel_err(dx, dx_ref)
    assert e_bwd <= bound, (e_bwd / 2.0**-9, bound / 2.0**-9)
    return e_fwd, e_bwd


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("algo", ["winograd2", "winograd4"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", HALF_SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_half_types_within_bound(backend, monkeypatch, shape, layout, algo, dtype):
    monkeypatch.setenv(ALGO_ENV, algo)
    check_half(backend, shape, layout, dtype, algo)


def test_bf16_f2_exact_on_small_integers(backend, monkeypatch):
    """Values in {-1, 0, 1}, 8 channels: every y is an integer of at most 72, exact in
    bfloat16. F(2x2)'s transformed tiles are small integers and its transformed filters
    quarters of at most 9/4, exact as bfloat16 pairs, and every product and sum is exact in
    float32: so the bfloat16 GEMM stage (and the float32 one) must give y exactly. (F(4x4)'s 1/6
    and 1/24 leave ~1e-5 where y = 0.)"""
    algo = "winograd2"
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.integers(-1, 2, (2, 8, 6, 6)), jnp.bfloat16)
    w = jnp.asarray(rng.integers(-1, 2, (8, 8, 3, 3)), jnp.bfloat16)
    monkeypatch.setenv(ALGO_ENV, algo)
    y = jaxconv.conv2d(*on(backend, x, w), padding=1)
    y_ref = ref_conv2d(x.astype(jnp.float64), w.astype(jnp.float64), padding=((1, 1), (1, 1)))
    np.testing.assert_array_equal(np.asarray(y, np.float64), np.asarray(y_ref))


def test_bf16_auto_takes_f2_where_its_gemm_is_bf16(backend, monkeypatch):
    """Where F(2x2) runs its GEMMs on vdpbf16ps, auto gives bfloat16 F(2x2) on wide layers
    (256 channels @14, batch 8: F(4x4) in float32) and keeps F(4x4) on narrow ones (64 @16)."""
    _cpu_only(backend)
    from jaxconv import _jaxconv_cpu

    monkeypatch.setenv(ALGO_ENV, "auto")
    attrs = [1, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    wide = ("fwd", False, [8, 256, 14, 14], [256, 256, 3, 3], attrs)
    narrow = ("fwd", False, [8, 64, 16, 16], [64, 64, 3, 3], attrs)
    assert _jaxconv_cpu.conv_algorithm(*wide) == "winograd4"
    bf16_gemm = jaxconv._ffi.cpu_gemm_kernels()["bfloat16"] == "vdpbf16ps"
    want = "winograd2" if bf16_gemm else "winograd4"
    assert _jaxconv_cpu.conv_algorithm(*wide, bfloat16=True) == want
    assert _jaxconv_cpu.conv_algorithm(*narrow, bfloat16=True) == "winograd4"


_CHILD = (
    "import os, jax; jax.config.update('jax_enable_x64', True);"
    "import jaxconv, test_winograd as t;"
    "cap = os.environ['JAXCONV_CPU_CAPABILITY'];"
    "assert jaxconv._ffi.cpu_capability() == cap;"
    "e = [];"
    "[(os.environ.__setitem__('JAXCONV_CPU_CONV_ALGO', a), "
    "e.append(t.check_half('cpu', t.HALF_SHAPES[i], lay, d, a))) "
    "for a in ('winograd2', 'winograd4') for i in (1, 3, 4) "
    "for lay in ('NCHW', 'NHWC') for d in ('bfloat16', 'float16')];"
    # bwd_filter: its transforms (NCHW rows, NHWC transposes, partial tiles) per capability.
    "[(os.environ.__setitem__('JAXCONV_CPU_CONV_ALGO', a), "
    "t.check_filter_gradient('cpu', t.FILTER_SHAPES[i], lay, a, d)) "
    "for a in ('winograd2', 'winograd4') for i in (0, 2, 4, 7) "
    "for lay in ('NCHW', 'NHWC') for d in ('float32', 'bfloat16')];"
    "print('ok', max(max(p) for p in e) / 2.0**-9)"
)


def _other_capabilities():
    active = jaxconv._ffi.cpu_capability()
    return [c for c in jaxconv._ffi.cpu_capabilities() if c != active]


@pytest.mark.cpu_only("the capabilities are instruction sets of the CPU kernels")
@pytest.mark.parametrize("capability", _other_capabilities())
def test_half_types_within_bound_under_every_capability(backend, capability):
    """Half-type forward and bwd_data, and float32/bfloat16 bwd_filter, under each other
    instruction-set capability (a child process per capability)."""
    proc = run_python("-c", _CHILD, env={CAPABILITY_ENV: capability, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def _cpu_only(backend):
    if backend != "cpu":
        pytest.skip("the algorithm choice is the CPU kernel's")


def _assert_forcing_changes_bits_only_where_applicable(run, x, w):
    """run(algo, x, w, stride) under each forced algorithm: Winograd changes the float32 stride-1
    bits (it runs) and leaves stride 2 and float64 exactly direct's (it declines there)."""
    direct = run("direct", x, w)
    for algo in ("winograd2", "winograd4"):
        assert not np.array_equal(run(algo, x, w), direct), algo
    np.testing.assert_array_equal(run("winograd4", x, w, 2), run("direct", x, w, 2))
    x64, w64 = x.astype(jnp.float64), w.astype(jnp.float64)
    np.testing.assert_array_equal(run("winograd4", x64, w64), run("direct", x64, w64))


def test_forcing_changes_the_algorithm_only_where_applicable(backend, monkeypatch):
    """Winograd rounds differently from the direct GEMM, so forcing it must change the bits of a
    3x3 stride-1 float32 result, and must not change those of a float64 or stride-2 one."""
    _cpu_only(backend)
    rng = np.random.default_rng(11)
    x = random_array(rng, (2, 16, 12, 12), jnp.float32)
    w = random_array(rng, (16, 16, 3, 3), jnp.float32)
    conv = jax.jit(lambda x, w, s: jaxconv.conv2d(x, w, stride=s, padding=1), static_argnums=2)

    def run(algo, x, w, s=1):
        monkeypatch.setenv(ALGO_ENV, algo)
        return np.asarray(conv(x, w, s))

    _assert_forcing_changes_bits_only_where_applicable(run, x, w)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("where", ["x", "w"])
def test_non_finite_values_take_the_direct_path(backend, monkeypatch, bad, where):
    """An inf in a Winograd tile would become inf - inf = NaN across the tile; such calls fall
    back to the direct algorithm, so inf and NaN land where lax puts them."""
    rng = np.random.default_rng(5)
    x = np.asarray(rng.standard_normal((1, 8, 8, 8)), np.float32)
    w = np.asarray(rng.standard_normal((8, 8, 3, 3)), np.float32)
    if where == "x":
        x[0, 3, 4, 4] = bad
    else:
        w[2, 1, 1, 1] = bad
    monkeypatch.setenv(ALGO_ENV, "winograd4")
    y = np.asarray(jaxconv.conv2d(*on(backend, jnp.asarray(x), jnp.asarray(w)), padding=1))
    y_ref = np.asarray(ref_conv2d(jnp.asarray(x), jnp.asarray(w), padding=((1, 1), (1, 1))))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(y_ref))
    np.testing.assert_array_equal(np.isneginf(y), np.isneginf(y_ref))
    finite = np.isfinite(y_ref)
    np.testing.assert_allclose(y[finite], y_ref[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("value", ["fast", "Direct", "winograd8"])
def test_unknown_algorithm_is_an_error(backend, monkeypatch, value):
    _cpu_only(backend)
    x = jnp.ones((1, 4, 6, 6), jnp.float32)
    w = jnp.ones((4, 4, 3, 3), jnp.float32)
    monkeypatch.setenv(ALGO_ENV, value)
    with pytest.raises(Exception, match=f"{ALGO_ENV}='{value}' is not one of auto, direct"):
        jax.block_until_ready(jaxconv.conv2d(x, w, padding=1))


@pytest.mark.parametrize("algo", ["", "auto", "winograd"])
def test_default_and_auto_choices_within_bound(backend, monkeypatch, algo):
    # Big enough in channels and tiles for auto to pick Winograd (F(4x4) on a 16x16 plane).
    rng = np.random.default_rng(9)
    x64 = jnp.asarray(rng.standard_normal((4, 32, 16, 16)))
    w64 = jnp.asarray(rng.standard_normal((32, 32, 3, 3)))
    x, w = on(backend, x64.astype(jnp.float32), w64.astype(jnp.float32))
    monkeypatch.setenv(ALGO_ENV, algo)
    y = jaxconv.conv2d(x, w, padding=1)
    assert _rel_err(y, ref_conv2d(x64, w64, padding=((1, 1), (1, 1)))) <= BOUND["winograd4"]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_auto_takes_f4_on_14x14_with_a_quarter_as_many_tiles_as_channels(
    backend, monkeypatch, layout
):
    """The 3x3 @14 class (ResNet-50's 256-channel layer, here 64 channels and 16 tiles of 4x4):
    auto picks F(4x4) (bit-identical to winograd4, not to direct), within F(4x4)'s bound."""
    rng = np.random.default_rng(12)
    x64, w64 = _layout_arrays(
        rng.standard_normal((1, 64, 14, 14)), rng.standard_normal((64, 64, 3, 3)), layout
    )
    x64, w64 = jnp.asarray(x64), jnp.asarray(w64)
    x, w = on(backend, x64.astype(jnp.float32), w64.astype(jnp.float32))
    got = {}
    for algo in ("auto", "direct", "winograd4"):
        monkeypatch.setenv(ALGO_ENV, algo)
        got[algo] = np.asarray(jaxconv.conv2d(x, w, padding=1, layout=layout))
    if backend == "cpu":
        np.testing.assert_array_equal(got["auto"], got["winograd4"])
        assert not np.array_equal(got["auto"], got["direct"])
    want = ref_conv2d(x64, w64, padding=((1, 1), (1, 1)), layout=layout)
    assert _rel_err(got["auto"], want) <= BOUND["winograd4"]


def _algorithm_square(direction, n, c, hw, layout):
    """The CPU kernels' algorithm for a 3x3 c -> c, pad 1 call on n x c x hw x hw."""
    from jaxconv import _jaxconv_cpu

    attrs = [1, 1, 1, 1, 1, 1, 1, 1, 1, 0 if layout == "NCHW" else 1]
    return _jaxconv_cpu.conv_algorithm(direction, False, [n, c, hw, hw], [c, c, 3, 3], attrs)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_auto_takes_f4_from_32_tiles_on_many_channels(backend, monkeypatch, layout):
    """Many channels on few tiles (choose_tile's measured thresholds): F(4x4) from 32 4x4 tiles
    (ResNet-50's 512 @7 at batch 8 and 16, 256 @14 at batch 2), forward and bwd_data; direct
    below that (512 @7 at batch 4 and 1, 256 @14 at batch 1), where the winner depends on layout
    and direction; the ResNet-50 rows at batch 8 that took F(4x4) before keep it."""
    _cpu_only(backend)
    monkeypatch.setenv(ALGO_ENV, "auto")
    for d in ("fwd", "bwd_data"):
        for n, c, hw in ((8, 512, 7), (16, 512, 7), (2, 256, 14), (8, 256, 14), (8, 128, 28)):
            assert _algorithm_square(d, n, c, hw, layout) == "winograd4", (d, n, c, hw)
        for n, c, hw in ((4, 512, 7), (1, 512, 7), (1, 256, 14)):
            assert _algorithm_square(d, n, c, hw, layout) == "direct", (d, n, c, hw)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_resnet50_512_at_7_within_bound(backend, monkeypatch, layout):
    """The class itself (3x3 512 -> 512 @7, batch 8): auto's F(4x4) on the panels schedule,
    forward and bwd_data within F(4x4)'s bound against float64."""
    rng = np.random.default_rng(13)
    x64, w64 = _layout_arrays(
        rng.standard_normal((8, 512, 7, 7)), rng.standard_normal((512, 512, 3, 3)), layout
    )
    x64, w64 = jnp.asarray(x64), jnp.asarray(w64)
    x, w = on(backend, x64.astype(jnp.float32), w64.astype(jnp.float32))
    pad = ((1, 1), (1, 1))
    monkeypatch.setenv(ALGO_ENV, "auto")
    conv = lambda x, w: jaxconv.conv2d(x, w, padding=1, layout=layout)
    y_ref = ref_conv2d(x64, w64, padding=pad, layout=layout)
    assert _rel_err(jax.jit(conv)(x, w), y_ref) <= BOUND["winograd4"]
    r = jnp.asarray(rng.standard_normal(y_ref.shape))
    dx = jax.jit(jax.grad(lambda x: jnp.sum(conv(x, w) * r.astype(jnp.float32))))(x)
    dx_ref = jax.grad(lambda x: jnp.sum(ref_conv2d(x, w64, padding=pad, layout=layout) * r))(x64)
    assert _rel_err(dx, dx_ref) <= BOUND["winograd4"]


# ---------------------------------------------------------------------------------------------
# bwd_filter (the weight gradient): the adjoint of the forward's tiles, dw = G^T [(A dY A^T) ⊙
# (B^T d B)] G summed over tiles (ffi/cpu/winograd.cc, run_filter). Each weight is a sum over
# N * OH * OW products; the float32 transforms and the K = tiles GEMMs round along the way.
# Bounds on max|err| / max|dw| against the float64 oracle, standard-normal x and dy; measured on
# FILTER_SHAPES, both layouts: direct <= 5.5e-7, F(2x2) <= 6.2e-7, F(4x4) <= 6.8e-6 (its
# constants cost the same decimal digit as in the forward, whose bounds are reused).
BOUND_DW = {"direct": 2e-6, "winograd2": 2e-6, "winograd4": 2e-5}

# SHAPES plus: many tiles and few output blocks (the tiles cut into ranges summed in order),
# wide channels (Mw in several blocks), pad 2 with Cin = 24 (a half-filled last panel of V).
FILTER_SHAPES = SHAPES + [
    (3, 16, 16, 64, 64, ((1, 1), (1, 1)), 1),
    (1, 96, 96, 8, 8, ((1, 1), (1, 1)), 1),
    (1, 24, 8, 13, 6, ((2, 2), (2, 2)), 1),
]


def check_filter_gradient(backend, shape, layout, algo, dtype="float32"):
    """dw of one conv2d call (cotangent r) against the float64 oracle; returns the relative
    error, asserted within BOUND_DW (plus the storage type's rounding for half types)."""
    n, c, o, h, w_, pad, groups = shape
    rng = np.random.default_rng(hash((shape, layout, dtype, "dw")) % 2**32)
    x64, w64 = _layout_arrays(
        rng.standard_normal((n, c, h, w_)), rng.standard_normal((o, c // groups, 3, 3)), layout
    )
    # float64 copies of the values the call sees (exact in dtype).
    x64, w64 = (np.asarray(jnp.asarray(a, dtype).astype(jnp.float64)) for a in (x64, w64))
    ref = lambda w: ref_conv2d(jnp.asarray(x64), w, padding=pad, groups=groups, layout=layout)
    y_ref, ref_vjp = jax.vjp(ref, jnp.asarray(w64))
    r64 = np.asarray(jnp.asarray(rng.standard_normal(y_ref.shape), dtype).astype(jnp.float64))
    (dw_ref,) = ref_vjp(jnp.asarray(r64))
    x, w, r = on(backend, jnp.asarray(x64, dtype), jnp.asarray(w64, dtype), jnp.asarray(r64, dtype))
    conv = lambda x, w: jaxconv.conv2d(x, w, padding=pad, groups=groups, layout=layout)
    dw = jax.jit(lambda x, w, r: jax.vjp(lambda w: conv(x, w), w)[1](r)[0])(x, w, r)
    assert dw.dtype == jnp.dtype(dtype) and dw.shape == dw_ref.shape
    bound = BOUND_DW[algo] + (U_HALF[dtype] if dtype in U_HALF else 0.0)
    err = _rel_err(dw, dw_ref)
    assert err <= bound, (err, bound)
    return err


def _algorithm(direction, shape, layout, bfloat16=False):
    from jaxconv import _jaxconv_cpu

    n, c, o, h, w_, ((pt, pb), (pl, pr)), groups = shape
    attrs = [1, 1, 1, 1, pt, pb, pl, pr, groups, 0 if layout == "NCHW" else 1]
    return _jaxconv_cpu.conv_algorithm(
        direction, False, [n, c, h, w_], [o, c // groups, 3, 3], attrs, bfloat16=bfloat16
    )


@pytest.mark.parametrize("algo", ["direct", "winograd2", "winograd4"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize(
    "shape", FILTER_SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"_g{s[6]}"
)
def test_filter_gradient_within_bound(backend, monkeypatch, shape, layout, algo):
    monkeypatch.setenv(ALGO_ENV, algo)
    if backend == "cpu":
        assert _algorithm("bwd_filter", shape, layout) == algo
    check_filter_gradient(backend, shape, layout, algo)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("algo", ["winograd2", "winograd4"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("i", [1, 2, 6])
def test_filter_gradient_half_types_within_bound(backend, monkeypatch, i, layout, algo, dtype):
    """Half types: x and dy widened to float32, dw rounded once to the storage type."""
    monkeypatch.setenv(ALGO_ENV, algo)
    check_filter_gradient(backend, FILTER_SHAPES[i], layout, algo, dtype)


def test_filter_gradient_batch_one_and_one_tile(backend, monkeypatch):
    """Batch 1 with a 3x3 output (one F(4x4) tile, mostly past the plane; one full and three
    partial F(2x2) tiles) and a 1x1 output (pad 0 on a 3x3 input)."""
    for algo in ("winograd2", "winograd4"):
        monkeypatch.setenv(ALGO_ENV, algo)
        check_filter_gradient(backend, (1, 8, 6, 3, 3, ((1, 1), (1, 1)), 1), "NHWC", algo)
        check_filter_gradient(backend, (1, 8, 6, 3, 3, ((0, 0), (0, 0)), 1), "NCHW", algo)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_filter_gradient_check_grads(backend, monkeypatch, layout):
    """check_grads (reverse mode, float32: a loose tolerance for the finite differences) with
    the weight gradient on Winograd."""
    from jax.test_util import check_grads

    rng = np.random.default_rng(8)
    x, w = _layout_arrays(
        rng.standard_normal((1, 6, 7, 6)), rng.standard_normal((4, 6, 3, 3)), layout
    )
    x, w = on(backend, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    for algo in ("winograd2", "winograd4"):
        monkeypatch.setenv(ALGO_ENV, algo)
        f = lambda x, w: jaxconv.conv2d(x, w, padding=1, layout=layout)
        check_grads(f, (x, w), order=1, modes=["rev"], atol=5e-2, rtol=5e-2, eps=1e-2)


def test_filter_gradient_forcing_changes_bits_only_where_applicable(backend, monkeypatch):
    """Forced Winograd changes dw's bits on a 3x3 stride-1 float32 layer (it runs), not on a
    stride-2 or float64 one (direct there)."""
    _cpu_only(backend)
    rng = np.random.default_rng(13)
    x = random_array(rng, (2, 16, 12, 12), jnp.float32)
    w = random_array(rng, (16, 16, 3, 3), jnp.float32)

    def dw(algo, x, w, s=1):
        monkeypatch.setenv(ALGO_ENV, algo)
        f = lambda w: jaxconv.conv2d(x, w, stride=s, padding=1)
        y, vjp = jax.vjp(f, w)
        return np.asarray(vjp(jnp.roll(y, 1))[0])

    _assert_forcing_changes_bits_only_where_applicable(dw, x, w)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
@pytest.mark.parametrize("where", ["x", "dy"])
def test_filter_gradient_non_finite_takes_the_direct_path(backend, monkeypatch, bad, where):
    """A non-finite x or dy would spread across whole transforms: such calls run direct, so dw
    matches the float64 oracle's pattern of inf and NaN."""
    rng = np.random.default_rng(6)
    x = np.asarray(rng.standard_normal((1, 8, 8, 8)), np.float32)
    w = np.asarray(rng.standard_normal((8, 8, 3, 3)), np.float32)
    r = np.asarray(rng.standard_normal((1, 8, 8, 8)), np.float32)
    (x if where == "x" else r)[0, 3, 4, 4] = bad
    monkeypatch.setenv(ALGO_ENV, "winograd4")
    pad = ((1, 1), (1, 1))
    xd, wd, rd = on(backend, jnp.asarray(x), jnp.asarray(w), jnp.asarray(r))
    dw = np.asarray(jax.vjp(lambda w: jaxconv.conv2d(xd, w, padding=1), wd)[1](rd)[0])
    ref = jax.vjp(
        lambda w: ref_conv2d(jnp.asarray(x, jnp.float64), w, padding=pad),
        jnp.asarray(w, jnp.float64),
    )[1](jnp.asarray(r, jnp.float64))[0]
    ref = np.asarray(ref)
    np.testing.assert_array_equal(np.isnan(dw), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(dw), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(dw), np.isneginf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(dw[finite], ref[finite], rtol=1e-4, atol=1e-4)


_DETERMINISM_CHILD = (
    "import os, sys; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]});"
    "import jax, numpy as np, jax.numpy as jnp, jaxconv, test_winograd as t;"
    "x, w, r = t.determinism_operands(sys.argv[1]);"
    "np.save(sys.argv[2], np.asarray(t.filter_gradient(x, w, r, sys.argv[1])))"
)


def determinism_operands(layout):
    rng = np.random.default_rng(21)
    x, w = _layout_arrays(
        rng.standard_normal((3, 40, 34, 34)), rng.standard_normal((40, 40, 3, 3)), layout
    )
    r = rng.standard_normal((3, 40, 34, 34))
    if layout == "NHWC":
        r = r.transpose(0, 2, 3, 1)
    return tuple(jnp.asarray(a, jnp.float32) for a in (x, w, r))


def filter_gradient(x, w, r, layout):
    return jax.vjp(lambda w: jaxconv.conv2d(x, w, padding=1, layout=layout), w)[1](r)[0]


@pytest.mark.cpu_only("the thread count is the CPU kernels' (XLA's intra-op pool)")
@pytest.mark.parametrize("algo", ["winograd2", "winograd4"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_filter_gradient_bits_do_not_depend_on_threads(
    backend, monkeypatch, tmp_path, layout, algo
):
    """Winograd's dw sums each weight in an order fixed by the shape (tile ranges, K slices):
    the bits are the same run after run and in a child process pinned to one CPU (a one-thread
    pool). 3 x 34 x 34 with 40 channels: F(2x2) has 867 tiles (2 ranges), F(4x4) 243 (1)."""
    monkeypatch.setenv(ALGO_ENV, algo)
    x, w, r = determinism_operands(layout)
    f = jax.jit(filter_gradient, static_argnums=3)
    first = np.asarray(f(x, w, r, layout))
    np.testing.assert_array_equal(np.asarray(f(x, w, r, layout)), first)
    out = tmp_path / "dw.npy"
    proc = run_python(
        "-c", _DETERMINISM_CHILD, layout, str(out), env={ALGO_ENV: algo, "JAX_PLATFORMS": "cpu"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(out).view(np.uint32), first.view(np.uint32))


def test_auto_choice_for_the_weight_gradient(backend, monkeypatch):
    """Auto's bwd_filter tile on ResNet-50's 3x3 rows, batch 8 (choose_tile's timings): F(4x4)
    on all four, 512 @7 included (4 tiles per image); direct under 32 channels, and F(2x2)
    where F(4x4) would waste much of its edge tiles (10x10)."""
    _cpu_only(backend)
    monkeypatch.setenv(ALGO_ENV, "auto")
    same = ((1, 1), (1, 1))
    for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7)):
        for layout in ("NCHW", "NHWC"):
            got = _algorithm("bwd_filter", (8, c, c, hw, hw, same, 1), layout)
            assert got == "winograd4", (c, layout, got)
    # The forward and bwd_data of 512 @7 (32 tiles of 4x4): F(4x4) in both layouts.
    row = (8, 512, 512, 7, 7, same, 1)
    for d in ("fwd", "bwd_data"):
        for lay in ("NCHW", "NHWC"):
            assert _algorithm(d, row, lay) == "winograd4", (d, lay)
    assert _algorithm("fwd", (4, 512, 512, 7, 7, same, 1), "NHWC") == "direct"
    assert _algorithm("bwd_filter", (8, 16, 16, 56, 56, same, 1), "NCHW") == "direct"
    assert _algorithm("bwd_filter", (8, 64, 64, 10, 10, same, 1), "NHWC") == "winograd2"
