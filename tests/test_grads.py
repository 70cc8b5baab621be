"""Gradients: first and second order against jax.grad of the lax references, check_grads in
float64, jit(grad), and max-pool's gradient rules (first maximum only, padding gets nothing).

The conv gradients are the three kernels differentiating into each other (conv.py), so second
order checks exercise all of bwd_data's and bwd_filter's own VJPs too.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from test_conv import GEOMETRIES as CONV
from test_conv import MEDIUM, random_conv
from test_conv_transpose import GEOMETRIES as CONVT
from test_conv_transpose import random_convt, transposed
from test_pool import Pool, to_layout

import jaxconv

from reference import ConvCase, assert_close, on, random_array, ref_max_pool2d, ref_max_pool2d_lax

LAYOUTS = ["NCHW", "NHWC"]
DTYPES = [jnp.float32, jnp.float64, jnp.float16, jnp.bfloat16]


def alternating_layouts(items, ids=str):
    """(item, layout) parameters with the layout alternating: each layout sees half the items,
    at half the cost of the full product (gradients compile three reference convolutions)."""
    return [
        pytest.param(item, LAYOUTS[i % 2], id=f"{ids(item)}-{LAYOUTS[i % 2]}")
        for i, item in enumerate(items)
    ]


def dtype_name(dtype):
    return jnp.dtype(dtype).name


def conv_pair(case: ConvCase, layout):
    """(ours, reference) as functions of (x, w, b) with the case's geometry fixed; conv2d or
    conv_transpose2d as the case says."""
    return case.function(layout), case.reference(layout)


def placed_operands(case, backend, layout, dtype, seed=0):
    return on(backend, *case.operands(layout, dtype, seed, bias=True))


def _value_and_vjp(fn, args, cot):
    y, vjp = jax.vjp(fn, *args)
    return y, vjp(cot)


def assert_vjp_matches(ours, ref, args, seed=1, jit=True):
    """VJP of ours and of the reference at the same point, for one random cotangent.

    jit=True compiles each side once instead of dispatching its ops one by one (much faster
    here); a few cases run eagerly so the op-by-op path is covered too."""
    out = jax.eval_shape(ours, *args)
    cot = on(
        args[0].device.platform, random_array(np.random.default_rng(seed), out.shape, out.dtype)
    )
    run = jax.jit(_value_and_vjp, static_argnums=0) if jit else _value_and_vjp
    (y, grads), (y_ref, grads_ref) = run(ours, args, cot), run(ref, args, cot)
    assert_close(y, y_ref)
    for got, want in zip(grads, grads_ref):
        assert_close(got, want)


CONV_GRAD_CASES = [
    "groups_with_everything",
    "anisotropic_everything",
    "depthwise_channel_multiplier",
    "even_kernel_SAME_stride2",
    "kernel_larger_than_input_padded",
    "stride_leaves_remainder",
]


@pytest.mark.parametrize("name, layout", alternating_layouts(CONV_GRAD_CASES))
def test_conv2d_vjp_float64(backend, name, layout):
    case = CONV[name]
    assert_vjp_matches(
        *conv_pair(case, layout), placed_operands(case, backend, layout, jnp.float64)
    )


@pytest.mark.parametrize("dtype, layout", alternating_layouts(DTYPES, dtype_name))
def test_conv2d_vjp_dtypes(backend, dtype, layout):
    case = CONV["groups_with_everything"]
    # float32 op by op, the rest under jit (compiled once: much faster).
    assert_vjp_matches(
        *conv_pair(case, layout),
        placed_operands(case, backend, layout, dtype),
        jit=dtype != jnp.float32,
    )


@pytest.mark.parametrize("name, layout", alternating_layouts(list(MEDIUM)))
def test_conv2d_vjp_medium_shapes(backend, name, layout):
    # Past the kernels' blocking thresholds (see test_conv.MEDIUM); bwd_data's stride phases
    # and bwd_filter's reduction over many positions included.
    case = MEDIUM[name]
    assert_vjp_matches(
        *conv_pair(case, layout), placed_operands(case, backend, layout, jnp.float32)
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_transpose2d_vjp_medium_shape(backend, layout):
    case = transposed(n=2, c=40, o=100, h=8, w=9, kernel=(4, 4), stride=2, padding=1)
    assert_vjp_matches(
        *conv_pair(case, layout), placed_operands(case, backend, layout, jnp.float32)
    )


CONVT_GRAD_CASES = [
    "anisotropic_everything",
    "stride2_output_padding1",
    "depthwise",
    "output_padding_from_dilation",
    "padding_asymmetric",
]


@pytest.mark.parametrize("name, layout", alternating_layouts(CONVT_GRAD_CASES))
def test_conv_transpose2d_vjp_float64(backend, name, layout):
    case = CONVT[name]
    assert_vjp_matches(
        *conv_pair(case, layout), placed_operands(case, backend, layout, jnp.float64)
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_conv_transpose2d_vjp_dtypes(backend, dtype):
    case = CONVT["anisotropic_everything"]
    assert_vjp_matches(
        *conv_pair(case, "NHWC"),
        placed_operands(case, backend, "NHWC", dtype),
        jit=dtype != jnp.float32,
    )


# ----------------------------------------------------------------------------------------------
# check_grads: numerical derivatives up to order 2 in float64.


@pytest.mark.parametrize("layout", LAYOUTS)
def test_check_grads_conv2d(backend, layout):
    case = ConvCase(
        n=1,
        c=4,
        o=2,
        h=5,
        w=4,
        kernel=(3, 2),
        stride=(2, 1),
        padding=((1, 0), (0, 1)),
        dilation=(1, 2),
        groups=2,
    )
    ours, _ = conv_pair(case, layout)
    # NHWC under jit (compiled once, faster); NCHW op by op.
    check_grads(
        jax.jit(ours) if layout == "NHWC" else ours,
        placed_operands(case, backend, layout, jnp.float64),
        order=2,
        modes=("rev",),
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_check_grads_conv_transpose2d(backend, layout):
    case = CONVT["anisotropic_everything"]
    ours, _ = conv_pair(case, layout)
    check_grads(
        jax.jit(ours) if layout == "NHWC" else ours,
        placed_operands(case, backend, layout, jnp.float64),
        order=2,
        modes=("rev",),
    )


def _distinct_values(shape, seed):
    """A random permutation of 0..size-1 (scaled): no ties, and gaps of 0.5 dwarf check_grads'
    finite-difference steps, so the argmax never moves."""
    perm = np.random.default_rng(seed).permutation(int(np.prod(shape)))
    return jnp.asarray(perm.reshape(shape) * 0.5, jnp.float64)


@pytest.mark.parametrize(
    "keywords, layout",
    [
        pytest.param(
            dict(kernel_size=3, stride=2, padding=1), "NCHW", id="overlapping_padded-NCHW"
        ),
        pytest.param(
            dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), ceil_mode=True),
            "NHWC",
            id="anisotropic_dilated_ceil-NHWC",
        ),
    ],
)
def test_check_grads_max_pool2d(backend, layout, keywords):
    x = on(backend, to_layout(_distinct_values((2, 2, 6, 7), 11), layout))
    check_grads(
        partial(jaxconv.max_pool2d, **keywords, layout=layout), (x,), order=2, modes=("rev",)
    )


# ----------------------------------------------------------------------------------------------
# jit(grad) and second order.


def _nonlinear_loss(fn, cot):
    """A scalar loss whose second derivative is not zero, so grad-of-grad means something."""
    return lambda *args: jnp.sum(jnp.tanh(fn(*args)) * cot)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_jit_grad_conv2d(backend, layout):
    case = CONV["groups_with_everything"]
    ours, ref = conv_pair(case, layout)
    args = placed_operands(case, backend, layout, jnp.float32)
    cot = on(backend, random_array(np.random.default_rng(4), ours(*args).shape, jnp.float32))
    got = jax.jit(jax.grad(_nonlinear_loss(ours, cot), argnums=(0, 1, 2)))(*args)
    want = jax.jit(jax.grad(_nonlinear_loss(ref, cot), argnums=(0, 1, 2)))(*args)
    for g, r in zip(got, want):
        assert_close(g, r)


def test_jit_grad_conv_transpose2d_and_pool(backend):
    case = CONVT["stride2_output_padding1"]
    ours, ref = conv_pair(case, "NCHW")
    args = placed_operands(case, backend, "NCHW", jnp.float64)

    def pipeline(up, pool):
        return lambda x, w, b: jnp.sum(pool(jnp.tanh(up(x, w, b))) ** 2)

    pool_ours = partial(jaxconv.max_pool2d, kernel_size=2)
    pool_ref = partial(ref_max_pool2d_lax, kernel=(2, 2), stride=(2, 2), padding=((0, 0), (0, 0)))
    got = jax.jit(jax.grad(pipeline(ours, pool_ours), argnums=(0, 1, 2)))(*args)
    want = jax.jit(jax.grad(pipeline(ref, pool_ref), argnums=(0, 1, 2)))(*args)
    for g, r in zip(got, want):
        assert_close(g, r)


def _second_order(fn, args, cot, directions):
    """grad of <grad(loss)(args), directions>: a Hessian-vector product through fn's VJP."""
    loss = _nonlinear_loss(fn, cot)

    def directional(*a):
        grads = jax.grad(loss, argnums=tuple(range(len(a))))(*a)
        return sum(jnp.sum(g * d) for g, d in zip(grads, directions))

    return jax.grad(directional, argnums=tuple(range(len(args))))(*args)


def assert_second_order_matches(ours, ref, args, seed, jit=True):
    backend = args[0].device.platform
    rng = np.random.default_rng(seed)
    out = jax.eval_shape(ours, *args)
    cot = on(backend, random_array(rng, out.shape, out.dtype))
    directions = [on(backend, random_array(rng, a.shape, a.dtype)) for a in args]
    run = jax.jit(_second_order, static_argnums=0) if jit else _second_order
    for got, want in zip(run(ours, args, cot, directions), run(ref, args, cot, directions)):
        assert_close(got, want)


@pytest.mark.parametrize(
    "name, layout", alternating_layouts(["groups_with_everything", "anisotropic_everything"])
)
def test_second_order_conv2d(backend, name, layout):
    # The first op by op, the second under jit.
    case = CONV[name]
    assert_second_order_matches(
        *conv_pair(case, layout),
        placed_operands(case, backend, layout, jnp.float64),
        seed=8,
        jit=layout == "NHWC",
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_second_order_conv_transpose2d(backend, layout):
    case = CONVT["anisotropic_everything"]
    assert_second_order_matches(
        *conv_pair(case, layout), placed_operands(case, backend, layout, jnp.float64), seed=9
    )


def test_second_order_max_pool2d(backend):
    # Without ties jaxconv and lax route gradients identically, so even the second order (the
    # VJP of the backward kernel, a gather at the saved indices) can be compared with lax.
    x = on(backend, _distinct_values((2, 3, 7, 6), 12) / 40.0)
    ours = partial(jaxconv.max_pool2d, kernel_size=3, stride=2, padding=1)
    ref = partial(ref_max_pool2d_lax, kernel=(3, 3), stride=(2, 2), padding=((1, 1), (1, 1)))
    assert_second_order_matches(ours, ref, (x,), seed=10)


# ----------------------------------------------------------------------------------------------
# Max-pool gradient rules.


def scatter_to_first_max(dy, idx, in_hw):
    """dx of max pooling from the NumPy reference's indices: dx[n, c].flat[idx] += dy."""
    dy, idx = np.asarray(dy, np.float64), np.asarray(idx)
    n, c = dy.shape[:2]
    dx = np.zeros((n, c, in_hw[0] * in_hw[1]))
    for ni in range(n):
        for ci in range(c):
            np.add.at(dx[ni, ci], idx[ni, ci].ravel(), dy[ni, ci].ravel())
    return dx.reshape(n, c, *in_hw)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "dtype", [jnp.float32, jnp.float64, jnp.float16, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name
)
def test_max_pool_gradient_goes_to_first_maximum(backend, layout, dtype):
    # Values in {0, 1, 2}: many ties; overlapping windows send several cotangents to one cell.
    case = Pool(h=7, w=6, kernel=3, stride=2, padding=1, dilation=(1, 2))
    x_nchw = jnp.asarray(np.random.default_rng(13).integers(0, 3, (2, 3, 7, 6)), dtype)
    x = on(backend, to_layout(x_nchw, layout))
    y, vjp = jax.vjp(partial(jaxconv.max_pool2d, **case.keywords(), layout=layout), x)
    # Small integer cotangents: every sum below is exact in every dtype.
    out_hw = y.shape[2:] if layout == "NCHW" else y.shape[1:3]
    dy_nchw = np.random.default_rng(14).integers(1, 4, (2, 3) + out_hw)
    (dx,) = vjp(on(backend, to_layout(jnp.asarray(dy_nchw, dtype), layout)))
    _, idx = ref_max_pool2d(x_nchw, **case.ref_keywords())
    want = scatter_to_first_max(dy_nchw, idx, (7, 6))
    assert dx.dtype == dtype
    got = dx if layout == "NCHW" else jnp.transpose(dx, (0, 3, 1, 2))
    np.testing.assert_array_equal(np.asarray(got).astype(np.float64), want)


def test_max_pool_gradient_tie_in_one_window(backend):
    # One 2x2 window of equal values: only its top-left cell gets the gradient.
    x = on(backend, jnp.full((1, 1, 2, 2), 3.0))
    dx = jax.grad(lambda x: jnp.sum(jaxconv.max_pool2d(x, 2)))(x)
    np.testing.assert_array_equal(dx[0, 0], [[1.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_max_pool_gradient_skips_padding(backend, layout):
    # All inputs negative: zero padding would win border windows and swallow their gradient.
    # With -inf padding every window's cotangent lands on a real cell, so nothing is lost.
    x_nchw = -1.0 - jnp.abs(random_array(np.random.default_rng(15), (1, 2, 5, 5), jnp.float64))
    x = on(backend, to_layout(x_nchw, layout))
    f = partial(jaxconv.max_pool2d, kernel_size=3, stride=2, padding=1, layout=layout)
    y, vjp = jax.vjp(f, x)
    dy = jnp.ones_like(y)
    (dx,) = vjp(dy)
    assert float(jnp.sum(dx)) == float(jnp.sum(dy))
    _, idx = ref_max_pool2d(x_nchw, (3, 3), (2, 2), ((1, 1), (1, 1)))
    got = dx if layout == "NCHW" else jnp.transpose(dx, (0, 3, 1, 2))
    np.testing.assert_array_equal(got, scatter_to_first_max(np.ones((1, 2, 3, 3)), idx, (5, 5)))


def test_max_pool_gradient_nan_window(backend):
    # The NaN is the window's maximum, so it (and only it) receives the gradient.
    x = jnp.array([[[[1.0, jnp.nan], [5.0, 2.0]]]])
    _, vjp = jax.vjp(partial(jaxconv.max_pool2d, kernel_size=2), on(backend, x))
    (g,) = vjp(on(backend, jnp.ones((1, 1, 1, 1))))
    np.testing.assert_array_equal(g[0, 0], [[0.0, 1.0], [0.0, 0.0]])


# ----------------------------------------------------------------------------------------------
# Seeded random geometries (the same generators as the forward tests), first order, float64.


@pytest.mark.parametrize("seed", range(8))
def test_conv2d_vjp_random_configurations(backend, seed):
    case = random_conv(np.random.default_rng(3000 + seed))
    layout = LAYOUTS[seed % 2]
    assert_vjp_matches(
        *conv_pair(case, layout), placed_operands(case, backend, layout, jnp.float64, seed=seed)
    )


@pytest.mark.parametrize("seed", range(6))
def test_conv_transpose2d_vjp_random_configurations(backend, seed):
    case = random_convt(np.random.default_rng(4000 + seed))
    layout = LAYOUTS[seed % 2]
    assert_vjp_matches(
        *conv_pair(case, layout), placed_operands(case, backend, layout, jnp.float64, seed=seed)
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_size_batch_gradients(backend, layout):
    # No examples: dx is empty, and dw and d(bias) are sums over nothing, i.e. zeros.
    case = ConvCase(n=0, padding=1)
    ours, ref = conv_pair(case, layout)
    assert_vjp_matches(ours, ref, placed_operands(case, backend, layout, jnp.float32))
    x, w, b = placed_operands(case, backend, layout, jnp.float32)
    dw, db = jax.grad(lambda w, b: jnp.sum(ours(x, w, b)), argnums=(0, 1))(w, b)
    assert not np.any(np.asarray(dw)) and not np.any(np.asarray(db))
