"""conv_transpose2d against PyTorch's definition written through lax (ref_conv_transpose2d).

Weights are (C_in, C_out/groups, KH, KW) for NCHW and (KH, KW, C_out/groups, C_in) for NHWC.
Geometries are given in NCHW terms and each runs in both layouts; output_padding appears with
stride and with dilation (it only has to be smaller than one of them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv

from reference import ConvCase, assert_close, on

DTYPES = [jnp.float32, jnp.float64, jnp.float16, jnp.bfloat16]
LAYOUTS = ["NCHW", "NHWC"]


def transposed(**fields) -> ConvCase:
    """A conv_transpose2d case (reference.ConvCase); x defaults to 5x4."""
    return ConvCase(transpose=True, **{"h": 5, "w": 4, **fields})


def check(case: ConvCase, backend, layout, dtype, bias=True, seed=0, jit=False):
    x, w, b = case.operands(layout, dtype, seed, bias)
    x, w = on(backend, x, w)
    b = None if b is None else on(backend, b)
    fn = case.function(layout)
    got = jax.jit(fn)(x, w, b) if jit else fn(x, w, b)
    # jit: one XLA compilation for the whole reference instead of one per op (faster suite).
    want = jax.jit(case.reference(layout))(x, w, b)
    assert_close(got, want)
    assert got.shape == case.y_shape(layout)
    return got


GEOMETRIES = {
    "plain_3x3": transposed(),
    "stride2": transposed(stride=2),
    "stride2_output_padding1": transposed(stride=2, output_padding=1),
    "stride_anisotropic_output_padding": transposed(
        stride=(2, 3), output_padding=(1, 2), padding=(1, 0)
    ),
    "padding_int": transposed(padding=1),
    "padding_pair": transposed(kernel=(3, 4), padding=(1, 2)),
    "padding_asymmetric": transposed(stride=2, padding=((0, 2), (1, 0))),
    "dilation2": transposed(dilation=2, padding=1),
    "output_padding_from_dilation": transposed(dilation=2, output_padding=1),
    "groups2": transposed(c=4, o=6, groups=2, stride=2),
    "depthwise": transposed(c=4, o=4, groups=4, stride=2, padding=1),
    "depthwise_channel_multiplier": transposed(c=3, o=6, groups=3),
    "anisotropic_everything": transposed(
        c=4,
        o=6,
        groups=2,
        kernel=(3, 2),
        stride=(2, 3),
        padding=((1, 0), (0, 2)),
        output_padding=(1, 0),
        dilation=(1, 2),
    ),
    "image_1x1": transposed(h=1, w=1, stride=2),
    "kernel_1x1_stride2_output_padding": transposed(kernel=(1, 1), stride=2, output_padding=1),
    "even_kernel_stride2_padded": transposed(kernel=(4, 4), stride=2, padding=1),  # DCGAN upsampler
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry_float32(backend, name, layout):
    check(GEOMETRIES[name], backend, layout, jnp.float32, bias=len(name) % 2 == 0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", ["anisotropic_everything", "depthwise"])
def test_dtypes(backend, name, dtype, layout):
    # Every dtype runs with bias in one layout and without in the other.
    bias = (DTYPES.index(dtype) + LAYOUTS.index(layout)) % 2 == 0
    got = check(GEOMETRIES[name], backend, layout, dtype, bias=bias)
    assert got.dtype == dtype


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_size_batch(backend, layout):
    check(transposed(n=0, stride=2, output_padding=1), backend, layout, jnp.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_under_jit(backend, layout):
    check(GEOMETRIES["anisotropic_everything"], backend, layout, jnp.float64, jit=True)


def test_inverts_conv2d_shape(backend):
    # With output_padding the transposed conv maps a strided conv's output back to its input
    # size exactly: 7 -> conv(k3, s2, p1) -> 4 -> convT(k3, s2, p1, op=0) -> 7,
    # and 8 -> 4 -> convT(..., op=1) -> 8.
    for size, op in ((7, 0), (8, 1)):
        x = on(backend, jnp.ones((1, 2, size, size)))
        y = jaxconv.conv2d(x, jnp.ones((3, 2, 3, 3)), stride=2, padding=1)
        back = jaxconv.conv_transpose2d(
            y, jnp.ones((3, 2, 3, 3)), stride=2, padding=1, output_padding=op
        )
        assert back.shape == x.shape


def random_convt(rng: np.random.Generator) -> ConvCase:
    while True:
        groups = int(rng.choice([1, 1, 2]))
        kernel = tuple(int(k) for k in rng.integers(1, 5, 2))
        stride = tuple(int(s) for s in rng.integers(1, 4, 2))
        dilation = tuple(int(d) for d in rng.integers(1, 3, 2))
        output_padding = tuple(int(rng.integers(0, max(s, d))) for s, d in zip(stride, dilation))
        padding = tuple(tuple(int(p) for p in rng.integers(0, 3, 2)) for _ in range(2))
        case = transposed(
            n=int(rng.integers(1, 3)),
            c=groups * int(rng.integers(1, 4)),
            o=groups * int(rng.integers(1, 4)),
            h=int(rng.integers(1, 7)),
            w=int(rng.integers(1, 7)),
            kernel=kernel,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            dilation=dilation,
            groups=groups,
        )
        if min(case.out_hw()) >= 1:
            return case


@pytest.mark.parametrize("seed", range(16))
def test_random_configurations(backend, seed):
    case = random_convt(np.random.default_rng(2000 + seed))
    check(
        case,
        backend,
        LAYOUTS[seed % 2],
        [jnp.float32, jnp.float64][(seed // 2) % 2],
        bias=bool(seed % 3),
        seed=seed,
    )
