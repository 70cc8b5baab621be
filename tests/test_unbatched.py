"""PyTorch's unbatched inputs: conv2d, conv_transpose2d, max_pool2d and max_unpool2d take one
example without its N axis ((C, H, W) for NCHW, (H, W, C) for NHWC) and return it without N
too (pool indices included). Each case is checked against the lax / NumPy oracles run on the
example as a batch of one, and against jaxconv's batched result; gradients through
check_grads, and vmap over a stack of unbatched examples equals the batched call."""

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
)

LAYOUTS = ["NCHW", "NHWC"]
C_IN, C_OUT, H, W = 4, 6, 7, 6


def _example(layout, channels=C_IN, h=H, w=W, seed=0, dtype=jnp.float64):
    """One (C, H, W) or (H, W, C) example."""
    shape = (channels, h, w) if layout == "NCHW" else (h, w, channels)
    return random_array(np.random.default_rng(seed), shape, dtype)


def _conv_weight(layout, o, i, kh, kw, seed=1):
    shape = (o, i, kh, kw) if layout == "NCHW" else (kh, kw, i, o)
    return random_array(np.random.default_rng(seed), shape, jnp.float64)


CONV_ARGS = [dict(), dict(stride=2, padding=1), dict(padding="SAME", dilation=(2, 1), groups=2)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kwargs", CONV_ARGS)
def test_conv2d_unbatched(backend, layout, kwargs):
    groups = kwargs.get("groups", 1)
    x = _example(layout)
    w = _conv_weight(layout, C_OUT, C_IN // groups, 3, 2)
    b = random_array(np.random.default_rng(2), (C_OUT,), jnp.float64)
    x, w, b = on(backend, x, w, b)
    y = jaxconv.conv2d(x, w, b, layout=layout, **kwargs)
    assert y.ndim == 3
    pads = kwargs.get("padding", 0)
    ref_pads = pads.upper() if isinstance(pads, str) else ((pads, pads), (pads, pads))
    want = ref_conv2d(
        x[None],
        w,
        b,
        stride=(kwargs.get("stride", 1),) * 2,
        padding=ref_pads,
        dilation=kwargs.get("dilation", (1, 1)),
        groups=groups,
        layout=layout,
    )[0]
    assert_close(y, want)
    assert_close(y, jaxconv.conv2d(x[None], w, b, layout=layout, **kwargs)[0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_transpose2d_unbatched(backend, layout):
    x = _example(layout)
    # (C_in, C_out/groups, KH, KW) for NCHW, (KH, KW, C_out/groups, C_in) for NHWC
    shape = (C_IN, 3, 3, 2) if layout == "NCHW" else (3, 2, 3, C_IN)
    w = random_array(np.random.default_rng(1), shape, jnp.float64)
    b = random_array(np.random.default_rng(2), (6,), jnp.float64)
    x, w, b = on(backend, x, w, b)
    kwargs = dict(stride=2, padding=1, output_padding=1, groups=2)
    y = jaxconv.conv_transpose2d(x, w, b, layout=layout, **kwargs)
    assert y.ndim == 3
    want = ref_conv_transpose2d(
        x[None],
        w,
        b,
        stride=(2, 2),
        padding=((1, 1), (1, 1)),
        output_padding=(1, 1),
        groups=2,
        layout=layout,
    )[0]
    assert_close(y, want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_max_pool2d_and_unpool_unbatched(backend, layout):
    x = on(backend, _example(layout))
    y, idx = jaxconv.max_pool2d(x, 3, stride=2, padding=1, return_indices=True, layout=layout)
    assert y.ndim == 3 and idx.ndim == 3 and idx.dtype == jnp.int32
    want_y, want_idx = ref_max_pool2d(x[None], (3, 3), (2, 2), ((1, 1), (1, 1)), layout=layout)
    np.testing.assert_array_equal(np.asarray(y), want_y[0])
    np.testing.assert_array_equal(np.asarray(idx), want_idx[0])
    # max_unpool2d puts each maximum back at its index and zeros elsewhere (NumPy oracle on
    # channel-first planes).
    out = jaxconv.max_unpool2d(y, idx, 3, stride=2, padding=1, output_size=x.shape, layout=layout)
    assert out.shape == x.shape
    planes = np.asarray(x) if layout == "NCHW" else np.moveaxis(np.asarray(x), 2, 0)
    want = np.zeros_like(planes).reshape(planes.shape[0], -1)
    chan_idx = want_idx[0] if layout == "NCHW" else np.moveaxis(want_idx[0], 2, 0)
    for c, plane_idx in enumerate(chan_idx):
        want[c, plane_idx.ravel()] = planes[c].ravel()[plane_idx.ravel()]
    want = want.reshape(planes.shape)
    np.testing.assert_array_equal(
        np.asarray(out), want if layout == "NCHW" else np.moveaxis(want, 0, 2)
    )
    batched = jaxconv.max_unpool2d(
        y[None],
        idx[None],
        3,
        stride=2,
        padding=1,
        output_size=x.shape[1:] if layout == "NCHW" else x.shape[:2],
        layout=layout,
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(batched[0]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unbatched_gradients(layout):
    x = _example(layout, h=5, w=5)
    w = _conv_weight(layout, 3, C_IN, 2, 3)
    check_grads(
        lambda x, w: jaxconv.conv2d(x, w, stride=(1, 2), padding=1, layout=layout),
        (x, w),
        order=2,
        modes=["rev"],
    )
    wt = jnp.moveaxis(w, (0, 1), (1, 0)) if layout == "NCHW" else jnp.swapaxes(w, 2, 3)
    check_grads(
        lambda x, w: jaxconv.conv_transpose2d(x, w, stride=2, layout=layout),
        (x, wt),
        order=2,
        modes=["rev"],
    )
    check_grads(lambda x: jaxconv.max_pool2d(x, 2, layout=layout), (x,), order=2, modes=["rev"])
    # The gradient of an unbatched call is the batched one without N.
    loss = lambda x: jnp.sum(jnp.sin(jaxconv.conv2d(x, w, padding=1, layout=layout)))
    assert_close(jax.grad(loss)(x), jax.grad(loss)(x[None])[0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap_over_unbatched_examples_equals_batched_call(layout):
    xs = jnp.stack([_example(layout, seed=s) for s in range(3)])
    w = _conv_weight(layout, C_OUT, C_IN, 3, 3)
    conv = lambda x: jaxconv.conv2d(x, w, padding=1, layout=layout)
    assert_close(jax.vmap(conv)(xs), conv(xs))
    pool = lambda x: jaxconv.max_pool2d(x, 2, return_indices=True, layout=layout)
    for got, want in zip(jax.vmap(pool)(xs), pool(xs)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # per-example weights too (the grouped-convolution batching rule)
    ws = jnp.stack([w, 2 * w, -w])
    assert_close(
        jax.vmap(lambda x, w: jaxconv.conv2d(x, w, layout=layout))(xs, ws),
        jnp.stack([jaxconv.conv2d(x, w_, layout=layout) for x, w_ in zip(xs, ws)]),
    )


def test_unbatched_errors():
    x = _example("NCHW")
    y, idx = jaxconv.max_pool2d(x, 2, return_indices=True)
    with pytest.raises(ValueError, match=r"indices must have the shape of x \(4, 3, 3\)"):
        jaxconv.max_unpool2d(y, idx[None], 2)
    with pytest.raises(
        ValueError,
        match=r"x must be a 4-d array .* or 3-d \(C, H, W\), got "
        r"shape \(7, 6\)",
    ):
        jaxconv.conv2d(x[0], _conv_weight("NCHW", 2, C_IN, 3, 3))
    with pytest.raises(
        ValueError,
        match=r"x must be a 4-d array \(N, H, W, C_in\) or 3-d "
        r"\(H, W, C_in\)",
    ):
        jaxconv.conv_transpose2d(x[0], jnp.ones((3, 3, 2, C_IN)), layout="NHWC")
