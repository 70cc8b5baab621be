"""jaxconv under vmap, second-order AD, remat and scan (one device; sharding: test_sharding.py).

Structural claims are checked on the compiled HLO text: a vmapped op is ONE kernel launch (one
custom call per target) and no while loop. Values are compared with the lax references in
reference.py, vmapped by lax's own batching rules, so the two sides share no batching code.
"""

from __future__ import annotations

import collections
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxconv

from reference import (
    assert_close,
    on,
    random_array,
    ref_conv2d,
    ref_conv_transpose2d,
    ref_max_pool2d,
    ref_max_pool2d_lax,
)

LAYOUTS = ["NCHW", "NHWC"]
B = 3  # the size of every vmapped axis


def compiled_hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def alternating_layouts(items, ids=str):
    """(item, layout) pairs with the layout alternating: each layout sees half the items at
    half the cost of the full product."""
    return [
        pytest.param(item, LAYOUTS[i % 2], id=f"{ids(item)}-{LAYOUTS[i % 2]}")
        for i, item in enumerate(items)
    ]


def kernel_launches(hlo: str) -> dict[str, int]:
    """How many custom calls to each jaxconv target the compiled HLO holds."""
    return dict(collections.Counter(re.findall(r'custom_call_target="jaxconv_(\w+)"', hlo)))


def has_loop(hlo: str) -> bool:
    return re.search(r"\bwhile\(", hlo) is not None


def run_checking_launches(fn, args, expected: dict[str, int]):
    """Compiles fn once, asserts its HLO launches each kernel as expected and holds no while
    loop, and returns fn(*args) from that executable."""
    compiled = jax.jit(fn).lower(*args).compile()
    hlo = compiled.as_text()
    assert kernel_launches(hlo) == expected, kernel_launches(hlo)
    assert not has_loop(hlo), "vmap became a loop"
    return compiled(*args)


# ----------------------------------------------------------------------------------------------
# Operands. Geometries are written once in NCHW/OIHW terms with explicit pads (both APIs take
# them); NHWC operands are transposes of the same numbers.

CONV_CASES = {
    "plain": dict(
        c=3, o=4, kernel=(3, 3), stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1), groups=1
    ),
    "grouped_anisotropic": dict(
        c=4, o=6, kernel=(3, 2), stride=(2, 1), padding=((1, 0), (0, 1)), dilation=(1, 2), groups=2
    ),
}
CONVT_CASE = dict(
    c=4,
    o=2,
    kernel=(3, 2),
    stride=(2, 1),
    padding=((1, 0), (0, 1)),
    output_padding=(1, 0),
    dilation=(1, 1),
    groups=2,
)
N, H, W = 2, 6, 5


def to_layout(a, layout, kind):
    """NCHW activation / OIHW weight -> the layout's order (mapped axes stay in front)."""
    if layout == "NCHW":
        return a
    lead = a.ndim - 4
    order = (0, 2, 3, 1) if kind == "act" else (2, 3, 1, 0)
    return jnp.transpose(a, tuple(range(lead)) + tuple(lead + i for i in order))


def conv_operands(
    backend,
    case,
    layout,
    dtype=jnp.float64,
    x_batch=(),
    w_batch=(),
    b_batch=(),
    seed=0,
    transposed=False,
):
    """x, w, b with optional leading batch shapes (moved to their vmapped axes by the caller)."""
    rng = np.random.default_rng(seed)
    c, o, g = case["c"], case["o"], case["groups"]
    # conv2d: w is (O, C/g, kh, kw). conv_transpose2d: (C_in, C_out/g, kh, kw), which is the
    # OIHW shape of the convolution it inverts, so the same transpose serves both.
    w_shape = (c, o // g) if transposed else (o, c // g)
    x = random_array(rng, x_batch + (N, c, H, W), dtype)
    w = random_array(rng, w_batch + w_shape + case["kernel"], dtype)
    b = random_array(rng, b_batch + (o,), dtype)
    return on(backend, to_layout(x, layout, "act"), to_layout(w, layout, "weight"), b)


def ours_conv(case, layout):
    return partial(
        jaxconv.conv2d,
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        groups=case["groups"],
        layout=layout,
    )


def ref_conv(case, layout):
    return partial(
        ref_conv2d,
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        groups=case["groups"],
        layout=layout,
    )


def ours_convt(case, layout):
    return partial(
        jaxconv.conv_transpose2d,
        stride=case["stride"],
        padding=case["padding"],
        output_padding=case["output_padding"],
        dilation=case["dilation"],
        groups=case["groups"],
        layout=layout,
    )


def ref_convt(case, layout):
    return partial(
        ref_conv_transpose2d,
        stride=case["stride"],
        padding=case["padding"],
        output_padding=case["output_padding"],
        dilation=case["dilation"],
        groups=case["groups"],
        layout=layout,
    )


def mapped_at(a, axis):
    """A batch built at axis 0 moved to where in_axes says it lives."""
    return a if axis is None else jnp.moveaxis(a, 0, axis)


# ----------------------------------------------------------------------------------------------
# vmap over the input alone: the mapped axes fold into N.


@pytest.mark.parametrize("axes, layout", alternating_layouts([(0, 0), (2, 1), (-1, -1), (4, 3)]))
def test_vmap_input_conv2d_is_one_launch(backend, axes, layout):
    in_axis, out_axis = axes
    case = CONV_CASES["grouped_anisotropic"]
    x, w, b = conv_operands(backend, case, layout, x_batch=(B,))
    x = mapped_at(x, in_axis)

    def vmapped(conv):
        return jax.vmap(lambda x: conv(x, w, b), in_axes=in_axis, out_axes=out_axis)

    got = run_checking_launches(vmapped(ours_conv(case, layout)), (x,), {"conv2d_fwd": 1})
    assert_close(got, jax.jit(vmapped(ref_conv(case, layout)))(x))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nested_vmap_input_conv_transpose2d_is_one_launch(backend, layout):
    # Two vmaps with different in_axes and out_axes: both fold into one batch.
    x, w, b = conv_operands(backend, CONVT_CASE, layout, x_batch=(B, 2), transposed=True)
    x = jnp.moveaxis(x, 1, 3)  # inner mapped axis in the middle of the example

    def nested(conv):
        inner = jax.vmap(lambda x: conv(x, w, b), in_axes=2, out_axes=-1)
        return jax.vmap(inner, in_axes=0, out_axes=1)

    got = run_checking_launches(
        nested(ours_convt(CONVT_CASE, layout)), (x,), {"conv2d_bwd_data": 1}
    )
    assert_close(got, jax.jit(nested(ref_convt(CONVT_CASE, layout)))(x))


# ----------------------------------------------------------------------------------------------
# vmap over weights (per-example / per-model weights): the grouped-conv trick, still one launch.

# (x, w, b) in_axes; the batch is built at axis 0 and moved there.
WEIGHT_AXES = [(None, 0, None), (0, 0, 0), (0, 3, None), (None, None, 0), (2, 0, 0)]


@pytest.mark.parametrize("axes, layout", alternating_layouts(WEIGHT_AXES))
@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2d"])
def test_vmap_over_weights_is_one_launch(backend, op, layout, axes):
    case = CONV_CASES["grouped_anisotropic"] if op == "conv2d" else CONVT_CASE
    ours, ref = (
        (ours_conv(case, layout), ref_conv(case, layout))
        if op == "conv2d"
        else (ours_convt(case, layout), ref_convt(case, layout))
    )
    batches = [(B,) if a is not None else () for a in axes]
    args = conv_operands(
        backend,
        case,
        layout,
        x_batch=batches[0],
        w_batch=batches[1],
        b_batch=batches[2],
        transposed=op == "conv_transpose2d",
    )
    args = tuple(mapped_at(a, ax) for a, ax in zip(args, axes))
    target = "conv2d_fwd" if op == "conv2d" else "conv2d_bwd_data"
    got = run_checking_launches(jax.vmap(ours, in_axes=axes), args, {target: 1})
    assert_close(got, jax.jit(jax.vmap(ref, in_axes=axes))(*args))


def _loss(conv, cot):
    """A scalar loss with non-zero second derivatives."""
    return lambda w, b, x: jnp.sum(jnp.tanh(conv(x, w, b)) * cot)


@pytest.mark.parametrize("op, layout", alternating_layouts(["conv2d", "conv_transpose2d"]))
@pytest.mark.parametrize(
    "axes",
    [(0, 0, None), (0, 0, 0), (None, None, 0)],
    ids=["models_share_x", "models_own_x", "per_example_grads"],
)
def test_vmap_of_grad(backend, op, layout, axes):
    """vmap(grad(loss)) over a batch of models (x shared or not), and per-example gradients of
    one model: every kernel launched once, values equal lax's."""
    case = CONV_CASES["grouped_anisotropic"] if op == "conv2d" else CONVT_CASE
    ours, ref = (
        (ours_conv(case, layout), ref_conv(case, layout))
        if op == "conv2d"
        else (ours_convt(case, layout), ref_convt(case, layout))
    )
    batches = [(B,) if a is not None else () for a in axes]
    x, w, b = conv_operands(
        backend,
        case,
        layout,
        x_batch=batches[2],
        w_batch=batches[0],
        b_batch=batches[1],
        transposed=op == "conv_transpose2d",
    )
    out_shape = jax.eval_shape(ours, x[0] if batches[2] else x, w[0] if batches[0] else w, None)
    cot = on(backend, random_array(np.random.default_rng(5), out_shape.shape, jnp.float64))

    def batched_grads(conv):
        return jax.vmap(jax.grad(_loss(conv, cot), argnums=(0, 1, 2)), in_axes=axes)

    fwd, bwd = (
        ("conv2d_fwd", "conv2d_bwd_data") if op == "conv2d" else ("conv2d_bwd_data", "conv2d_fwd")
    )
    got = run_checking_launches(
        batched_grads(ours), (w, b, x), {fwd: 1, bwd: 1, "conv2d_bwd_filter": 1}
    )
    want = jax.jit(batched_grads(ref))(w, b, x)
    for g, r in zip(got, want):
        assert_close(g, r)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grad_of_vmap(backend, layout):
    """grad through a vmap over models (w, b mapped) and over data (x mapped, axis 1)."""
    case = CONV_CASES["plain"]
    x, w, b = conv_operands(backend, case, layout, x_batch=(B,), w_batch=(B,), b_batch=(B,))
    x = jnp.moveaxis(x, 0, 1)

    def total(conv):
        def f(w, b, x):
            y = jax.vmap(conv, in_axes=(1, 0, 0))(x, w, b)
            return jnp.sum(jnp.sin(y))

        return jax.grad(f, argnums=(0, 1, 2))

    got = run_checking_launches(
        total(ours_conv(case, layout)),
        (w, b, x),
        {"conv2d_fwd": 1, "conv2d_bwd_data": 1, "conv2d_bwd_filter": 1},
    )
    for g, r in zip(got, jax.jit(total(ref_conv(case, layout)))(w, b, x)):
        assert_close(g, r)


# ----------------------------------------------------------------------------------------------
# Pooling under vmap: values and indices, their gradients, and unpooling.


def distinct_values(shape, seed):
    """A scaled random permutation: no ties, so every argmax (and gradient route) is unique."""
    perm = np.random.default_rng(seed).permutation(int(np.prod(shape)))
    return jnp.asarray(perm.reshape(shape) / perm.size, jnp.float64)


POOL = dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), ceil_mode=True)
POOL_REF = dict(
    kernel=(3, 2), stride=(2, 1), padding=((1, 1), (0, 0)), dilation=(1, 2), ceil_mode=True
)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nested_vmap_max_pool2d_with_indices(backend, layout):
    # Built as (B, 2, example...), the inner mapped axis then moved into the example.
    x0 = to_layout(distinct_values((B, 2, N, 3, 8, 8), 1), layout, "act")
    x = on(backend, jnp.moveaxis(x0, 1, 3))
    pool = partial(jaxconv.max_pool2d, **POOL, return_indices=True, layout=layout)
    nested = jax.vmap(jax.vmap(pool, in_axes=2, out_axes=(0, 1)), in_axes=0, out_axes=(1, 0))
    y, idx = run_checking_launches(nested, (x,), {"max_pool2d_fwd": 1})
    # y comes out as (2, B, example...) and idx as (B, N, 2, ...); the NumPy reference runs
    # on all B*2 examples stacked into N.
    want_y, want_idx = ref_max_pool2d(x0.reshape((-1,) + x0.shape[3:]), **POOL_REF, layout=layout)
    got_y = np.swapaxes(np.asarray(y), 0, 1).reshape(want_y.shape)
    got_idx = np.moveaxis(np.asarray(idx), 2, 1).reshape(want_idx.shape)
    np.testing.assert_array_equal(got_y, want_y)
    np.testing.assert_array_equal(got_idx, want_idx)
    assert idx.dtype == jnp.int32


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap_of_grad_and_grad_of_vmap_max_pool2d(backend, layout):
    x = on(backend, to_layout(distinct_values((B, N, 3, 7, 8), 2), layout, "act"))
    # lax has no ceil_mode, and no VJP for a dilated max window.
    keywords = dict(POOL, ceil_mode=False, dilation=1)
    pool_ours = partial(jaxconv.max_pool2d, **keywords, layout=layout)
    pool_ref = partial(
        ref_max_pool2d_lax,
        kernel=POOL_REF["kernel"],
        stride=POOL_REF["stride"],
        padding=POOL_REF["padding"],
        layout=layout,
    )
    loss = lambda pool: lambda x: jnp.sum(jnp.cos(pool(x)))
    vmap_of_grad = lambda pool: jax.vmap(jax.grad(loss(pool)))
    grad_of_vmap = lambda pool: jax.grad(lambda x: jnp.sum(jax.vmap(loss(pool))(x)))
    for transform in (vmap_of_grad, grad_of_vmap):
        got = run_checking_launches(
            transform(pool_ours), (x,), {"max_pool2d_fwd": 1, "max_pool2d_bwd": 1}
        )
        assert_close(got, jax.jit(transform(pool_ref))(x))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap_max_unpool2d_roundtrip(backend, layout):
    """vmap(pool -> unpool) equals the same calls example by example, and is not a loop."""
    x = on(backend, to_layout(distinct_values((B, N, 2, 6, 7), 3), layout, "act"))
    x = jnp.moveaxis(x, 0, 2)

    def roundtrip(x):
        y, idx = jaxconv.max_pool2d(x, 2, return_indices=True, layout=layout)
        return jaxconv.max_unpool2d(y, idx, 2, output_size=x.shape, layout=layout)

    got = run_checking_launches(
        jax.vmap(roundtrip, in_axes=2, out_axes=2), (x,), {"max_pool2d_fwd": 1}
    )
    one = jax.jit(roundtrip)
    want = jnp.stack([one(x[:, :, i]) for i in range(B)], axis=2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The kept maxima are the input's values at those positions, the rest is zero.
    kept = np.asarray(got) != 0
    np.testing.assert_array_equal(np.asarray(got)[kept], np.asarray(x)[kept])


# ----------------------------------------------------------------------------------------------
# Second order: check_grads (order 2, reverse) for every op and parameter mix, through vmap
# too, and Hessian-vector products against lax.

TINY_CONV = dict(
    c=2, o=2, kernel=(2, 3), stride=(2, 1), padding=((1, 0), (2, 1)), dilation=(1, 2), groups=2
)
TINY_CONVT = dict(
    c=2,
    o=2,
    kernel=(3, 2),
    stride=(2, 1),
    padding=((1, 0), (0, 1)),
    output_padding=(1, 0),
    dilation=(1, 2),
    groups=2,
)


def tiny_operands(backend, case, layout, transposed, x_batch=(), w_batch=(), b_batch=()):
    rng = np.random.default_rng(7)
    c, o, g = case["c"], case["o"], case["groups"]
    w_shape = (c, o // g) if transposed else (o, c // g)
    x = random_array(rng, x_batch + (1, c, 4, 5), jnp.float64)
    w = random_array(rng, w_batch + w_shape + case["kernel"], jnp.float64)
    b = random_array(rng, b_batch + (o,), jnp.float64)
    return on(backend, to_layout(x, layout, "act"), to_layout(w, layout, "weight"), b)


@pytest.mark.parametrize(
    "op, layout, bias",
    [
        ("conv2d", "NCHW", True),
        ("conv2d", "NHWC", False),
        ("conv_transpose2d", "NHWC", True),
        ("conv_transpose2d", "NCHW", False),
    ],
)
def test_check_grads_order2_every_parameter_mix(backend, op, layout, bias):
    transposed = op == "conv_transpose2d"
    case = TINY_CONVT if transposed else TINY_CONV
    fn = ours_convt(case, layout) if transposed else ours_conv(case, layout)
    x, w, b = tiny_operands(backend, case, layout, transposed)
    if bias:
        check_grads(jax.jit(fn), (x, w, b), order=2, modes=("rev",))
    else:
        check_grads(jax.jit(lambda x, w: fn(x, w)), (x, w), order=2, modes=("rev",))


@pytest.mark.parametrize(
    "op, axes",
    [("conv2d", (0, None, None)), ("conv2d", (None, 0, None)), ("conv_transpose2d", (0, 0, 0))],
    ids=str,
)
def test_check_grads_order2_through_vmap(backend, op, axes):
    transposed = op == "conv_transpose2d"
    case = TINY_CONVT if transposed else TINY_CONV
    layout = "NHWC" if transposed else "NCHW"
    fn = ours_convt(case, layout) if transposed else ours_conv(case, layout)
    batches = [(2,) if a is not None else () for a in axes]
    args = tiny_operands(backend, case, layout, transposed, *batches)
    check_grads(jax.jit(jax.vmap(fn, in_axes=axes)), args, order=2, modes=("rev",))


@pytest.mark.parametrize("layout", ["NHWC"])
def test_check_grads_order2_max_pool2d_through_vmap(backend, layout):
    x = on(backend, to_layout(distinct_values((2, 1, 2, 5, 6), 4) * 10, layout, "act"))
    pool = partial(jaxconv.max_pool2d, **POOL, layout=layout)
    check_grads(jax.jit(jax.vmap(pool)), (x,), order=2, modes=("rev",))


def _small_net(conv, convt, pool, layout):
    """conv -> tanh -> max-pool -> transposed conv -> scalar: every kernel and its VJPs."""

    def loss(params, x):
        w1, b1, w2 = params
        h = jnp.tanh(conv(x, w1, b1, padding=1, layout=layout))
        h = pool(h, kernel_size=2, layout=layout)
        return jnp.sum(jnp.sin(convt(h, w2, stride=2, layout=layout)))

    return loss


def _lax_pool(x, kernel_size, layout):
    return ref_max_pool2d_lax(
        x, (kernel_size,) * 2, (kernel_size,) * 2, ((0, 0), (0, 0)), layout=layout
    )


def _ref_conv_kw(x, w, b=None, *, stride=1, padding=0, layout):
    return ref_conv2d(x, w, b, stride=(stride,) * 2, padding=((padding,) * 2,) * 2, layout=layout)


def _ref_convt_kw(x, w, *, stride, layout):
    return ref_conv_transpose2d(x, w, stride=(stride,) * 2, layout=layout)


def hvp(loss, params, x, v):
    """Reverse-over-reverse Hessian-vector product: the gradient of <grad loss, v>
    (forward-over-reverse is unavailable for custom_vjp functions, see the README)."""

    def directional(p):
        return sum(jnp.vdot(g, t) for g, t in zip(jax.grad(loss)(p, x), v))

    return jax.grad(directional)(params)


def net_params(backend, layout, rng):
    x = random_array(rng, (2, 2, 6, 6), jnp.float64)
    w1 = random_array(rng, (3, 2, 3, 3), jnp.float64)
    b1 = random_array(rng, (3,), jnp.float64)
    w2 = random_array(rng, (3, 2, 2, 2), jnp.float64)
    return on(backend, to_layout(x, layout, "act")), (
        on(backend, to_layout(w1, layout, "weight")),
        on(backend, b1),
        on(backend, to_layout(w2, layout, "weight")),
    )


@pytest.mark.parametrize("layout", ["NHWC"])  # NCHW: the vmapped HVP below
def test_hessian_vector_product_matches_lax(backend, layout):
    rng = np.random.default_rng(9)
    x, params = net_params(backend, layout, rng)
    v = tuple(on(backend, random_array(rng, p.shape, p.dtype)) for p in params)
    ours = _small_net(jaxconv.conv2d, jaxconv.conv_transpose2d, jaxconv.max_pool2d, layout)
    ref = _small_net(_ref_conv_kw, _ref_convt_kw, _lax_pool, layout)
    got = jax.jit(partial(hvp, ours))(params, x, v)
    # lax admits forward mode, so its side is the textbook forward-over-reverse HVP.
    want = jax.jit(lambda p, x, v: jax.jvp(lambda p: jax.grad(ref)(p, x), (p,), (v,))[1])(
        params, x, v
    )
    for g, r in zip(got, want):
        assert_close(g, r)


def test_hessian_vector_product_through_vmap(backend):
    """Per-model HVPs of a batch of models: vmap over the params and directions."""
    rng = np.random.default_rng(10)
    layout = "NCHW"
    x, params = net_params(backend, layout, rng)
    params = tuple(jnp.stack([p, 2 * p, -p]) for p in params)
    v = tuple(on(backend, random_array(rng, p.shape, p.dtype)) for p in params)
    ours = _small_net(jaxconv.conv2d, jaxconv.conv_transpose2d, jaxconv.max_pool2d, layout)
    ref = _small_net(_ref_conv_kw, _ref_convt_kw, _lax_pool, layout)
    batched = jax.vmap(partial(hvp, ours), in_axes=(0, None, 0))
    launches = kernel_launches(compiled_hlo(batched, params, x, v))
    got = jax.jit(batched)(params, x, v)
    want = jax.jit(
        jax.vmap(
            lambda p, x, v: jax.jvp(lambda p: jax.grad(ref)(p, x), (p,), (v,))[1],
            in_axes=(0, None, 0),
        )
    )(params, x, v)
    for g, r in zip(got, want):
        assert_close(g, r)
    assert launches and not has_loop(compiled_hlo(batched, params, x, v))


def test_reverse_over_reverse_hessian_matches_lax(backend):
    """jax.hessian is forward-over-reverse and fails (README); jacrev(jacrev) is the way."""
    x = on(backend, random_array(np.random.default_rng(11), (1, 1, 3, 3), jnp.float64))
    w = on(backend, random_array(np.random.default_rng(12), (1, 1, 2, 2), jnp.float64))
    loss = lambda conv: lambda w: jnp.sum(jnp.tanh(conv(x, w)) ** 2)
    got = jax.jit(jax.jacrev(jax.jacrev(loss(jaxconv.conv2d))))(w)
    want = jax.jit(jax.hessian(loss(partial(ref_conv2d, stride=(1, 1)))))(w)
    assert_close(got, want)
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.hessian(loss(jaxconv.conv2d))(w)


@pytest.mark.parametrize(
    "transform",
    [
        lambda f, *a: jax.jvp(f, a, a),
        lambda f, *a: jax.jacfwd(f)(*a),
        lambda f, *a: jax.linearize(f, *a)[1](*a),
    ],
    ids=["jvp", "jacfwd", "linearize"],
)
@pytest.mark.cpu_only("refused while tracing: no kernel runs")
def test_forward_mode_is_refused_with_the_documented_error(backend, transform):
    """The README quotes this error; custom_vjp functions have no forward-mode rule."""
    x, w = jnp.ones((1, 1, 4, 4)), jnp.ones((1, 1, 3, 3))
    for fn in (lambda x: jaxconv.conv2d(x, w), lambda x: jaxconv.max_pool2d(x, 2)):
        with pytest.raises(TypeError) as info:
            transform(fn, x)
        assert str(info.value).startswith(
            "can't apply forward-mode autodiff (jvp) to a custom_vjp function."
        )


# ----------------------------------------------------------------------------------------------
# remat and scan over layers.


def _stacked_layers(backend, layout, depth=3):
    rng = np.random.default_rng(13)
    x = random_array(rng, (2, 3, 6, 6), jnp.float64)
    ws = random_array(rng, (depth, 3, 3, 3, 3), jnp.float64) * 0.5
    bs = random_array(rng, (depth, 3), jnp.float64)
    return on(backend, to_layout(x, layout, "act"), to_layout(ws, layout, "weight"), bs)


def _scanned_net(conv, layout, remat):
    """A stack of same-shape conv layers run by lax.scan, each layer optionally rematerialized."""

    def layer(h, wb):
        w, b = wb
        return jnp.tanh(conv(h, w, b, padding=((1, 1), (1, 1)), layout=layout)), None

    if remat:
        layer = jax.checkpoint(layer)

    def loss(ws, bs, x):
        h, _ = jax.lax.scan(layer, x, (ws, bs))
        return jnp.sum(jnp.sin(h))

    return loss


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan_remat"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scan_over_layers_with_and_without_remat(backend, layout, remat):
    x, ws, bs = _stacked_layers(backend, layout)
    ref_kw = lambda x, w, b, padding, layout: ref_conv2d(x, w, b, padding=padding, layout=layout)
    grads = lambda conv: jax.grad(_scanned_net(conv, layout, remat), argnums=(0, 1, 2))
    got = jax.jit(grads(jaxconv.conv2d))(ws, bs, x)
    want = jax.jit(grads(ref_kw))(ws, bs, x)
    for g, r in zip(got, want):
        assert_close(g, r)


@pytest.mark.parametrize("policy", ["nothing_saveable", "everything_saveable"])
def test_checkpoint_gradients_match_lax(backend, policy):
    """jax.checkpoint around a whole network (recompute everything, or save everything):
    gradients equal lax's. (Whether XLA then merges the recomputed kernel calls with the
    forward ones is its own decision, so the HLO is not asserted here.)"""
    rng = np.random.default_rng(14)
    layout = "NCHW"
    x, params = net_params(backend, layout, rng)
    remat = partial(jax.checkpoint, policy=getattr(jax.checkpoint_policies, policy))
    ours = remat(_small_net(jaxconv.conv2d, jaxconv.conv_transpose2d, jaxconv.max_pool2d, layout))
    ref = _small_net(_ref_conv_kw, _ref_convt_kw, _lax_pool, layout)
    for g, r in zip(jax.jit(jax.grad(ours))(params, x), jax.jit(jax.grad(ref))(params, x)):
        assert_close(g, r)
