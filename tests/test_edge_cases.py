"""Odd but valid inputs get the right answer: empty batches, 1x1 images, kernels that cover the
whole padded input, huge strides, inputs produced by transposes/slices/broadcasts inside jit,
NaN and +/-inf, and half-precision sums that only survive with float32 accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconv import conv2d, conv_transpose2d, max_pool2d

from reference import (
    assert_close,
    on,
    random_array,
    ref_conv2d,
    ref_conv_transpose2d,
    ref_max_pool2d,
    tol,
)

LAYOUTS = ["NCHW", "NHWC"]


def to_layout(x_nchw, layout):
    """An NCHW activation (or an OIHW weight) as the layout wants it."""
    if layout == "NCHW":
        return x_nchw
    return jnp.transpose(x_nchw, (0, 2, 3, 1))


def w_to_layout(w_oihw, layout):
    return w_oihw if layout == "NCHW" else jnp.transpose(w_oihw, (2, 3, 1, 0))


def alternating_layouts(cases):
    """(name, layout) pairs, the layouts alternating over the sorted cases: every case runs once
    and both layouts are covered, at half the compile time of the full cross product."""
    return [
        pytest.param(n, LAYOUTS[i % 2], id=f"{n}-{LAYOUTS[i % 2]}")
        for i, n in enumerate(sorted(cases))
    ]


def pads(p):
    return ((p, p), (p, p)) if isinstance(p, int) else p


# ---------------------------------------------------------------------------------------------
# Zero-size batch: empty results of the right shape, no kernel in the compiled program, and
# gradients that are empty (dx) or zero (dw, dbias: sums over nothing).


def _custom_calls(fn, *args):
    hlo = jax.jit(fn).lower(*args).as_text()
    return [
        t
        for t in (
            "jaxconv_conv2d_fwd",
            "jaxconv_conv2d_bwd_data",
            "jaxconv_conv2d_bwd_filter",
            "jaxconv_max_pool2d_fwd",
            "jaxconv_max_pool2d_fwd_values",
            "jaxconv_max_pool2d_bwd",
        )
        if t in hlo
    ]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch_conv(backend, layout):
    rng = np.random.default_rng(0)
    w = w_to_layout(random_array(rng, (6, 4, 3, 3), jnp.float32), layout)
    b = random_array(rng, (6,), jnp.float32)

    def loss(x, w, b):
        return jnp.sum(conv2d(x, w, b, stride=2, padding=1, layout=layout) ** 2)

    for n, want_calls in (
        (0, []),
        (1, ["jaxconv_conv2d_fwd", "jaxconv_conv2d_bwd_data", "jaxconv_conv2d_bwd_filter"]),
    ):
        x = on(backend, to_layout(jnp.ones((n, 4, 7, 7), jnp.float32), layout))
        grad = jax.grad(loss, argnums=(0, 1, 2))
        # The non-empty batch shows that the check can see a kernel launch when there is one.
        assert _custom_calls(grad, x, w, b) == want_calls
    y = conv2d(x[:0], w, b, stride=2, padding=1, layout=layout)
    assert y.shape == to_layout(jnp.zeros((0, 6, 4, 4)), layout).shape
    assert _custom_calls(lambda x: conv2d(x, w, layout=layout), x[:0]) == []
    dx, dw, db = jax.grad(loss, argnums=(0, 1, 2))(x[:0], w, b)
    assert dx.shape == x[:0].shape and dx.dtype == jnp.float32
    np.testing.assert_array_equal(dw, np.zeros(w.shape))
    np.testing.assert_array_equal(db, np.zeros(b.shape))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch_conv_transpose_and_pool(backend, layout):
    x = on(backend, to_layout(jnp.ones((0, 4, 5, 5), jnp.float32), layout))
    wt = w_to_layout(jnp.ones((4, 3, 3, 3), jnp.float32), layout)

    def f(x, w):
        y = conv_transpose2d(x, w, stride=2, padding=1, output_padding=1, layout=layout)
        p, idx = max_pool2d(y, 3, stride=2, padding=1, return_indices=True, layout=layout)
        return jnp.sum(p), (y, p, idx)

    assert _custom_calls(jax.grad(f, argnums=(0, 1), has_aux=True), x, wt) == []
    (dx, dw), (y, p, idx) = jax.grad(f, argnums=(0, 1), has_aux=True)(x, wt)
    assert y.shape == to_layout(jnp.zeros((0, 3, 10, 10)), layout).shape
    assert p.shape == idx.shape == to_layout(jnp.zeros((0, 3, 5, 5)), layout).shape
    assert idx.dtype == jnp.int32
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dw, np.zeros(wt.shape))
    # Without a gradient the values-only forward is skipped the same way.
    values_only = lambda x: max_pool2d(x, 3, stride=2, padding=1, layout=layout)
    assert _custom_calls(values_only, x) == []
    assert jax.jit(values_only)(x).shape == to_layout(jnp.zeros((0, 4, 3, 3)), layout).shape


def test_zero_output_channels(backend):
    """O = 0 (and so C_out = 0 for the transposed conv's input side) is empty, not an error."""
    x, w = on(backend, jnp.ones((2, 4, 5, 5), jnp.float32), jnp.ones((0, 4, 3, 3), jnp.float32))
    assert _custom_calls(lambda x, w: conv2d(x, w), x, w) == []
    assert conv2d(x, w).shape == (2, 0, 3, 3)
    dx = jax.grad(lambda x: jnp.sum(conv2d(x, w)))(x)
    np.testing.assert_array_equal(dx, np.zeros(x.shape))


# ---------------------------------------------------------------------------------------------
# Tiny images, kernels as big as the padded input, huge strides: values and gradients against
# the oracles. Each case: (x NCHW shape, w OIHW shape, conv2d keyword arguments).

CONV_CASES = {
    "1x1_image_1x1_kernel": ((2, 3, 1, 1), (4, 3, 1, 1), {}),
    "1x1_image_3x3_kernel_padded": ((2, 3, 1, 1), (4, 3, 3, 3), dict(padding=1)),
    "1x1_image_same_strided": ((1, 2, 1, 1), (3, 2, 4, 4), dict(padding="SAME", stride=3)),
    "kernel_equals_padded_input": ((2, 3, 4, 5), (2, 3, 6, 7), dict(padding=1)),
    "dilated_kernel_equals_input": ((1, 2, 5, 7), (3, 2, 3, 4), dict(dilation=2)),
    "kernel_equals_input_asymmetric_pad": (
        (1, 2, 3, 3),
        (2, 2, 5, 4),
        dict(padding=((2, 0), (0, 1))),
    ),
    "huge_stride": ((2, 3, 5, 6), (4, 3, 2, 2), dict(stride=1000)),
    "huge_stride_anisotropic": ((2, 2, 9, 4), (2, 2, 3, 1), dict(stride=(1000, 1), padding=2)),
    "huge_stride_grouped": ((1, 4, 6, 6), (4, 2, 3, 3), dict(stride=(7, 100), groups=2)),
}


@pytest.mark.parametrize("name, layout", alternating_layouts(CONV_CASES))
def test_conv_shape_corners(backend, name, layout):
    xs, ws, kw = CONV_CASES[name]
    rng = np.random.default_rng(1)
    x = on(backend, to_layout(random_array(rng, xs, jnp.float64), layout))
    w = w_to_layout(random_array(rng, ws, jnp.float64), layout)
    b = random_array(rng, (ws[0],), jnp.float64)
    ref_kw = dict(stride=kw.get("stride", 1), dilation=kw.get("dilation", 1))
    ref_kw = {k: (v, v) if isinstance(v, int) else v for k, v in ref_kw.items()}
    padding = kw.get("padding", 0)
    ref_kw["padding"] = padding if isinstance(padding, str) else pads(padding)
    ref_kw["groups"] = kw.get("groups", 1)

    ours = lambda x, w, b: conv2d(x, w, b, layout=layout, **kw)
    ref = lambda x, w, b: ref_conv2d(x, w, b, layout=layout, **ref_kw)
    assert_same_values_and_vjp(ours, ref, (x, w, b), rng)


def assert_same_values_and_vjp(ours, ref, args, rng):
    """Outputs and VJPs (a random cotangent) of ours and of the oracle, in one jit each (one
    compilation instead of one per eager op keeps these many small cases fast)."""
    y = jax.eval_shape(ours, *args)
    g = random_array(rng, y.shape, y.dtype)

    @jax.jit
    def both(args, g):
        (y, vjp), (y_ref, vjp_ref) = jax.vjp(ours, *args), jax.vjp(ref, *args)
        return (y, vjp(g)), (y_ref, vjp_ref(g))

    (y, grads), (y_ref, grads_ref) = both(args, g)
    assert_close(y, y_ref)
    for got, want in zip(grads, grads_ref):
        assert_close(got, want)


TRANSPOSE_CASES = {
    "1x1_input": ((2, 3, 1, 1), (3, 2, 3, 3), dict(stride=2)),
    "1x1_input_padding_crops_to_1x1": ((1, 2, 1, 1), (2, 3, 3, 3), dict(padding=1)),
    "huge_stride": ((1, 2, 2, 3), (2, 2, 2, 2), dict(stride=(300, 1))),
    "huge_stride_output_padding": ((1, 2, 2, 2), (2, 1, 1, 1), dict(stride=50, output_padding=49)),
}


@pytest.mark.parametrize("name, layout", alternating_layouts(TRANSPOSE_CASES))
def test_conv_transpose_shape_corners(backend, name, layout):
    xs, ws, kw = TRANSPOSE_CASES[name]
    rng = np.random.default_rng(2)
    x = on(backend, to_layout(random_array(rng, xs, jnp.float64), layout))
    w = w_to_layout(random_array(rng, ws, jnp.float64), layout)
    two = lambda v: (v, v) if isinstance(v, int) else v
    ref_kw = dict(
        stride=two(kw.get("stride", 1)),
        padding=pads(kw.get("padding", 0)),
        output_padding=two(kw.get("output_padding", 0)),
    )
    assert_same_values_and_vjp(
        lambda x, w: conv_transpose2d(x, w, layout=layout, **kw),
        lambda x, w: ref_conv_transpose2d(x, w, layout=layout, **ref_kw),
        (x, w),
        rng,
    )


POOL_CASES = {  # (x NCHW shape, max_pool2d keyword arguments)
    "1x1_image": ((2, 3, 1, 1), dict(kernel_size=1)),
    "1x1_image_padded_window": ((2, 3, 1, 1), dict(kernel_size=2, stride=1, padding=1)),
    "1x1_image_ceil_mode": ((1, 2, 1, 1), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    "kernel_equals_input": ((2, 3, 4, 5), dict(kernel_size=(4, 5))),
    "kernel_equals_padded_input": ((1, 2, 3, 3), dict(kernel_size=5, padding=2)),
    "huge_stride": ((2, 2, 5, 6), dict(kernel_size=2, stride=1000)),
    "huge_stride_ceil_mode": ((1, 2, 5, 6), dict(kernel_size=2, stride=(1000, 4), ceil_mode=True)),
    # Taps at -2 and +2 of a 1x1 image: no tap inside, the value is -inf and the index -1.
    "window_of_only_padding": ((1, 2, 1, 1), dict(kernel_size=2, stride=1, dilation=4, padding=2)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(POOL_CASES))
def test_pool_shape_corners(backend, name, layout):
    xs, kw = POOL_CASES[name]
    rng = np.random.default_rng(3)
    x = on(backend, to_layout(random_array(rng, xs, jnp.float32), layout))
    two = lambda v: (v, v) if isinstance(v, int) else v
    kernel = two(kw["kernel_size"])
    vals, idx = ref_max_pool2d(
        x,
        kernel,
        two(kw.get("stride", kernel)),
        pads(kw.get("padding", 0)),
        two(kw.get("dilation", 1)),
        kw.get("ceil_mode", False),
        layout,
    )
    y, i = max_pool2d(x, return_indices=True, layout=layout, **kw)
    np.testing.assert_array_equal(np.asarray(i), idx)
    np.testing.assert_array_equal(np.asarray(y, np.float64), vals)
    # The gradient reaches exactly the selected cells (none for an index of -1).
    g = random_array(rng, y.shape, jnp.float32)
    dx = jax.grad(lambda x: jnp.sum(max_pool2d(x, layout=layout, **kw) * g))(x)
    # Overlapping windows sum cotangents in float32 (the oracle in float64): a sum's tolerance.
    np.testing.assert_allclose(
        np.asarray(dx, np.float64), pool_grad_oracle(g, idx, x.shape, layout), *tol(jnp.float32)
    )


# ---------------------------------------------------------------------------------------------
# Inputs produced by earlier ops inside jit: transposes, strided slices, flips, broadcasts.
# XLA hands the custom call dense row-major buffers whatever the producer was.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_transposed_and_strided_producers_inside_jit(backend, dtype):
    rng = np.random.default_rng(4)
    x_big = on(backend, random_array(rng, (2, 11, 9, 3), dtype))  # NHWC, to be permuted
    w_hwoi = random_array(rng, (3, 3, 5, 3), dtype)  # to be permuted to OIHW

    def producers(x_big, w_hwoi):
        x = jnp.transpose(x_big, (0, 3, 2, 1))[:, :, ::2, 1:]  # NCHW (2, 3, 5, 10)
        x = jnp.flip(x, axis=3)
        w = jnp.transpose(w_hwoi, (2, 3, 0, 1))  # OIHW (5, 3, 3, 3)
        return x, w

    def ours(x_big, w_hwoi):
        x, w = producers(x_big, w_hwoi)
        y = conv2d(x, w, padding=1)
        # And the output, transposed to NHWC, feeds an NHWC pool.
        return max_pool2d(jnp.transpose(y, (0, 2, 3, 1)), 2, layout="NHWC")

    x, w = producers(x_big, w_hwoi)
    y_ref = ref_conv2d(x, w, padding=((1, 1), (1, 1)))
    want, _ = ref_max_pool2d(jnp.transpose(y_ref, (0, 2, 3, 1)), (2, 2), (2, 2), layout="NHWC")
    got = jax.jit(ours)(x_big, w_hwoi)
    # Pooling selects values, so the tolerance is the conv's.
    assert_close(got, jnp.asarray(want).astype(dtype))


def test_broadcast_input_inside_jit(backend):
    """A broadcast (stride-0 in NumPy terms) activation and weight."""
    rng = np.random.default_rng(5)
    row = on(backend, random_array(rng, (1, 1, 1, 7), jnp.float32))
    w_col = random_array(rng, (4, 1, 3, 1), jnp.float32)

    def make(row, w_col):
        return jnp.broadcast_to(row, (3, 2, 6, 7)), jnp.broadcast_to(w_col, (4, 2, 3, 3))

    got = jax.jit(lambda r, c: conv2d(*make(r, c), padding=(0, 1)))(row, w_col)
    assert_close(got, ref_conv2d(*make(row, w_col), padding=((0, 0), (1, 1))))


# ---------------------------------------------------------------------------------------------
# NaN and +/-inf. Convolution is IEEE arithmetic: inf * 0 is NaN, inf - inf is NaN, NaN
# spreads. Which of NaN / +inf / -inf / finite a cell is does not depend on the summation order,
# so it must match the oracle exactly; finite cells match within the usual tolerance.
#
# Non-finite activations give exactly lax's result. Non-finite weights leave one thing open:
# whether an inf weight is multiplied by the zeros of the padding. lax does (NaN); the GEMM
# kernels do too, the direct depthwise kernel and the stride phases of bwd_data skip those taps
# (as PyTorch's scatter-style transposed convolution does). So with non-finite weights each cell
# equals either lax's value or the sum of its in-bounds terms only.


def _classes(a):
    a = np.asarray(a, np.float64)
    return np.select([np.isnan(a), np.isposinf(a), np.isneginf(a)], [3, 1, 2], 0)


def _cellwise_same(got, want, dtype):
    """Per cell: same class, and within tolerance where finite."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    rtol, atol = tol(dtype)
    finite = (_classes(want) == 0) & (_classes(got) == 0)
    with np.errstate(invalid="ignore"):
        close = np.abs(got - want) <= atol + rtol * np.abs(want)
    return (_classes(got) == _classes(want)) & (~finite | close)


def assert_same_nonfinite(got, want, dtype):
    np.testing.assert_array_equal(_classes(got), _classes(want))
    finite = _classes(want) == 0
    assert_close(jnp.where(finite, got, 0), jnp.where(finite, want, 0).astype(got.dtype), dtype)


def assert_one_of(got, wants, dtype):
    """Every cell of got matches the same cell of at least one of wants."""
    ok = np.zeros(np.shape(got), bool)
    for want in wants:
        ok |= _cellwise_same(got, want, dtype)
    assert ok.all(), f"{(~ok).sum()} cells match none of the definitions"


def _poisoned(rng, shape, dtype):
    x = np.asarray(rng.standard_normal(shape))
    flat = x.reshape(-1)
    picks = rng.choice(flat.size, size=4, replace=False)
    flat[picks] = [np.nan, np.inf, -np.inf, np.inf]
    return jnp.asarray(x, dtype)


def _conv_by_contributions(x, w, padding, groups):
    """NCHW/OIHW stride-1 convolution in float64 that sums in-bounds terms only (padded cells
    are skipped, never multiplied)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh, ow = h + 2 * padding - kh + 1, wd + 2 * padding - kw + 1
    out = np.zeros((n, o, oh, ow))
    og = o // groups
    with np.errstate(invalid="ignore"):
        for i in range(oh):
            for j in range(ow):
                for a in range(kh):
                    for b in range(kw):
                        r, q = i - padding + a, j - padding + b
                        if not (0 <= r < h and 0 <= q < wd):
                            continue
                        for g in range(groups):
                            out[:, g * og : (g + 1) * og, i, j] += (
                                x[:, g * cg : (g + 1) * cg, r, q]
                                @ w[g * og : (g + 1) * og, :, a, b].T
                            )
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("where", ["x", "w"])
def test_conv_nonfinite(backend, layout, groups, where):
    rng = np.random.default_rng(6)
    x = random_array(rng, (2, 4, 6, 6), jnp.float32)
    w = random_array(rng, (4, 4 // groups, 3, 3), jnp.float32)
    if where == "x":
        x = _poisoned(rng, x.shape, jnp.float32)
    else:
        w = _poisoned(rng, w.shape, jnp.float32)
    xl, wl = on(backend, to_layout(x, layout)), w_to_layout(w, layout)
    for padding in (0, 1):
        got = conv2d(xl, wl, padding=padding, groups=groups, layout=layout)
        lax_def = ref_conv2d(xl, wl, padding=pads(padding), groups=groups, layout=layout)
        if where == "x" or padding == 0:
            assert_same_nonfinite(got, lax_def, jnp.float32)
        else:
            in_bounds = to_layout(
                jnp.asarray(_conv_by_contributions(x, w, padding, groups), jnp.float32), layout
            )
            assert_one_of(got, (lax_def, in_bounds), jnp.float32)


def _transpose_by_contributions(x, w, stride, padding):
    """PyTorch's ConvTranspose2d as a float64 scatter of x[i] * w[t] into out[i*s - p + t],
    NCHW, groups=1: only real contributions are summed. (lax's zero-inserted formulation would
    also multiply the inserted zeros by an inf weight and give NaN there.)"""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, c, h, wd = x.shape
    _, o, kh, kw = w.shape
    oh, ow = (h - 1) * stride - 2 * padding + kh, (wd - 1) * stride - 2 * padding + kw
    out = np.zeros((n, o, oh + 2 * padding, ow + 2 * padding))
    with np.errstate(invalid="ignore"):
        for i in range(h):
            for j in range(wd):
                out[:, :, i * stride : i * stride + kh, j * stride : j * stride + kw] += np.einsum(
                    "nc,cokl->nokl", x[:, :, i, j], w
                )
    return out[:, :, padding : padding + oh, padding : padding + ow]


@pytest.mark.parametrize("where", ["x", "w"])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv_transpose_nonfinite(backend, where, stride):
    """Non-finite x: the same as both definitions (PyTorch's sum of contributions and lax's
    zero-inserted convolution agree when the weights are finite). Non-finite w: the two differ
    (lax multiplies the zeros it inserts between strided inputs and the border padding), and
    each cell of ours is one or the other."""
    rng = np.random.default_rng(7)
    x = random_array(rng, (2, 3, 4, 4), jnp.float32)
    w = random_array(rng, (3, 2, 3, 3), jnp.float32)
    if where == "x":
        x = _poisoned(rng, x.shape, jnp.float32)
    else:
        w = _poisoned(rng, w.shape, jnp.float32)
    got = conv_transpose2d(on(backend, x), w, stride=stride, padding=1)
    contributions = jnp.asarray(_transpose_by_contributions(x, w, stride, 1), jnp.float32)
    lax_def = ref_conv_transpose2d(x, w, stride=(stride, stride), padding=((1, 1), (1, 1)))
    if where == "x":
        assert_same_nonfinite(got, contributions, jnp.float32)
        assert_same_nonfinite(got, lax_def, jnp.float32)
        return
    assert_one_of(got, (lax_def, contributions), jnp.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_pool_nonfinite(backend, layout, dtype):
    """NaN wins (first NaN in row-major window order, its index), +inf beats numbers, an all
    -inf window returns -inf at its first in-bounds cell (padding is never selected), and the
    gradient goes to the selected cell."""
    x = np.array(
        [
            [
                [
                    [np.nan, 1, -np.inf, -np.inf, 3],
                    [2, np.nan, -np.inf, -np.inf, np.inf],
                    [0, 5, 6, np.inf, np.inf],
                    [-np.inf, -np.inf, 7, np.nan, 1],
                    [-np.inf, -np.inf, 8, 9, np.nan],
                ]
            ]
        ]
    )
    x = np.concatenate([x, -x], axis=1)  # the second channel swaps +inf and -inf
    x = on(backend, to_layout(jnp.asarray(x, dtype), layout))
    for kw in (
        dict(kernel_size=2, stride=2),
        dict(kernel_size=3, stride=1, padding=1),
        dict(kernel_size=2, stride=2, padding=1, ceil_mode=True),
    ):
        two = lambda v: (v, v)
        vals, idx = ref_max_pool2d(
            x,
            two(kw["kernel_size"]),
            two(kw["stride"]),
            pads(kw.get("padding", 0)),
            (1, 1),
            kw.get("ceil_mode", False),
            layout,
        )
        y, i = max_pool2d(x, return_indices=True, layout=layout, **kw)
        np.testing.assert_array_equal(np.asarray(i), idx)
        np.testing.assert_array_equal(_classes(y), _classes(vals))
        np.testing.assert_array_equal(
            np.where(_classes(vals) == 0, np.asarray(y, np.float64), 0),
            np.where(_classes(vals) == 0, vals, 0),
        )
        assert (idx >= 0).all()  # every window has an in-bounds cell; padding never wins
        # Gradient: each output's cotangent lands on its selected cell.
        g = jnp.asarray(np.arange(1, y.size + 1).reshape(y.shape), dtype)
        dx = jax.grad(lambda x: jnp.sum(max_pool2d(x, layout=layout, **kw) * g))(x)
        np.testing.assert_allclose(
            np.asarray(dx, np.float64), pool_grad_oracle(g, idx, x.shape, layout), rtol=1e-3
        )


def pool_grad_oracle(g, idx, x_shape, layout):
    """The max-pool gradient from the oracle's indices: dx[n, c, idx[n, c, o]] += g[n, c, o],
    accumulated in float64 (an index of -1, an empty window, sends nothing)."""
    g, idx = np.asarray(g, np.float64), np.asarray(idx)
    if layout == "NHWC":
        g, idx = np.moveaxis(g, 3, 1), np.moveaxis(idx, 3, 1)
        n, h, w, c = x_shape
    else:
        n, c, h, w = x_shape
    dx = np.zeros((n, c, h * w))
    for ni in range(n):
        for ci in range(c):
            keep = idx[ni, ci].ravel() >= 0
            np.add.at(dx[ni, ci], idx[ni, ci].ravel()[keep], g[ni, ci].ravel()[keep])
    dx = dx.reshape(n, c, h, w)
    return np.moveaxis(dx, 1, 3) if layout == "NHWC" else dx


# ---------------------------------------------------------------------------------------------
# Half precision: accumulation is float32. Sums whose partial sums overflow float16 (max 65504)
# but whose total does not, and sums whose small terms vanish next to a large one in bfloat16's
# 8-bit significand, come out exact.


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float16_partial_sums_overflow_but_total_does_not(backend, layout):
    # Channels 60000, 60000, -60000, -59968 (all exact in float16) under a 1x1 all-ones kernel:
    # any order that adds the two +60000 first passes 120000 > 65504; the total is 32.
    c = np.array([60000, 60000, -60000, -59968], np.float64)
    x = np.broadcast_to(c[None, :, None, None], (2, 4, 3, 3)).copy()
    x[1] = -x[1]
    x = on(backend, to_layout(jnp.asarray(x, jnp.float16), layout))
    w = w_to_layout(jnp.ones((2, 4, 1, 1), jnp.float16), layout)
    b = jnp.asarray([0, 1000], jnp.float16)
    y = conv2d(x, w, b, layout=layout)
    want = np.zeros((2, 2, 3, 3))
    want[0], want[1] = 32, -32
    want[:, 1] += 1000
    np.testing.assert_array_equal(np.asarray(y, np.float64), to_layout(want, layout))
    assert_close(y, ref_conv2d(x, w, b, layout=layout))
    # bwd_filter sums x * dy over images and positions: with dy = 1 everywhere except one cell
    # of image 1, dw[o, ci] = 9 c - 8 c = c, through partial sums up to 9 * 60000.
    dy = np.ones((2, 2, 3, 3))
    dy[1, :, 0, 0] = 0
    dw = jax.vjp(lambda w: conv2d(x, w, layout=layout), w)[1](
        to_layout(jnp.asarray(dy, jnp.float16), layout)
    )[0]
    np.testing.assert_array_equal(
        np.asarray(dw, np.float64),
        w_to_layout(np.broadcast_to(c[None, :, None, None], (2, 4, 1, 1)), layout),
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bfloat16_small_terms_survive_float32_accumulation(backend, layout):
    # 512 + 1 + 1 + 1 + 1 - 512 = 4 exactly in float32; bfloat16 partial sums round 513 to 512.
    c = np.array([512, 1, 1, 1, 1, -512], np.float64)
    bf = lambda a: on(backend, jnp.asarray(a, jnp.bfloat16))
    # Over input channels (forward).
    x = bf(to_layout(np.broadcast_to(c[None, :, None, None], (1, 6, 4, 4)), layout))
    y = conv2d(x, bf(w_to_layout(np.ones((3, 6, 1, 1)), layout)), layout=layout)
    np.testing.assert_array_equal(np.asarray(y, np.float64), np.full(y.shape, 4.0))
    # Over a 3x3 window (forward, spatial reduction).
    plane = np.array([[512, 1, 1], [1, 1, 1], [1, 1, -512]], np.float64)[None, None]
    y = conv2d(
        bf(to_layout(plane, layout)), bf(w_to_layout(np.ones((1, 1, 3, 3)), layout)), layout=layout
    )
    np.testing.assert_array_equal(np.asarray(y, np.float64).ravel(), [7.0])
    # Over output channels (bwd_data): dx = sum_o w[o] * dy[o].
    wo = bf(w_to_layout(np.broadcast_to(c[:, None, None, None], (6, 1, 1, 1)), layout))
    x1 = bf(to_layout(np.ones((1, 1, 2, 2)), layout))
    dx = jax.vjp(lambda x: conv2d(x, wo, layout=layout), x1)[1](
        bf(to_layout(np.ones((1, 6, 2, 2)), layout))
    )[0]
    np.testing.assert_array_equal(np.asarray(dx, np.float64), np.full(dx.shape, 4.0))
    # Over positions (bwd_filter): dw = sum_pos x[pos] * dy[pos].
    xs = bf(to_layout(c.reshape(1, 1, 2, 3), layout))
    w1 = bf(w_to_layout(np.ones((1, 1, 1, 1)), layout))
    dw = jax.vjp(lambda w: conv2d(xs, w, layout=layout), w1)[1](
        bf(to_layout(np.ones((1, 1, 2, 3)), layout))
    )[0]
    np.testing.assert_array_equal(np.asarray(dw, np.float64).ravel(), [4.0])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_pool_backward_accumulates_in_float32(backend, dtype):
    """One cell is the maximum of all 9 overlapping 3x3 windows of a 5x5 plane; its gradient
    sums 9 cotangents whose partial sums leave the half type's range/precision."""
    x = np.zeros((1, 1, 5, 5))
    x[0, 0, 2, 2] = 1
    x = on(backend, jnp.asarray(x, dtype))
    big = 60000.0 if dtype == jnp.float16 else 512.0
    g = np.array([big, big, -big, -big, 1, 1, 1, 1, 1]).reshape(1, 1, 3, 3)
    dx = jax.grad(lambda x: jnp.sum(max_pool2d(x, 3, stride=1) * jnp.asarray(g, dtype)))(x)
    want = np.zeros((1, 1, 5, 5))
    want[0, 0, 2, 2] = 5
    np.testing.assert_array_equal(np.asarray(dx, np.float64), want)
