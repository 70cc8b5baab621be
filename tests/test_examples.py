"""The two classic teaching examples, with expected numbers worked out by hand (and, for the
padded variant, by a plain NumPy loop), never taken from jaxconv's own output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv

from reference import on

IMAGE = np.array([[1, 2, 0, 1], [0, 1, 3, 2], [2, 0, 1, 0], [1, 3, 2, 1]], np.float64)
SOBEL_X = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float64)


def as_layout(plane, layout):
    """A single 2-d plane as a batch of one single-channel image."""
    plane = jnp.asarray(plane)
    return plane[None, None] if layout == "NCHW" else plane[None, :, :, None]


def as_kernel(plane, layout):
    """A 2-d kernel as OIHW (NCHW) or HWIO (NHWC) weights with one input and one output."""
    plane = jnp.asarray(plane)
    return plane[None, None] if layout == "NCHW" else plane[:, :, None, None]


def plane_of(a, layout):
    return a[0, 0] if layout == "NCHW" else a[0, :, :, 0]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_4x4_image_3x3_kernel_then_2x2_pool(backend, layout):
    # Cross-correlation, no padding: a 2x2 output. Sum over the window, row by row:
    #   y[0,0]: (1*1 + 2*0 + 0*-1) + (0*2 + 1*0 + 3*-2) + (2*1 + 0*0 + 1*-1) =  1 - 6 + 1 = -4
    #   y[0,1]: (2*1 + 0*0 + 1*-1) + (1*2 + 3*0 + 2*-2) + (0*1 + 1*0 + 0*-1) =  1 - 2 + 0 = -1
    #   y[1,0]: (0*1 + 1*0 + 3*-1) + (2*2 + 0*0 + 1*-2) + (1*1 + 3*0 + 2*-1) = -3 + 2 - 1 = -2
    #   y[1,1]: (1*1 + 3*0 + 2*-1) + (0*2 + 1*0 + 0*-2) + (3*1 + 2*0 + 1*-1) = -1 + 0 + 2 =  1
    # A 2x2 max pool of that keeps 1, at flat index 1*2 + 1 = 3.
    x, w = on(backend, as_layout(IMAGE, layout), as_kernel(SOBEL_X, layout))
    y = jaxconv.conv2d(x, w, layout=layout)
    np.testing.assert_array_equal(plane_of(y, layout), [[-4.0, -1.0], [-2.0, 1.0]])
    pooled, idx = jaxconv.max_pool2d(y, 2, return_indices=True, layout=layout)
    assert pooled.shape == (1, 1, 1, 1) and idx.dtype == jnp.int32
    assert float(pooled.ravel()[0]) == 1.0 and int(idx.ravel()[0]) == 3


def test_4x4_image_3x3_kernel_padded_then_2x2_pool(backend):
    # padding=1 keeps 4x4; the expected output is a plain loop over a zero-padded copy.
    padded = np.pad(IMAGE, 1)
    conv = np.array(
        [[np.sum(padded[i : i + 3, j : j + 3] * SOBEL_X) for j in range(4)] for i in range(4)]
    )
    pooled = conv.reshape(2, 2, 2, 2).max(axis=(1, 3))  # (row block, row, col block, col)
    x, w = on(backend, as_layout(IMAGE, "NCHW"), as_kernel(SOBEL_X, "NCHW"))
    y = jaxconv.conv2d(x, w, padding=1)
    np.testing.assert_array_equal(y[0, 0], conv)
    np.testing.assert_array_equal(jaxconv.max_pool2d(y, 2)[0, 0], pooled)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_max_pool_gradient_mask_of_1_to_16(backend, layout):
    # x = 1..16 row by row; 2x2 windows hold {1,2,5,6}, {3,4,7,8}, {9,10,13,14}, {11,12,15,16}:
    # their maxima 6, 8, 14, 16 (bottom-right of each window) get gradient 1, all else 0.
    x = on(backend, as_layout(np.arange(1.0, 17.0).reshape(4, 4), layout))
    dx = jax.jit(jax.grad(lambda x: jnp.sum(jaxconv.max_pool2d(x, 2, layout=layout))))(x)
    mask = plane_of(dx, layout)
    expected = np.isin(np.arange(1, 17), [6, 8, 14, 16]).reshape(4, 4).astype(np.float64)
    np.testing.assert_array_equal(mask, expected)
    assert set(np.asarray(plane_of(x, layout))[np.asarray(mask) == 1].tolist()) == {6, 8, 14, 16}
