"""Porting a Flax linen model is changing its import: `import flax.linen as nn` ->
`import jaxconv.nn.linen as nn`. The same model code, written once below (a small ResNet: a
stem conv, BatchNorm, max pool, residual blocks with projection shortcuts, a dense head), is
built from both modules; the port must have Flax's very parameter tree (paths, shapes, dtypes),
the same initial values for the same key, and the same losses over a few optax steps, while
its convolutions and max pooling run on jaxconv's kernels."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
optax = pytest.importorskip("optax")
import flax.linen  # noqa: E402

import jaxconv.nn  # noqa: E402
import jaxconv.nn.linen  # noqa: E402

NUM_CLASSES = 5


def resnet(nn):
    """A ResNet in the style of Flax's examples/imagenet/models.py, over the linen-like
    namespace `nn`; only `nn` differs between the Flax model and the port."""

    class ResNetBlock(nn.Module):
        filters: int
        strides: tuple[int, int] = (1, 1)

        @nn.compact
        def __call__(self, x, train: bool):
            norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
            residual = x
            y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
            y = nn.relu(norm()(y))
            y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
            y = norm(scale_init=nn.initializers.zeros_init())(y)
            if residual.shape != y.shape:
                residual = nn.Conv(
                    self.filters, (1, 1), self.strides, use_bias=False, name="conv_proj"
                )(residual)
                residual = norm(name="norm_proj")(residual)
            return nn.relu(residual + y)

    class ResNet(nn.Module):
        stage_sizes: tuple[int, ...] = (2, 1)
        width: int = 8

        @nn.compact
        def __call__(self, x, train: bool = True):
            x = nn.Conv(
                self.width,
                (5, 5),
                (2, 2),
                padding=[(2, 2), (2, 2)],
                use_bias=False,
                name="conv_init",
            )(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_init")(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            for i, blocks in enumerate(self.stage_sizes):
                for j in range(blocks):
                    strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                    x = ResNetBlock(self.width * 2**i, strides)(x, train)
            x = nn.Conv(NUM_CLASSES, (1, 1))(x)  # an unnamed conv with a bias: Conv_0
            return jnp.mean(x, axis=(1, 2))

    return ResNet()


def _batches(steps: int):
    rng = np.random.default_rng(0)
    return [
        (
            jnp.asarray(rng.standard_normal((4, 16, 16, 3)), jnp.float32),
            jnp.asarray(rng.integers(0, NUM_CLASSES, 4)),
        )
        for _ in range(steps)
    ]


def _train(model, variables, batches):
    """Losses of len(batches) SGD-with-momentum steps, training mode (batch statistics)."""
    tx = optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def step(params, batch_stats, opt_state, x, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    losses = []
    for x, labels in batches:
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, labels)
        losses.append(float(loss))
    return np.array(losses), step.lower(params, batch_stats, opt_state, *batches[0]).as_text()


def _paths(tree):
    return [
        (jax.tree_util.keystr(path), leaf.shape, leaf.dtype)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    ]


@pytest.mark.slow("compiles and trains two small ResNets (Flax and the port)")
@pytest.mark.cpu_only(
    "one small model trained on the default device; the ops themselves "
    "are checked per backend elsewhere"
)
def test_resnet_port_keeps_flax_params_init_and_losses(backend):
    flax_model, port = resnet(flax.linen), resnet(jaxconv.nn.linen)
    x = jnp.zeros((4, 16, 16, 3), jnp.float32)
    key = jax.random.key(42)
    want = flax_model.init(key, x)
    got = port.init(key, x)

    # Identical parameter tree: the same paths (Conv_0, conv_init, ResNetBlock_0/Conv_1, ...),
    # shapes and dtypes, so a Flax checkpoint loads as it is; and identical initial values.
    assert _paths(got) == _paths(want)
    assert "['params']['Conv_0']['kernel']" in [p for p, _, _ in _paths(got)]
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

    # The same losses step by step (float32; the kernels add in another order than XLA's).
    batches = _batches(4)
    want_losses, flax_hlo = _train(flax_model, want, batches)
    got_losses, port_hlo = _train(port, got, batches)
    np.testing.assert_allclose(got_losses, want_losses, rtol=2e-5, atol=2e-6)
    assert want_losses[-1] < want_losses[0]  # it does train

    # And the port computes with jaxconv: forward and backward conv and pool kernels.
    for target in (
        "jaxconv_conv2d_fwd",
        "jaxconv_conv2d_bwd_data",
        "jaxconv_conv2d_bwd_filter",
        "jaxconv_max_pool2d_fwd",
        "jaxconv_max_pool2d_bwd",
    ):
        assert target in port_hlo and target not in flax_hlo, target


def test_linen_namespace_is_flax_but_for_the_kernels():
    """jaxconv.nn.linen forwards every other name to flax.linen; the earlier names remain as
    subclasses that keep their own auto-names (their trees stay as they were)."""
    nn = jaxconv.nn.linen
    assert nn.BatchNorm is flax.linen.BatchNorm and nn.relu is flax.linen.relu
    assert nn.compact is flax.linen.compact and nn.Module is flax.linen.Module
    assert nn.max_pool is jaxconv.nn.max_pool and nn.Conv is not flax.linen.Conv
    with pytest.raises(AttributeError):
        nn.NoSuchLayer  # noqa: B018
    assert jaxconv.nn.nnx.Conv is jaxconv.nn.Conv2d
    assert jaxconv.nn.nnx.Rngs is flax.nnx.Rngs

    class Two(flax.linen.Module):
        conv: type

        @flax.linen.compact
        def __call__(self, x):
            return self.conv(2, (3, 3))(x)

    x = jnp.zeros((1, 5, 5, 1), jnp.float32)
    for conv, name in [
        (flax.linen.Conv, "Conv_0"),
        (nn.Conv, "Conv_0"),
        (jaxconv.nn.LinenConv2d, "LinenConv2d_0"),
    ]:
        assert list(Two(conv).init(jax.random.key(0), x)["params"]) == [name], conv
