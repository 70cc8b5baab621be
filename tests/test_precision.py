"""The `precision` argument of conv2d / conv_transpose2d (and the Flax modules): lax's accepted
values and errors, the `allow_tf32` attribute every conv target receives for each of them (read
from the lowered HLO), and unchanged CPU results (the CPU always computes in full float32).

allow_tf32 follows XLA's GPU convolutions, which allow TF32 when every operand precision is at
most HIGH: DEFAULT / HIGH -> 1, HIGHEST -> 0, None -> jax.default_matmul_precision."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxconv

from reference import assert_close, random_array, ref_conv2d

P = lax.Precision
X = random_array(np.random.default_rng(0), (2, 3, 6, 5), jnp.float32)
W = random_array(np.random.default_rng(1), (4, 3, 3, 3), jnp.float32)
WT = random_array(np.random.default_rng(2), (3, 4, 3, 3), jnp.float32)  # conv_transpose2d's

# (precision, allow_tf32 sent with the default jax_default_matmul_precision)
ACCEPTED = [
    (None, 1),
    ("default", 1),
    ("fastest", 1),
    ("bfloat16", 1),
    ("high", 1),
    ("tensorfloat32", 1),
    ("bfloat16_3x", 1),
    ("highest", 0),
    ("float32", 0),
    (P.DEFAULT, 1),
    (P.HIGH, 1),
    (P.HIGHEST, 0),
    ((P.DEFAULT, P.HIGH), 1),
    ((P.HIGH, P.HIGHEST), 0),
    (("highest", "default"), 0),
    (["fastest", "high"], 1),
    (lax.DotAlgorithmPreset.DEFAULT, 1),
]
REJECTED = ["bogus", "HIGHEST", 3, 2.0, (P.HIGH,), ("high", "high", "high"), (P.HIGH, 1)]


def _tf32_attrs(fn, *args) -> list[int]:
    """allow_tf32 of every jaxconv custom call in fn's lowered HLO."""
    text = jax.jit(fn).lower(*args).as_text()
    calls = [line for line in text.splitlines() if "custom_call @jaxconv_conv2d" in line]
    assert calls, text
    return [int(re.search(r"allow_tf32 = (\d+) : i64", line).group(1)) for line in calls]


def _grads(conv, w, precision):
    """A function whose lowering holds all three conv targets (fwd, bwd_data, bwd_filter)."""
    return lambda x, w: jax.grad(
        lambda x, w: jnp.sum(conv(x, w, precision=precision) ** 2), argnums=(0, 1)
    )(x, w)


@pytest.mark.parametrize("precision,want", ACCEPTED, ids=str)
def test_attribute_sent_to_every_conv_target(precision, want):
    attrs = _tf32_attrs(_grads(jaxconv.conv2d, W, precision), X, W)
    assert len(attrs) >= 3 and set(attrs) == {want}
    attrs = _tf32_attrs(_grads(jaxconv.conv_transpose2d, WT, precision), X, WT)
    assert set(attrs) == {want}


@pytest.mark.parametrize(
    "default,want",
    [(None, 1), ("highest", 0), ("float32", 0), ("tensorfloat32", 1), ("bfloat16", 1)],
)
def test_none_follows_default_matmul_precision(default, want):
    with jax.default_matmul_precision(default):
        assert set(_tf32_attrs(lambda x, w: jaxconv.conv2d(x, w), X, W)) == {want}
        # an explicit precision wins over the default, as in lax
        assert set(_tf32_attrs(lambda x, w: jaxconv.conv2d(x, w, precision="high"), X, W)) == {1}
        assert set(_tf32_attrs(lambda x, w: jaxconv.conv2d(x, w, precision=P.HIGHEST), X, W)) == {0}


@pytest.mark.parametrize("precision", REJECTED, ids=str)
def test_rejected_like_lax(precision):
    with pytest.raises((ValueError, TypeError)):  # the oracle: lax refuses them too
        lax.conv_general_dilated(X, W, (1, 1), "VALID", precision=precision)
    with pytest.raises(ValueError, match="precision must be None, one of"):
        jaxconv.conv2d(X, W, precision=precision)
    with pytest.raises(ValueError, match="precision must be None, one of"):
        jaxconv.conv_transpose2d(X, WT, precision=precision)


def test_dot_algorithms_other_than_default_are_refused():
    """lax takes dot algorithms for convolutions too; jaxconv's kernels implement none but the
    default, so it refuses the others by name instead of silently ignoring them."""
    with pytest.raises(ValueError, match=r"only lax\.DotAlgorithmPreset\.DEFAULT applies"):
        jaxconv.conv2d(X, W, precision=lax.DotAlgorithmPreset.F32_F32_F32)


def test_cpu_results_do_not_depend_on_precision():
    want = ref_conv2d(X, W, padding=((1, 1), (1, 1)))
    base = jaxconv.conv2d(X, W, padding=1)
    assert_close(base, want)
    base_t = jaxconv.conv_transpose2d(X, WT, stride=2)
    for precision, _ in ACCEPTED:
        np.testing.assert_array_equal(
            np.asarray(jaxconv.conv2d(X, W, padding=1, precision=precision)), np.asarray(base)
        )
        np.testing.assert_array_equal(
            np.asarray(jaxconv.conv_transpose2d(X, WT, stride=2, precision=precision)),
            np.asarray(base_t),
        )


def test_flax_modules_take_precision():
    """The Flax drop-ins pass `precision` on (nnx.Conv / ConvTranspose and their linen forms
    take it too), and refuse what lax refuses."""
    nnx = pytest.importorskip("flax.nnx")
    from jaxconv import nn as jnn

    x = jnp.transpose(X, (0, 2, 3, 1))  # NHWC, as Flax
    modules = {
        "Conv2d": lambda p: jnn.Conv2d(3, 4, (3, 3), precision=p, rngs=nnx.Rngs(0)),
        "ConvTranspose2d": lambda p: jnn.ConvTranspose2d(
            3, 4, (3, 3), strides=2, precision=p, rngs=nnx.Rngs(0)
        ),
    }
    for name, make in modules.items():
        assert set(_tf32_attrs(lambda x: make("highest")(x), x)) == {0}, name
        assert set(_tf32_attrs(lambda x: make(P.HIGH)(x), x)) == {1}, name
        np.testing.assert_array_equal(np.asarray(make("highest")(x)), np.asarray(make(None)(x)))
        with pytest.raises(ValueError, match="precision must be None, one of"):
            make("bogus")(x)
    for linen_module in (
        jnn.LinenConv2d(4, (3, 3), precision="highest"),
        jnn.LinenConvTranspose2d(4, (3, 3), precision="highest"),
    ):
        params = linen_module.init(jax.random.key(0), x)
        assert set(_tf32_attrs(lambda x: linen_module.apply(params, x), x)) == {0}
