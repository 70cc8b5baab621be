"""jaxconv.nn against Flax itself: built with the same rngs, Conv2d / LinenConv2d must hold the
very same parameters as nnx.Conv / linen.Conv and give the same outputs and gradients; max_pool
must give flax's max_pool values and gradients."""

import contextlib
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax")
import flax.linen as linen  # noqa: E402
from flax import nnx  # noqa: E402

from jaxconv import nn as jnn  # noqa: E402

from reference import assert_close, random_array  # noqa: E402

C_IN, C_OUT = 4, 6

# (kernel_size as Flax needs it, extra constructor arguments); every padding form Flax accepts.
# Only three kernel shapes appear (3x3, 2x3 and grouped 3x3): creating parameters of a new shape
# compiles the random generator anew, which is most of these tests' time.
CONV_CASES = {
    "default_same": ((3, 3), {}),
    "even_kernel_same_stride2": ((2, 3), dict(strides=2, padding="SAME")),
    "int_padding": ((3, 3), dict(strides=(2, 1), padding=1)),
    "per_dim_ints": ((3, 3), dict(padding=(2, 0))),
    "pairs_of_pairs": ((3, 3), dict(padding=((1, 2), (0, 1)))),
    "int_and_pair": ((2, 3), dict(padding=(1, (2, 0)))),
    "valid_dilated": ((3, 3), dict(padding="VALID", kernel_dilation=2)),
    "dilated_same_anisotropic": ((2, 3), dict(kernel_dilation=(3, 1), strides=(1, 2))),
    "groups": ((3, 3), dict(feature_group_count=2, strides=(2, 1))),
    "circular": ((2, 3), dict(padding="CIRCULAR")),
    "reflect_dilated": ((3, 3), dict(padding="REFLECT", kernel_dilation=2)),
    "no_bias": ((3, 3), dict(use_bias=False, strides=3)),
    "custom_init": (
        (3, 3),
        dict(kernel_init=nnx.initializers.normal(1.0), bias_init=nnx.initializers.uniform(1.0)),
    ),
}


def _inputs(shape, dtype=jnp.float32, seed=0):
    return random_array(np.random.default_rng(seed), shape, dtype)


def _flax_reference(fn, *args):
    """Flax's lax conv at full precision, so GPUs' TF32 does not blur the comparison."""
    with jax.default_matmul_precision("highest"):
        return fn(*args)


def _on(backend):
    """Creates arrays on `backend`. A device context is part of JAX's compilation cache key, so
    the default platform gets none, and shares compiled random generators across tests."""
    if backend == jax.default_backend():
        return contextlib.nullcontext()
    return jax.default_device(jax.devices(backend)[0])


def _same_tree(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# ----------------------------------------------------------------------------------------------
# nnx.Conv


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_nnx_conv2d_matches_nnx_conv(backend, case):
    kernel_size, kwargs = CONV_CASES[case]
    with _on(backend):
        ours = jnn.Conv2d(C_IN, C_OUT, kernel_size, rngs=nnx.Rngs(7), **kwargs)
        flax_conv = nnx.Conv(C_IN, C_OUT, kernel_size, rngs=nnx.Rngs(7), **kwargs)
        _same_tree(nnx.state(ours), nnx.state(flax_conv))
        assert set(nnx.state(ours).keys()) == (
            {"kernel", "bias"} if kwargs.get("use_bias", True) else {"kernel"}
        )
        x = _inputs((2, 9, 8, C_IN))
        assert_close(ours(x), _flax_reference(flax_conv, x))


def test_int_kernel_size_means_square():
    """Flax reads an int kernel_size as a 1-d kernel; a 2-d layer reads it as (k, k)."""
    ours = jnn.Conv2d(C_IN, C_OUT, 3, rngs=nnx.Rngs(1))
    flax_conv = nnx.Conv(C_IN, C_OUT, (3, 3), rngs=nnx.Rngs(1))
    _same_tree(nnx.state(ours), nnx.state(flax_conv))
    x = _inputs((2, 9, 8, C_IN))
    assert_close(ours(x), _flax_reference(flax_conv, x))


def test_two_layers_share_one_rngs_stream():
    """Swapping nnx.Conv for Conv2d inside a model keeps every later layer's params too."""

    def model(conv):
        rngs = nnx.Rngs(3)
        return [
            conv(C_IN, C_OUT, (3, 3), rngs=rngs),
            conv(C_IN, C_OUT, (2, 3), use_bias=False, rngs=rngs),
            conv(C_IN, C_OUT, (3, 3), feature_group_count=2, rngs=rngs),
        ]

    ours, theirs = model(jnn.Conv2d), model(nnx.Conv)
    for a, b in zip(ours, theirs):
        _same_tree(nnx.state(a), nnx.state(b))


@pytest.mark.parametrize("batch_shape", [(), (2, 3)])
def test_batch_dims_like_flax(batch_shape):
    """No batch dim, or several, are flattened and restored as nnx.Conv does."""
    ours = jnn.Conv2d(C_IN, C_OUT, (3, 3), strides=2, rngs=nnx.Rngs(0))
    flax_conv = nnx.Conv(C_IN, C_OUT, (3, 3), strides=2, rngs=nnx.Rngs(0))
    x = _inputs(batch_shape + (7, 6, C_IN))
    y = ours(x)
    assert y.shape == batch_shape + (4, 3, C_OUT)
    assert_close(y, _flax_reference(flax_conv, x))


@pytest.mark.parametrize(
    "dtype,param_dtype,x_dtype",
    [
        (None, jnp.float32, jnp.float64),  # promoted to float64 like Flax
        (jnp.float16, jnp.float32, jnp.float32),  # computed in float16
    ],
)
def test_dtype_and_param_dtype_like_flax(dtype, param_dtype, x_dtype):
    kwargs = dict(dtype=dtype, param_dtype=param_dtype)
    ours = jnn.Conv2d(C_IN, C_OUT, (3, 3), rngs=nnx.Rngs(2), **kwargs)
    flax_conv = nnx.Conv(C_IN, C_OUT, (3, 3), rngs=nnx.Rngs(2), **kwargs)
    _same_tree(nnx.state(ours), nnx.state(flax_conv))
    x = _inputs((2, 9, 8, C_IN), x_dtype)
    want = _flax_reference(flax_conv, x)
    assert want.dtype == (dtype or jnp.result_type(x_dtype, param_dtype))
    assert_close(ours(x), want)


def test_mask_like_flax():
    mask = jnp.asarray(np.random.default_rng(0).integers(0, 2, (3, 3, C_IN, C_OUT)), jnp.float32)
    ours = jnn.Conv2d(C_IN, C_OUT, (3, 3), mask=mask, rngs=nnx.Rngs(0))
    flax_conv = nnx.Conv(C_IN, C_OUT, (3, 3), mask=mask, rngs=nnx.Rngs(0))
    x = _inputs((2, 9, 8, C_IN))
    assert_close(ours(x), _flax_reference(flax_conv, x))


def test_nchw_layout_same_params_same_values():
    """layout='NCHW' keeps the HWIO kernel (checkpoints interchangeable) and transposes I/O."""
    kwargs = dict(strides=(2, 1), padding=((1, 0), (2, 1)), feature_group_count=2)
    nhwc = jnn.Conv2d(C_IN, C_OUT, (3, 3), rngs=nnx.Rngs(4), **kwargs)
    nchw = jnn.Conv2d(C_IN, C_OUT, (3, 3), layout="NCHW", rngs=nnx.Rngs(4), **kwargs)
    _same_tree(nnx.state(nchw), nnx.state(nhwc))
    x = _inputs((2, 7, 5, C_IN))
    assert_close(nchw(x.transpose(0, 3, 1, 2)), nhwc(x).transpose(0, 3, 1, 2))


def test_nnx_grads_match_flax(backend):
    kwargs = dict(
        strides=(1, 2), padding=(1, (0, 2)), kernel_dilation=(2, 1), feature_group_count=2
    )
    with _on(backend):
        ours = jnn.Conv2d(C_IN, C_OUT, (3, 3), rngs=nnx.Rngs(5), **kwargs)
        flax_conv = nnx.Conv(C_IN, C_OUT, (3, 3), rngs=nnx.Rngs(5), **kwargs)
        x = _inputs((2, 8, 7, C_IN))
        target = _inputs((2, 6, 4, C_OUT), seed=1)

        def loss(model, x):
            return jnp.sum((model(x) - target) ** 2)

        grad_fn = nnx.grad(loss, argnums=(0, 1))
        (g_ours, gx_ours) = jax.jit(grad_fn)(ours, x)
        (g_flax, gx_flax) = _flax_reference(grad_fn, flax_conv, x)
    assert float(jnp.abs(g_ours["kernel"][...]).max()) > 0
    for name in ("kernel", "bias"):
        assert_close(g_ours[name][...], g_flax[name][...])
    assert_close(gx_ours, gx_flax)


def test_conv2d_argument_errors():
    with pytest.raises(ValueError, match="feature_group_count=3 must divide"):
        jnn.Conv2d(C_IN, C_OUT, (3, 3), feature_group_count=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="padding must be 'SAME', 'VALID'"):
        jnn.Conv2d(C_IN, C_OUT, (3, 3), padding="CAUSAL", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        jnn.Conv2d(C_IN, C_OUT, (3, 3), padding=((-1, 0), (0, 0)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="layout"):
        jnn.Conv2d(C_IN, C_OUT, (3, 3), layout="CHWN", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("padding", [[None, (1, 2)], [1], (1, 2, 3), [(1, 2, 3), 0], 1.5])
def test_padding_forms_flax_refuses_are_value_errors(padding):
    """Flax's canonicalize_padding raises ValueError for these; so do the drop-ins."""
    x = _inputs((1, 6, 6, C_IN))
    with pytest.raises(ValueError, match="Invalid padding format"):
        nnx.Conv(C_IN, C_OUT, (3, 3), padding=padding, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match="padding must be"):
        jnn.Conv2d(C_IN, C_OUT, (3, 3), padding=padding, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="padding must be"):
        jnn.ConvTranspose2d(C_IN, C_OUT, (3, 3), padding=padding, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="padding must be"):
        jnn.LinenConv2d(C_OUT, (3, 3), padding=padding).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="padding must be"):
        jnn.LinenConvTranspose2d(C_OUT, (3, 3), padding=padding).init(jax.random.key(0), x)


@pytest.mark.parametrize(
    "kwargs",
    [dict(padding="VALID"), dict(padding=((0, 0), (1, 0))), dict(padding="VALID", strides=2)],
)
def test_kernel_larger_than_input_gives_empty_output_like_flax(kwargs):
    """lax (so Flax) returns an empty output where the kernel does not fit; no error."""
    x = _inputs((2, 3, 4, C_IN))
    ours = jnn.Conv2d(C_IN, C_OUT, (5, 6), rngs=nnx.Rngs(0), **kwargs)
    flax_conv = nnx.Conv(C_IN, C_OUT, (5, 6), rngs=nnx.Rngs(0), **kwargs)
    want = flax_conv(x)
    got = ours(x)
    assert 0 in want.shape and got.shape == want.shape and got.dtype == want.dtype
    linen_conv = jnn.LinenConv2d(C_OUT, (5, 6), **kwargs)
    assert linen_conv.apply(linen_conv.init(jax.random.key(0), x), x).shape == want.shape


def test_kernel_and_bias_metadata_like_flax():
    """nnx users annotate parameter sharding through kernel_metadata / bias_metadata."""
    # (Sharding names would need a mesh to create the arrays; any metadata key travels the same.)
    meta = dict(kernel_metadata={"role": "filters"}, bias_metadata={"role": "offsets"})
    for ours, theirs in [
        (
            jnn.Conv2d(C_IN, C_OUT, (3, 3), rngs=nnx.Rngs(0), **meta),
            nnx.Conv(C_IN, C_OUT, (3, 3), rngs=nnx.Rngs(0), **meta),
        ),
        (
            jnn.ConvTranspose2d(C_IN, C_OUT, (3, 3), rngs=nnx.Rngs(0), **meta),
            nnx.ConvTranspose(C_IN, C_OUT, (3, 3), rngs=nnx.Rngs(0), **meta),
        ),
    ]:
        for name in ("kernel", "bias"):
            got, want = getattr(ours, name), getattr(theirs, name)
            assert got.get_metadata()["role"] == want.get_metadata()["role"]
            assert got.get_metadata()["role"] == meta[name + "_metadata"]["role"]


# ----------------------------------------------------------------------------------------------
# nnx.ConvTranspose / linen.ConvTranspose

# (kernel_size, constructor arguments). Padding is lax.conv_transpose's (the padding of the
# stride-dilated input), including pads larger than k_eff - 1 and negative ones (crops).
TRANSPOSE_CASES = {
    "default_same": ((3, 3), {}),
    "same_stride2": ((3, 3), dict(strides=2)),
    "same_even_kernel_stride3": ((2, 3), dict(strides=(3, 2))),
    "valid_stride2": ((3, 3), dict(strides=2, padding="VALID")),
    "valid_dilated": ((2, 3), dict(padding="VALID", kernel_dilation=(2, 3), strides=(1, 2))),
    "int_padding": ((3, 3), dict(strides=2, padding=1)),
    "pairs_beyond_kernel_and_negative": ((3, 3), dict(strides=2, padding=((4, 0), (-1, 3)))),
    "int_and_pair": ((2, 3), dict(padding=(0, (2, 1)))),
    "transpose_kernel": ((2, 3), dict(strides=2, transpose_kernel=True)),
    "transpose_kernel_valid": (
        (3, 3),
        dict(padding="VALID", transpose_kernel=True, kernel_dilation=2),
    ),
    "circular": (
        (3, 3),
        dict(padding="CIRCULAR", strides=2, bias_init=nnx.initializers.uniform(1.0)),
    ),
    "circular_transpose_kernel": (
        (2, 3),
        dict(padding="CIRCULAR", transpose_kernel=True, strides=(2, 1)),
    ),
    "no_bias": ((3, 3), dict(use_bias=False, strides=3, padding=((3, 3), (0, 0)))),
    "custom_init": (
        (3, 3),
        dict(
            kernel_init=nnx.initializers.normal(1.0),
            bias_init=nnx.initializers.uniform(1.0),
            padding=((5, 2), (3, 3)),
        ),
    ),
}


@pytest.mark.parametrize("case", list(TRANSPOSE_CASES))
def test_nnx_conv_transpose2d_matches_nnx_conv_transpose(backend, case):
    kernel_size, kwargs = TRANSPOSE_CASES[case]
    with _on(backend):
        ours = jnn.ConvTranspose2d(C_IN, C_OUT, kernel_size, rngs=nnx.Rngs(7), **kwargs)
        flax_conv = nnx.ConvTranspose(C_IN, C_OUT, kernel_size, rngs=nnx.Rngs(7), **kwargs)
        _same_tree(nnx.state(ours), nnx.state(flax_conv))
        x = _inputs((2, 5, 4, C_IN))
        want = _flax_reference(flax_conv, x)
        got = ours(x)
    assert got.shape == want.shape
    assert_close(got, want)


@pytest.mark.parametrize(
    "case",
    [
        "same_stride2",
        "pairs_beyond_kernel_and_negative",
        "transpose_kernel",
        "circular",
        "circular_transpose_kernel",
        "no_bias",
        "custom_init",
    ],
)
def test_linen_conv_transpose2d_matches_linen_conv_transpose(case):
    kernel_size, kwargs = TRANSPOSE_CASES[case]
    ours = jnn.LinenConvTranspose2d(C_OUT, kernel_size, **kwargs)
    flax_conv = linen.ConvTranspose(C_OUT, kernel_size, **kwargs)
    x = _inputs((2, 5, 4, C_IN))
    key = jax.random.key(11)
    params = ours.init(key, x)
    _same_tree(params, flax_conv.init(key, x))
    assert_close(ours.apply(params, x), _flax_reference(flax_conv.apply, params, x))

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

    got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    want = _flax_reference(jax.grad(loss(flax_conv), argnums=(0, 1)), params, x)
    assert float(jnp.abs(got[0]["params"]["kernel"]).max()) > 0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(g, w)


@pytest.mark.parametrize("padding", [((0, 0), (-1, -1)), ((1, 1), (-2, 0))])
def test_conv_transpose_empty_output_like_flax(padding):
    """Negative (cropping) padding can leave no output column: Flax returns it empty."""
    x = _inputs((2, 3, 2, C_IN))
    ours = jnn.ConvTranspose2d(C_IN, C_OUT, (1, 2), padding=padding, rngs=nnx.Rngs(0))
    flax_conv = nnx.ConvTranspose(C_IN, C_OUT, (1, 2), padding=padding, rngs=nnx.Rngs(0))
    want = flax_conv(x)
    got = ours(x)
    assert 0 in want.shape
    assert_close(got, want)


def test_conv_transpose_nchw_unbatched_dtype_and_mask():
    kwargs = dict(strides=(2, 1), padding=((1, 3), (2, 0)), kernel_dilation=(1, 2))
    nhwc = jnn.ConvTranspose2d(C_IN, C_OUT, (3, 2), rngs=nnx.Rngs(4), **kwargs)
    nchw = jnn.ConvTranspose2d(C_IN, C_OUT, (3, 2), layout="NCHW", rngs=nnx.Rngs(4), **kwargs)
    _same_tree(nnx.state(nchw), nnx.state(nhwc))
    x = _inputs((2, 5, 4, C_IN))
    assert_close(nchw(x.transpose(0, 3, 1, 2)), nhwc(x).transpose(0, 3, 1, 2))
    flax_conv = nnx.ConvTranspose(C_IN, C_OUT, (3, 2), rngs=nnx.Rngs(4), **kwargs)
    for batch_shape in [(), (2, 3)]:  # flattened and restored as Flax does
        xb = _inputs(batch_shape + (5, 4, C_IN), seed=2)
        assert_close(nhwc(xb), _flax_reference(flax_conv, xb))
    mask = jnp.asarray(np.random.default_rng(0).integers(0, 2, (3, 2, C_IN, C_OUT)), jnp.float32)
    kwargs.update(mask=mask, dtype=jnp.float16)
    ours = jnn.ConvTranspose2d(C_IN, C_OUT, (3, 2), rngs=nnx.Rngs(4), **kwargs)
    flax_conv = nnx.ConvTranspose(C_IN, C_OUT, (3, 2), rngs=nnx.Rngs(4), **kwargs)
    want = _flax_reference(flax_conv, x)
    assert want.dtype == jnp.float16
    assert_close(ours(x), want)
    with pytest.raises(ValueError, match="mask must have the kernel's shape"):
        jnn.ConvTranspose2d(C_IN, C_OUT, (3, 2), mask=mask[:2], rngs=nnx.Rngs(4))(x)
    with pytest.raises(ValueError, match="preferred_element_type must be None"):
        jnn.ConvTranspose2d(C_IN, C_OUT, 3, preferred_element_type=jnp.float32, rngs=nnx.Rngs(4))


# Ported from Flax: tests/nnx/nn/conv_test.py, TestConvLinenConsistency.
# test_nnx_linen_convtranspose_equivalence (same product of arguments, Flax's precision argument
# dropped), with nnx.ConvTranspose / linen.ConvTranspose swapped for jaxconv's; the equality
# with Flax itself is added.
@pytest.mark.parametrize("strides", [None, (2, 3)])
@pytest.mark.parametrize("padding", ["VALID", "CIRCULAR", (4, 2)])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("use_mask", [False, True])
def test_flax_nnx_linen_convtranspose_equivalence(strides, padding, use_bias, use_mask):
    in_features, out_features, kernel_size = 3, 6, (7, 4)
    mask = jnp.tril(jnp.ones((7, 4, 3, 6))) if use_mask else None
    x = jnp.ones((24, 9, in_features))
    kwargs = dict(
        strides=strides,
        padding=padding,
        kernel_dilation=(2, 3),
        use_bias=use_bias,
        mask=mask,
        dtype=jnp.float32,
        param_dtype=jnp.float16,
    )
    model_nnx = jnn.ConvTranspose2d(
        in_features, out_features, kernel_size, rngs=nnx.Rngs(42), **kwargs
    )
    model = jnn.LinenConvTranspose2d(out_features, kernel_size=kernel_size, **kwargs)
    variables = model.init(jax.random.key(42), x)
    model_nnx.kernel[...] = variables["params"]["kernel"]
    if use_bias:
        model_nnx.bias[...] = variables["params"]["bias"]
    out = model.apply(variables, x)
    np.testing.assert_array_equal(out, model_nnx(x))
    flax_out = _flax_reference(
        linen.ConvTranspose(out_features, kernel_size=kernel_size, **kwargs).apply, variables, x
    )
    assert_close(out, flax_out)


# Ported from Flax: tests/linen/linen_linear_test.py, LinearTest.
# test_circular_conv_transpose_2d_constant (a selection of its product), with
# linen.ConvTranspose swapped for LinenConvTranspose2d.
@pytest.mark.parametrize(
    "n_batch,n_features,kernel_lin_size,n_input_features,input_y_size",
    [(1, 1, 1, 1, 5), (3, 2, 3, 5, 10), (1, 10, 9, 1, 5), (3, 1, 2, 5, 10)],
)
def test_flax_circular_conv_transpose_2d_constant(
    n_batch, n_features, kernel_lin_size, n_input_features, input_y_size
):
    input_x_size = 14
    x = jnp.ones((n_batch, input_x_size, input_y_size, n_input_features))
    conv_module = jnn.LinenConvTranspose2d(
        features=n_features,
        kernel_size=(kernel_lin_size, kernel_lin_size),
        padding="CIRCULAR",
        kernel_init=linen.initializers.ones,
        bias_init=linen.initializers.zeros,
    )
    y, initial_params = conv_module.init_with_output({"params": jax.random.key(0)}, x)
    assert initial_params["params"]["kernel"].shape == (
        kernel_lin_size,
        kernel_lin_size,
        n_input_features,
        n_features,
    )
    correct_ans = np.full(
        (n_batch, input_x_size, input_y_size, n_features),
        n_input_features * kernel_lin_size * kernel_lin_size,
    )
    np.testing.assert_allclose(y, correct_ans)


# ----------------------------------------------------------------------------------------------
# linen.Conv


@pytest.mark.parametrize(
    "case",
    [
        "default_same",
        "int_padding",
        "int_and_pair",
        "valid_dilated",
        "groups",
        "reflect_dilated",
        "no_bias",
    ],
)
def test_linen_conv2d_matches_linen_conv(case):
    kernel_size, kwargs = CONV_CASES[case]
    ours = jnn.LinenConv2d(C_OUT, kernel_size, **kwargs)
    flax_conv = linen.Conv(C_OUT, kernel_size, **kwargs)
    x = _inputs((2, 9, 8, C_IN))
    key = jax.random.key(11)
    params = ours.init(key, x)
    _same_tree(params, flax_conv.init(key, x))
    assert_close(ours.apply(params, x), _flax_reference(flax_conv.apply, params, x))

    def loss(module):
        return lambda p: jnp.sum(jnp.sin(module.apply(p, x)))

    assert_close(
        jax.grad(loss(ours))(params)["params"]["kernel"],
        _flax_reference(jax.grad(loss(flax_conv)), params)["params"]["kernel"],
    )


def test_linen_conv2d_nchw():
    x = _inputs((2, 6, 5, C_IN))
    nhwc = jnn.LinenConv2d(C_OUT, (3, 3), strides=2)
    params = nhwc.init(jax.random.key(0), x)
    nchw = jnn.LinenConv2d(C_OUT, (3, 3), strides=2, layout="NCHW")
    x_nchw = x.transpose(0, 3, 1, 2)
    _same_tree(nchw.init(jax.random.key(0), x_nchw), params)
    assert_close(nchw.apply(params, x_nchw), nhwc.apply(params, x).transpose(0, 3, 1, 2))


# ----------------------------------------------------------------------------------------------
# max pooling


POOL_CASES = {
    "2x2_stride2": ((2, 2), (2, 2), "VALID"),
    "default_stride_is_1": ((3, 3), None, "VALID"),
    "same_anisotropic": ((3, 2), (2, 1), "SAME"),
    "explicit_pairs": ((3, 3), (2, 2), ((1, 0), (1, 1))),
    "padding_wider_than_half_window": ((3, 2), (2, 1), ((2, 3), (0, 2))),
}


@pytest.mark.parametrize("case", list(POOL_CASES))
def test_max_pool_matches_flax(backend, case):
    window, strides, padding = POOL_CASES[case]
    x = jax.device_put(_inputs((2, 7, 6, 3)), jax.devices(backend)[0])
    want = nnx.max_pool(x, window, strides, padding)
    got = jnn.max_pool(x, window, strides, padding)
    assert_close(got, want)
    # Random values have no ties, so the gradient goes to the same cells in both.
    weights = _inputs(want.shape, seed=1)
    assert_close(
        jax.grad(lambda x: jnp.sum(jnn.max_pool(x, window, strides, padding) * weights))(x),
        jax.grad(lambda x: jnp.sum(nnx.max_pool(x, window, strides, padding) * weights))(x),
    )


def test_max_pool_modules_and_layouts():
    x = _inputs((3, 8, 7, 2))
    want = linen.max_pool(x, (2, 3), (2, 2), "SAME")
    assert_close(jnn.MaxPool2d((2, 3), (2, 2), "SAME")(x), want)
    assert_close(jnn.LinenMaxPool2d((2, 3), (2, 2), "SAME").apply({}, x), want)
    nchw = jnn.MaxPool2d((2, 3), (2, 2), "SAME", layout="NCHW")
    assert_close(nchw(x.transpose(0, 3, 1, 2)), want.transpose(0, 3, 1, 2))
    # Unbatched and multi-batch inputs, as Flax's pool allows.
    assert_close(jnn.max_pool(x[0], (2, 2), (2, 2)), linen.max_pool(x[0], (2, 2), (2, 2)))
    x5 = _inputs((2, 3, 6, 6, 2))
    assert_close(jnn.max_pool(x5, (2, 2), (2, 2)), linen.max_pool(x5, (2, 2), (2, 2)))


# Ported from Flax: tests/linen/linen_test.py, PoolTest.test_max_pool, with linen.max_pool
# swapped for jaxconv.nn.max_pool.
def test_flax_pool_test_max_pool():
    x = jnp.arange(9).reshape((1, 3, 3, 1)).astype(jnp.float32)
    pool = lambda x: jnn.max_pool(x, (2, 2))
    expected_y = jnp.array([[4.0, 5.0], [7.0, 8.0]]).reshape((1, 2, 2, 1))
    np.testing.assert_allclose(pool(x), expected_y)
    y_grad = jax.grad(lambda x: pool(x).sum())(x)
    expected_grad = jnp.array([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]).reshape(
        (1, 3, 3, 1)
    )
    np.testing.assert_allclose(y_grad, expected_grad)


# ----------------------------------------------------------------------------------------------
# Without Flax


def test_import_without_flax_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flax", None)  # makes `import flax...` raise ImportError
    monkeypatch.delitem(sys.modules, "jaxconv.nn")
    with pytest.raises(ImportError, match=r"pip install 'jaxconv\[flax\]'"):
        importlib.import_module("jaxconv.nn")
