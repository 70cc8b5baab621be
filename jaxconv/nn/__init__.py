"""Flax layers whose convolutions and max pooling run on jaxconv's kernels.

Flax is an optional extra (``pip install 'jaxconv[flax]'``). The layers carry Flax's own names
in two modules that mirror Flax's, so that changing the import is the whole port::

    from flax import nnx                      ->  from jaxconv.nn import nnx
    import flax.linen as nn                   ->  import jaxconv.nn.linen as nn

``jaxconv.nn.nnx.Conv`` / ``ConvTranspose`` / ``max_pool`` and ``jaxconv.nn.linen.Conv`` /
``ConvTranspose`` / ``max_pool`` run on jaxconv; every other name of those two modules
(``BatchNorm``, ``Dense``, ``relu``, ``Module``, ``compact``, ``Rngs``, ...) is Flax's own
object. A linen model keeps Flax's parameter tree (linen names an unnamed submodule after its
class, so ``Conv_0`` stays ``Conv_0``), its initial values for the same key and its
checkpoints. This module holds the nnx layers under jaxconv's earlier names, ``Conv2d``,
``ConvTranspose2d``, ``MaxPool2d`` and :func:`max_pool`, and the linen ones as ``LinenConv2d``,
``LinenConvTranspose2d`` and ``LinenMaxPool2d`` (subclasses of the linen layers that keep their
own auto-names, ``LinenConv2d_0``, so trees made with them stay as they were).

The convolution layers create their parameters exactly as Flax does (names ``kernel`` and
``bias``, kernel in HWIO, same initializers, same order of rng draws), so a model built with
the same rngs / init key has identical parameters and computes the same outputs up to
floating-point rounding. Inputs are channels-last (NHWC) by default, as in Flax;
``layout="NCHW"`` takes (N, C, H, W) inputs with the same HWIO kernel (transposed at call
time), so checkpoints do not depend on the layout.

Differences from Flax: two spatial dims only, so an int ``kernel_size`` means (k, k) here (Flax
would read it as a 1-d kernel); ``input_dilation`` must be 1 and there are no unshared weights
or ``conv_general_dilated`` hooks; ``precision`` only decides whether a GPU may use TF32 (the
CPU always computes in full float32); Conv's padding must be >= 0; pooling takes floating
inputs only; gradients are reverse-mode only (``jax.custom_vjp``).
"""

from __future__ import annotations

try:
    import flax.linen  # noqa: F401  (the import that fails without Flax)
    from flax import nnx as flax_nnx
    from flax.nnx.nn.dtypes import promote_dtype as _nnx_promote_dtype
except ImportError as err:  # pragma: no cover - exercised only without flax installed
    raise ImportError(
        "jaxconv.nn needs Flax, which is an optional dependency of jaxconv. Install it with: "
        "pip install 'jaxconv[flax]'"
    ) from err

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from .. import _args
from .._args import IntPair, LayoutName, PaddingLike, PrecisionLike
from ..pool import max_pool2d
from . import _impl
from ._impl import default_bias_init, default_kernel_init

__all__ = [
    "Conv2d",
    "ConvTranspose2d",
    "LinenConv2d",
    "LinenConvTranspose2d",
    "LinenMaxPool2d",
    "MaxPool2d",
    "linen",
    "max_pool",
    "nnx",
]


def max_pool(
    inputs: ArrayLike,
    window_shape: IntPair,
    strides: IntPair | None = None,
    padding: PaddingLike = "VALID",
    *,
    layout: LayoutName = "NHWC",
) -> jax.Array:
    """``flax.nnx.max_pool`` / ``flax.linen.max_pool`` for 2 spatial dims, on jaxconv's kernel.

    Flax's semantics, not PyTorch's: ``strides`` defaults to 1 (not to the window), and any
    padding is allowed (padded cells are -inf and never selected; jaxconv.max_pool2d's limit of
    half a window is lifted by padding the input explicitly where needed). The gradient goes
    to the first maximum in row-major window order (Flax's, lax's, goes to every tie).

    Args:
      inputs: ``(*batch, H, W, C)`` for NHWC or ``(*batch, C, H, W)`` for NCHW, with any number
        of leading batch dims (also none). float32, float64, float16 or bfloat16.
      window_shape: an int or ``(kh, kw)``, each >= 1.
      strides: an int or ``(sh, sw)``, each >= 1; ``None`` means 1, as in Flax.
      padding: ``"SAME"``, ``"VALID"``, ``((top, bottom), (left, right))``, an int or
        ``(ph, pw)``; each >= 0.
      layout: ``"NHWC"`` (Flax's) or ``"NCHW"``.

    Returns:
      The pooled values, ``inputs``' batch dims followed by the pooled (H, W, C) or (C, H, W),
      in the input dtype.

    Raises:
      ValueError: an unknown layout, a window or stride < 1, a negative or malformed padding,
        an output size < 1.
      TypeError: a non-floating input, a non-integer window or stride.
    """
    layout = _impl.check_layout(layout)
    window = _args.pair(window_shape, "window_shape")
    stride = _args.pair(1 if strides is None else strides, "strides")
    x, batch_shape = _impl.flatten_batch(jnp.asarray(inputs))
    in_hw = tuple(x.shape[a] for a in _impl.spatial_axes(layout))
    pads: Any = _args.padding_pairs(
        padding, "padding", in_hw=in_hw, kernel_eff=window, stride=stride
    )
    if any(max(p) > k // 2 for p, k in zip(pads, window)):
        # jaxconv follows PyTorch, which limits padding to half the window; Flax does not. Wider
        # padding is -inf cells that a window can only select when it holds nothing else, so
        # padding the input explicitly gives Flax's result.
        x = _impl.pad_spatial(x, pads, layout, constant_values=-jnp.inf)
        pads = 0
    y = max_pool2d(x, window, stride, pads, layout=layout)
    return _impl.restore_batch(y, batch_shape)


class MaxPool2d(flax_nnx.Module):
    """:func:`max_pool` as an nnx module (``strides`` defaults to 1, as in Flax).

    Args:
      window_shape, strides, padding, layout: as :func:`max_pool`.
    """

    def __init__(
        self,
        window_shape: IntPair,
        strides: IntPair | None = None,
        padding: PaddingLike = "VALID",
        *,
        layout: LayoutName = "NHWC",
    ):
        self.window_shape = window_shape
        self.strides = strides
        self.padding = padding
        self.layout = _impl.check_layout(layout)

    def __call__(self, inputs: ArrayLike) -> jax.Array:
        """Pools ``inputs`` as :func:`max_pool` does."""
        return max_pool(inputs, self.window_shape, self.strides, self.padding, layout=self.layout)


class Conv2d(flax_nnx.Module):
    """``flax.nnx.Conv`` for 2-d inputs, computed by :func:`jaxconv.conv2d`.

    Same constructor, parameters, initialization and outputs as ``nnx.Conv`` (also
    ``jaxconv.nn.nnx.Conv``), minus ``input_dilation`` and the lax hooks, plus ``layout``.

    Args:
      in_features: input channels.
      out_features: output channels.
      kernel_size: an int (meaning (k, k)) or ``(kh, kw)``.
      strides: an int or ``(sh, sw)``; None means 1.
      padding: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"``, an int, or two entries
        (one per spatial dim), each an int or a ``(low, high)`` pair; each >= 0.
      kernel_dilation: an int or ``(dh, dw)``; None means 1.
      feature_group_count: groups; it must divide in_features and out_features.
      use_bias: whether to add a ``bias`` parameter.
      mask: None, or the kernel's shape: multiplies the kernel (e.g. causal convolutions).
      dtype: the computation dtype (None: from the inputs and parameters, as Flax promotes).
      param_dtype: the parameters' dtype.
      precision: lax's precision; it only decides whether a GPU may use TF32.
      kernel_init: the kernel initializer (Flax's LeCun normal by default).
      bias_init: the bias initializer (zeros by default).
      layout: ``"NHWC"`` (Flax's) or ``"NCHW"``; the kernel is HWIO either way.
      rngs: the nnx rngs; the kernel key is drawn first, then the bias key, as in Flax.
      kernel_metadata: metadata of the kernel ``nnx.Param`` (e.g. sharding names).
      bias_metadata: metadata of the bias ``nnx.Param``.

    Raises:
      ValueError: a feature_group_count that does not divide the features, a padding,
        stride, dilation or layout that is malformed (at construction); the call raises
        :func:`jaxconv.conv2d`'s errors.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: IntPair,
        strides: IntPair | None = 1,
        *,
        padding: Any = "SAME",
        kernel_dilation: IntPair | None = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        mask: ArrayLike | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Callable = default_kernel_init,
        bias_init: Callable = default_bias_init,
        layout: LayoutName = "NHWC",
        rngs: flax_nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        kernel_hw = _impl.spatial_pair(kernel_size, "kernel_size")
        if in_features % feature_group_count or out_features % feature_group_count:
            raise ValueError(
                f"feature_group_count={feature_group_count} must divide in_features="
                f"{in_features} and out_features={out_features}"
            )
        self.kernel_shape = kernel_hw + (in_features // feature_group_count, out_features)
        # Flax draws the kernel key first and the bias key second; so do we, for equal params.
        # The metadata (e.g. sharding annotations) goes on the nnx.Param as in nnx.Conv.
        self.kernel, self.bias = _impl.make_params(
            rngs,
            self.kernel_shape,
            out_features,
            use_bias,
            param_dtype,
            kernel_init,
            bias_init,
            kernel_metadata,
            bias_metadata,
        )
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_hw
        self.strides = _impl.spatial_pair(strides, "strides")
        self.padding = _impl.conv_padding(padding)
        self.kernel_dilation = _impl.spatial_pair(kernel_dilation, "kernel_dilation")
        self.feature_group_count = feature_group_count
        self.use_bias = use_bias
        self.mask = flax_nnx.data(mask)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.layout = _impl.check_layout(layout)

    def _convolve(
        self, x: jax.Array, kernel_hwio: jax.Array, bias: jax.Array | None, **geometry: Any
    ) -> jax.Array:
        """The convolution itself (a subclass may compute it differently, e.g. with lax)."""
        return _impl.jaxconv_conv(x, kernel_hwio, bias, precision=self.precision, **geometry)

    def __call__(self, inputs: ArrayLike) -> jax.Array:
        """Convolves ``inputs`` (``(*batch, H, W, in_features)`` for NHWC, ``(*batch,
        in_features, H, W)`` for NCHW) -> ``(*batch, OH, OW, out_features)`` (or NCHW)."""
        bias = None if self.bias is None else self.bias[...]
        return _impl.apply_conv(
            self._convolve,
            jnp.asarray(inputs),
            self.kernel[...],
            bias,
            self.mask,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count,
            layout=self.layout,
            promote=lambda *a: _nnx_promote_dtype(a, dtype=self.dtype),
            precision=self.precision,
        )


class ConvTranspose2d(flax_nnx.Module):
    """``flax.nnx.ConvTranspose`` for 2-d inputs, computed by :func:`jaxconv.conv_transpose2d`.

    Same constructor, parameters, initialization and outputs as ``nnx.ConvTranspose`` (also
    ``jaxconv.nn.nnx.ConvTranspose``), including its padding meaning (``lax.conv_transpose``'s,
    not PyTorch's), plus ``layout``.

    Args:
      in_features: input channels.
      out_features: output channels.
      kernel_size: an int (meaning (k, k)) or ``(kh, kw)``.
      strides: an int or ``(sh, sw)``; None means 1.
      padding: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, an int, or two entries (one per
        spatial dim), each an int or a ``(low, high)`` pair (negative values crop).
      kernel_dilation: an int or ``(dh, dw)``; None means 1.
      use_bias: whether to add a ``bias`` parameter.
      mask: None, or the kernel's shape: multiplies the kernel.
      dtype: the computation dtype (None: promoted from inputs and parameters).
      param_dtype: the parameters' dtype.
      precision: lax's precision; it only decides whether a GPU may use TF32.
      kernel_init: the kernel initializer.
      bias_init: the bias initializer.
      transpose_kernel: Flax's: the kernel is ``(KH, KW, out_features, in_features)`` and
        flipped, i.e. the gradient of a Conv with that kernel.
      promote_dtype: Flax's dtype promotion hook.
      preferred_element_type: must be None (jaxconv computes in the input dtype).
      layout: ``"NHWC"`` (Flax's) or ``"NCHW"``.
      rngs: the nnx rngs (kernel key first, then bias).
      kernel_metadata: metadata of the kernel ``nnx.Param``.
      bias_metadata: metadata of the bias ``nnx.Param``.

    Raises:
      ValueError: a preferred_element_type other than None, a malformed padding, stride,
        dilation or layout.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: IntPair,
        strides: IntPair | None = None,
        *,
        padding: Any = "SAME",
        kernel_dilation: IntPair | None = None,
        use_bias: bool = True,
        mask: ArrayLike | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Callable = default_kernel_init,
        bias_init: Callable = default_bias_init,
        transpose_kernel: bool = False,
        promote_dtype: Callable = _nnx_promote_dtype,
        preferred_element_type: Any = None,
        layout: LayoutName = "NHWC",
        rngs: flax_nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        _impl.check_preferred_element_type(preferred_element_type)
        kernel_hw = _impl.spatial_pair(kernel_size, "kernel_size")
        channels = (out_features, in_features) if transpose_kernel else (in_features, out_features)
        self.kernel_shape = kernel_hw + channels
        self.kernel, self.bias = _impl.make_params(
            rngs,
            self.kernel_shape,
            out_features,
            use_bias,
            param_dtype,
            kernel_init,
            bias_init,
            kernel_metadata,
            bias_metadata,
        )
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_hw
        self.strides = _impl.spatial_pair(strides, "strides")
        self.padding = _impl.conv_padding(padding, modes=_impl.TRANSPOSE_PAD_MODES, minimum=None)
        self.kernel_dilation = _impl.spatial_pair(kernel_dilation, "kernel_dilation")
        self.use_bias = use_bias
        self.mask = flax_nnx.data(mask)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.transpose_kernel = _args.flag(transpose_kernel, "transpose_kernel")
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type
        self.layout = _impl.check_layout(layout)

    def __call__(self, inputs: ArrayLike) -> jax.Array:
        """The transposed convolution of ``inputs`` (channels where ``layout`` says)."""
        bias = None if self.bias is None else self.bias[...]
        return _impl.apply_conv_transpose(
            jnp.asarray(inputs),
            self.kernel[...],
            bias,
            self.mask,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            transpose_kernel=self.transpose_kernel,
            layout=self.layout,
            promote=lambda *a: self.promote_dtype(a, dtype=self.dtype),
            precision=self.precision,
        )


# The submodules under Flax's names; importing them here makes `jaxconv.nn.linen` an attribute.
from . import linen, nnx  # noqa: E402


class LinenConv2d(linen.Conv):
    """``jaxconv.nn.linen.Conv`` under its earlier name. As a class of its own it keeps
    its own auto-name in a parent module (``LinenConv2d_0``), so parameter trees made with it
    stay as they were; new code should use ``jaxconv.nn.linen.Conv`` (``Conv_0``, as Flax)."""


class LinenConvTranspose2d(linen.ConvTranspose):
    """``jaxconv.nn.linen.ConvTranspose`` under its earlier name (auto-named
    ``LinenConvTranspose2d_0``)."""


class LinenMaxPool2d(linen.MaxPool):
    """``jaxconv.nn.linen.MaxPool`` under its earlier name."""
