"""conv2d against lax.conv_general_dilated (reference.ref_conv2d) over every public parameter.

Geometries are listed once in NCHW/OIHW terms (N, C, H, W, O, kernel, ...) and each runs in both
layouts; dtypes are crossed with a few geometries only, to keep the suite fast. A seeded random
loop covers combinations nobody thought of.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv

from reference import ConvCase, assert_close, on, ref_conv2d

DTYPES = [jnp.float32, jnp.float64, jnp.float16, jnp.bfloat16]
LAYOUTS = ["NCHW", "NHWC"]


def check(case: ConvCase, backend, layout, dtype, bias=True, seed=0, jit=False):
    x, w, b = case.operands(layout, dtype, seed, bias)
    x, w = on(backend, x, w)
    b = None if b is None else on(backend, b)
    fn = case.function(layout)
    got = jax.jit(fn)(x, w, b) if jit else fn(x, w, b)
    # jit: one XLA compilation for the whole reference instead of one per op (faster suite).
    want = jax.jit(case.reference(layout))(x, w, b)
    assert_close(got, want)
    return got


GEOMETRIES = {
    "plain_3x3": ConvCase(),
    "padding_int": ConvCase(padding=1),
    "padding_pair": ConvCase(kernel=(3, 5), padding=(1, 2)),
    "padding_asymmetric": ConvCase(padding=((0, 2), (1, 0))),
    "padding_asymmetric_wide": ConvCase(kernel=(2, 3), padding=((2, 1), (0, 3))),
    "padding_SAME": ConvCase(padding="SAME"),
    "padding_same_lowercase_stride2": ConvCase(h=7, w=8, stride=2, padding="same"),
    "padding_VALID_stride_pair": ConvCase(stride=(2, 1), padding="VALID"),
    "padding_valid_lowercase": ConvCase(padding="valid"),
    "stride2_padded": ConvCase(stride=2, padding=1),
    "stride_anisotropic": ConvCase(h=9, w=10, stride=(2, 3)),
    "dilation2": ConvCase(h=7, dilation=2, padding=2),
    "dilation_anisotropic": ConvCase(kernel=(3, 2), dilation=(1, 3)),
    "groups2": ConvCase(c=4, o=6, groups=2),
    "depthwise": ConvCase(c=4, o=4, groups=4, padding=1),
    "depthwise_channel_multiplier": ConvCase(c=3, o=6, groups=3, padding=1),
    "groups_with_everything": ConvCase(
        c=6, o=4, groups=2, kernel=(3, 2), stride=(2, 1), padding=((1, 0), (2, 1)), dilation=(2, 1)
    ),
    "anisotropic_everything": ConvCase(
        h=8, w=5, kernel=(2, 3), stride=(1, 2), dilation=(2, 1), padding=((0, 1), (2, 0))
    ),
    "pointwise_1x1": ConvCase(kernel=(1, 1)),
    # Edge cases the first plan listed (1x1 images, kernels larger than the input, ...).
    "image_1x1_kernel_1x1": ConvCase(h=1, w=1, kernel=(1, 1)),
    "image_1x1_kernel_3x3_padded": ConvCase(h=1, w=1, padding=1),
    "kernel_larger_than_input_padded": ConvCase(h=2, w=3, kernel=(4, 5), padding=2),
    "stride_leaves_remainder": ConvCase(h=8, w=7, stride=3),
    "even_kernel_SAME": ConvCase(kernel=(2, 4), padding="SAME"),
    "even_kernel_SAME_stride2": ConvCase(h=7, w=6, kernel=(4, 2), stride=2, padding="SAME"),
    "batch_of_one_wide_channels": ConvCase(n=1, c=8, o=5, h=3, w=3, padding=1),
    # LeNet's C3 and C5 shapes, scaled down (NCHW forward on the indirect GEMM: a tile stored
    # transposed, and a 1x1 output plane written in place), with and without bias.
    "lenet_c3_valid": ConvCase(n=3, c=6, h=14, w=14, o=16, kernel=(5, 5)),
    "lenet_c3_odd_channels": ConvCase(n=2, c=6, h=9, w=10, o=17, kernel=(5, 5)),
    "lenet_c5_one_cell": ConvCase(n=4, c=16, h=5, w=5, o=24, kernel=(5, 5)),
    "lenet_c5_one_cell_k4x5": ConvCase(n=3, c=5, h=4, w=5, o=20, kernel=(4, 5)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry_float32(backend, name, layout):
    # Bias on for even-length names, off for odd: both paths see every kind of geometry.
    check(GEOMETRIES[name], backend, layout, jnp.float32, bias=len(name) % 2 == 0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", ["groups_with_everything", "padding_SAME", "depthwise"])
def test_dtypes(backend, name, dtype, layout):
    # Every dtype runs with bias in one layout and without in the other.
    bias = (DTYPES.index(dtype) + LAYOUTS.index(layout)) % 2 == 0
    got = check(GEOMETRIES[name], backend, layout, dtype, bias=bias)
    assert got.dtype == dtype


# Shapes big enough to cross the CPU kernels' blocking thresholds, which the small cases above
# never reach: reductions K = C/groups*KH*KW above one 256-deep K-slice (split into slices),
# more than 96 output channels (several row blocks of the GEMM), more than 128 positions per
# image (images split across tasks), 1x1 kernels (NHWC reads x in place as the GEMM operand),
# and wide depthwise convolutions whose channel count is not a multiple of the vector width.
MEDIUM = {
    "K432_O100_182_positions": ConvCase(n=2, c=48, h=14, w=13, o=100, padding=1),
    "K288_strided": ConvCase(n=2, c=32, h=15, w=16, o=20, stride=2, padding=1),
    "K600_groups2": ConvCase(n=1, c=48, h=9, w=9, o=18, kernel=(5, 5), groups=2, padding=2),
    "pointwise_1x1": ConvCase(n=2, c=40, h=9, w=10, o=33, kernel=(1, 1)),
    "depthwise_multiplier_wide": ConvCase(
        n=1, c=20, h=9, w=10, o=40, groups=20, dilation=2, padding="SAME"
    ),
    "depthwise_wide": ConvCase(n=2, c=40, h=11, w=12, o=40, groups=40, stride=2, padding=1),
}


MEDIUM_DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16]


@pytest.mark.parametrize("dtype", MEDIUM_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", list(MEDIUM))
def test_medium_shapes(backend, name, dtype):
    # The layout alternates over (geometry, dtype), so each geometry runs in both layouts
    # without the full product; bias is off in float64 only.
    layout = LAYOUTS[(list(MEDIUM).index(name) + MEDIUM_DTYPES.index(dtype)) % 2]
    check(MEDIUM[name], backend, layout, dtype, bias=dtype != jnp.float64)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_size_batch(backend, layout):
    case = ConvCase(n=0, padding=1)
    got = check(case, backend, layout, jnp.float32)
    assert got.shape == ((0, 4, 6, 7) if layout == "NCHW" else (0, 6, 7, 4))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_and_inf_propagate_like_lax(backend, layout):
    # A NaN and an inf in x reach exactly the outputs whose windows read them; everything else
    # stays finite. In this geometry (stride 2, dilation 2, top pad 1 along H) window rows are
    # 2*oh - 1 + 2*kh: odd input rows only, so the NaN planted in row 2 must reach nothing.
    case = GEOMETRIES["groups_with_everything"]
    x, w, b = case.operands("NCHW", jnp.float32)
    x = x.at[0, 1, 3, 3].set(jnp.nan).at[1, 4, 1, 0].set(jnp.inf).at[0, 2, 2, 1].set(jnp.nan)
    if layout == "NHWC":
        x, w = jnp.transpose(x, (0, 2, 3, 1)), jnp.transpose(w, (2, 3, 1, 0))
    x, w, b = on(backend, x, w, b)
    got = jaxconv.conv2d(x, w, b, **case.keywords(), layout=layout)
    want = ref_conv2d(x, w, b, **case.ref_keywords(), layout=layout)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    assert np.isnan(want).any() and np.isfinite(want).any()
    finite = np.isfinite(np.asarray(want))
    np.testing.assert_allclose(
        np.asarray(got)[finite], np.asarray(want)[finite], rtol=1e-4, atol=1e-4
    )


def test_many_channels_accumulate(backend):
    # A long reduction (C*KH*KW = 288 terms) in float16: accumulation must not be in float16.
    case = ConvCase(n=1, c=32, o=3, h=5, w=5, padding=1)
    check(case, backend, "NCHW", jnp.float16)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "name",
    ["groups_with_everything", "even_kernel_SAME_stride2", "kernel_larger_than_input_padded"],
)
def test_under_jit(backend, name, layout):
    check(GEOMETRIES[name], backend, layout, jnp.float32, jit=True)


def test_jit_with_python_scalars_and_tracers(backend):
    # Geometry is static (Python ints), arrays are traced: one compiled function, two inputs.
    case = GEOMETRIES["groups_with_everything"]
    fn = jax.jit(partial(jaxconv.conv2d, **case.keywords()))
    for seed in (1, 2):
        x, w, b = on(backend, *case.operands("NCHW", jnp.float64, seed))
        assert_close(fn(x, w, b), ref_conv2d(x, w, b, **case.ref_keywords()))


def random_conv(rng: np.random.Generator) -> ConvCase:
    """Small random geometry whose output is non-empty; every padding form is drawn."""
    while True:
        groups = int(rng.choice([1, 1, 2, 3]))
        kernel = tuple(int(k) for k in rng.integers(1, 5, 2))
        dilation = tuple(int(d) for d in rng.integers(1, 4, 2))
        stride = tuple(int(s) for s in rng.integers(1, 4, 2))
        h, w = (int(s) for s in rng.integers(1, 10, 2))
        form = rng.integers(0, 5)
        if form == 0:
            padding = int(rng.integers(0, 3))
        elif form == 1:
            padding = tuple(int(p) for p in rng.integers(0, 3, 2))
        elif form == 2:
            padding = tuple(tuple(int(p) for p in rng.integers(0, 3, 2)) for _ in range(2))
        else:
            padding = str(rng.choice(["SAME", "VALID", "same"]))
        case = ConvCase(
            n=int(rng.integers(1, 3)),
            c=groups * int(rng.integers(1, 4)),
            h=h,
            w=w,
            o=groups * int(rng.integers(1, 4)),
            kernel=kernel,
            stride=stride if rng.random() < 0.7 else stride[0],
            padding=padding,
            dilation=dilation if rng.random() < 0.7 else dilation[0],
            groups=groups,
        )
        (pt, pb), (pl, pr) = case.ref_keywords()["padding"]
        two = lambda v: (v, v) if isinstance(v, int) else v
        dh, dw = two(case.dilation)
        if h + pt + pb >= dh * (kernel[0] - 1) + 1 and w + pl + pr >= dw * (kernel[1] - 1) + 1:
            return case


@pytest.mark.parametrize("seed", range(30))
def test_random_configurations(backend, seed):
    rng = np.random.default_rng(1000 + seed)
    case = random_conv(rng)
    layout = LAYOUTS[seed % 2]
    dtype = [jnp.float32, jnp.float64][(seed // 2) % 2]
    check(case, backend, layout, dtype, bias=bool(seed % 3), seed=seed)
