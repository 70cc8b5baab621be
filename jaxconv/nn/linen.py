"""``flax.linen`` with its convolutions and max pooling computed by jaxconv.

Porting a linen model is changing its import::

    import flax.linen as nn            ->  import jaxconv.nn.linen as nn

``Conv``, ``ConvTranspose`` and ``max_pool`` here run on jaxconv's kernels and keep Flax's
names, fields (in Flax's order), parameters and initialization, so a model keeps its parameter
tree (``Conv_0``, ``ConvTranspose_0``), the same initial values for the same key, and loads
Flax checkpoints. Every other name (``Module``, ``compact``, ``BatchNorm``, ``Dense``, ``relu``,
``avg_pool``, ...) is ``flax.linen``'s own object. ``MaxPool`` is :func:`max_pool` as a module
(linen has none). ``tests/test_flax_port.py`` checks a ResNet block stack against Flax.

Differences from Flax: see :mod:`jaxconv.nn`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as flax_linen
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype as _linen_promote_dtype
from jax.typing import ArrayLike

from .. import _args
from .._args import IntPair, LayoutName, PaddingLike, PrecisionLike
from . import _impl, max_pool
from ._impl import default_bias_init, default_kernel_init

__all__ = ["Conv", "ConvTranspose", "MaxPool", "max_pool"]


class Conv(flax_linen.Module):
    """``flax.linen.Conv`` for 2-d inputs, computed by :func:`jaxconv.conv2d`.

    The fields are Flax's, in Flax's order, plus ``layout`` at the end; ``kernel`` is
    ``(KH, KW, in_features // feature_group_count, features)`` and ``bias`` ``(features,)``,
    created and initialized as Flax creates them.

    Args:
      features: output channels (the input channels come from the input).
      kernel_size: an int (meaning (k, k), unlike Flax's 1-d reading) or ``(kh, kw)``.
      strides: an int or ``(sh, sw)``; None means 1.
      padding: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"``, an int, or two entries
        (one per spatial dim), each an int or a ``(low, high)`` pair; each >= 0.
      input_dilation: must be 1 or None (use :class:`ConvTranspose` for a strided transpose).
      kernel_dilation: an int or ``(dh, dw)``; None means 1.
      feature_group_count: groups; it must divide the input channels and ``features``.
      use_bias: whether to add a ``bias`` parameter.
      mask: None, or the kernel's shape: multiplies the kernel.
      dtype: the computation dtype (None: promoted from inputs and parameters, as Flax).
      param_dtype: the parameters' dtype.
      precision: lax's precision; it only decides whether a GPU may use TF32.
      kernel_init: the kernel initializer (LeCun normal, Flax's default).
      bias_init: the bias initializer (zeros).
      promote_dtype: Flax's dtype promotion hook.
      conv_general_dilated: must be None (jaxconv computes the convolution).
      conv_general_dilated_cls: must be None.
      layout: ``"NHWC"`` (Flax's) or ``"NCHW"``; the kernel is HWIO either way.
    """

    features: int
    kernel_size: IntPair
    strides: IntPair | None = 1
    padding: Any = "SAME"
    input_dilation: IntPair | None = 1
    kernel_dilation: IntPair | None = 1
    feature_group_count: int = 1
    use_bias: bool = True
    mask: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = default_bias_init
    promote_dtype: Callable = _linen_promote_dtype
    conv_general_dilated: Callable | None = None
    conv_general_dilated_cls: Any = None
    layout: LayoutName = "NHWC"

    @flax_linen.compact
    def __call__(self, inputs: ArrayLike) -> jax.Array:
        """Convolves ``inputs``, ``(*batch, H, W, C)`` (NHWC) or ``(*batch, C, H, W)`` (NCHW).

        Raises:
          ValueError: an input_dilation other than 1, a lax hook, a feature_group_count that
            does not divide the input channels, a malformed padding, stride or dilation, and
            :func:`jaxconv.conv2d`'s errors.
        """
        if _impl.spatial_pair(self.input_dilation, "input_dilation") != (1, 1):
            raise ValueError(
                f"jaxconv's Conv has no input_dilation (use ConvTranspose), got "
                f"input_dilation={self.input_dilation!r}"
            )
        if self.conv_general_dilated is not None or self.conv_general_dilated_cls is not None:
            raise ValueError(
                "jaxconv's Conv computes the convolution itself: "
                "conv_general_dilated and conv_general_dilated_cls must be None"
            )
        inputs = jnp.asarray(inputs)
        layout = _impl.check_layout(self.layout)
        in_features = _impl.channels(inputs.shape, layout)
        if in_features % self.feature_group_count:
            raise ValueError(
                f"feature_group_count={self.feature_group_count} must divide the "
                f"input features {in_features}"
            )
        kernel_shape = _impl.spatial_pair(self.kernel_size, "kernel_size") + (
            in_features // self.feature_group_count,
            self.features,
        )
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        promote = self.promote_dtype
        return _impl.apply_conv(
            lambda *a, **kw: _impl.jaxconv_conv(*a, precision=self.precision, **kw),
            inputs,
            kernel,
            bias,
            self.mask,
            strides=_impl.spatial_pair(self.strides, "strides"),
            padding=_impl.conv_padding(self.padding),
            kernel_dilation=_impl.spatial_pair(self.kernel_dilation, "kernel_dilation"),
            feature_group_count=self.feature_group_count,
            layout=layout,
            promote=lambda *a: tuple(promote(*a, dtype=self.dtype)),
            precision=self.precision,
        )


class ConvTranspose(flax_linen.Module):
    """``flax.linen.ConvTranspose`` for 2-d inputs, computed by :func:`jaxconv.conv_transpose2d`.

    The fields are Flax's, in Flax's order, plus ``layout``; parameters, initialization and
    output are Flax's, including its padding meaning (``lax.conv_transpose``'s, not
    PyTorch's).

    Args:
      features: output channels.
      kernel_size: an int (meaning (k, k)) or ``(kh, kw)``.
      strides: an int or ``(sh, sw)``; None means 1.
      padding: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, an int, or two entries (one per
        spatial dim), each an int or a ``(low, high)`` pair (negative values crop).
      kernel_dilation: an int or ``(dh, dw)``; None means 1.
      use_bias: whether to add a ``bias`` parameter.
      mask: None, or the kernel's shape: multiplies the kernel.
      dtype: the computation dtype.
      param_dtype: the parameters' dtype.
      precision: lax's precision; it only decides whether a GPU may use TF32.
      kernel_init: the kernel initializer.
      bias_init: the bias initializer.
      transpose_kernel: Flax's: the kernel is ``(KH, KW, features, in_features)`` and flipped.
      promote_dtype: Flax's dtype promotion hook.
      preferred_element_type: must be None (jaxconv computes in the input dtype).
      layout: ``"NHWC"`` (Flax's) or ``"NCHW"``.
    """

    features: int
    kernel_size: IntPair
    strides: IntPair | None = None
    padding: Any = "SAME"
    kernel_dilation: IntPair | None = None
    use_bias: bool = True
    mask: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = default_bias_init
    transpose_kernel: bool = False
    promote_dtype: Callable = _linen_promote_dtype
    preferred_element_type: Any = None
    layout: LayoutName = "NHWC"

    @flax_linen.compact
    def __call__(self, inputs: ArrayLike) -> jax.Array:
        """The transposed convolution of ``inputs`` (channels where ``layout`` says).

        Raises:
          ValueError: a preferred_element_type other than None, a mask of another shape than
            the kernel, a malformed padding, stride, dilation or layout.
        """
        _impl.check_preferred_element_type(self.preferred_element_type)
        inputs = jnp.asarray(inputs)
        layout = _impl.check_layout(self.layout)
        in_features = _impl.channels(inputs.shape, layout)
        channels = (
            (self.features, in_features) if self.transpose_kernel else (in_features, self.features)
        )
        kernel_shape = _impl.spatial_pair(self.kernel_size, "kernel_size") + channels
        _impl.check_mask(self.mask, kernel_shape)  # before creating params, as Flax
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        promote = self.promote_dtype
        return _impl.apply_conv_transpose(
            inputs,
            kernel,
            bias,
            self.mask,
            strides=_impl.spatial_pair(self.strides, "strides"),
            padding=_impl.conv_padding(self.padding, modes=_impl.TRANSPOSE_PAD_MODES, minimum=None),
            kernel_dilation=_impl.spatial_pair(self.kernel_dilation, "kernel_dilation"),
            transpose_kernel=_args.flag(self.transpose_kernel, "transpose_kernel"),
            layout=layout,
            promote=lambda *a: tuple(promote(*a, dtype=self.dtype)),
            precision=self.precision,
        )


class MaxPool(flax_linen.Module):
    """:func:`max_pool` as a linen module (``strides`` defaults to 1, as in Flax).

    Args:
      window_shape, strides, padding, layout: as :func:`max_pool`.
    """

    window_shape: IntPair
    strides: IntPair | None = None
    padding: PaddingLike = "VALID"
    layout: LayoutName = "NHWC"

    def __call__(self, inputs: ArrayLike) -> jax.Array:
        """Pools ``inputs`` as :func:`max_pool` does."""
        return max_pool(inputs, self.window_shape, self.strides, self.padding, layout=self.layout)


def __getattr__(name: str) -> Any:
    """Every other name is flax.linen's (``import jaxconv.nn.linen as nn`` ports a model)."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(flax_linen, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(dir(flax_linen)))
