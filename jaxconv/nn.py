"""Flax modules whose convolutions and max pooling run on jaxconv's kernels.

Drop-in replacements for Flax's layers (Flax is an optional extra: ``pip install jaxconv[flax]``):

    flax.nnx.Conv(...)            ->  jaxconv.nn.Conv2d(...)         same arguments, params, init
    flax.nnx.max_pool / linen.max_pool  ->  jaxconv.nn.max_pool   (or the MaxPool2d modules)
    flax.linen.Conv(...)          ->  jaxconv.nn.LinenConv2d(...)
                                      jaxconv.nn.LinenMaxPool2d(...)

The convolution modules create their parameters exactly as Flax does (same names ``kernel`` and
``bias``, kernel in HWIO, same initializers, same order of rng draws), so a model that swaps
``nnx.Conv`` for ``Conv2d`` and is built with the same ``nnx.Rngs`` gets identical parameters
and the same outputs. Inputs are channels-last (NHWC) by default, as in Flax; ``layout="NCHW"``
takes (N, C, H, W) inputs with the same HWIO kernel (transposed for the kernel at call time),
so checkpoints do not depend on the layout.

Differences from Flax: two spatial dims only, so an int ``kernel_size`` means (k, k) here (Flax
would read it as a 1-d kernel); no ``input_dilation``, ``precision`` or unshared weights;
padding must be >= 0; integer inputs to pooling are not supported.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

try:
    import flax.linen as linen
    from flax import nnx
    from flax.linen.dtypes import promote_dtype as _linen_promote_dtype
    from flax.nnx.nn import initializers
    from flax.nnx.nn.dtypes import promote_dtype as _nnx_promote_dtype
except ImportError as err:  # pragma: no cover - exercised only without flax installed
    raise ImportError(
        "jaxconv.nn needs Flax, which is an optional dependency of jaxconv. Install it with: "
        "pip install 'jaxconv[flax]'") from err

import jax.numpy as jnp

from . import _args
from .conv import conv2d
from .pool import max_pool2d

__all__ = ["Conv2d", "MaxPool2d", "LinenConv2d", "LinenMaxPool2d", "max_pool"]

# Flax's defaults (flax.nnx.nn.linear / flax.linen.linear): LeCun-normal kernels, zero biases.
default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()

_PAD_MODES = {"CIRCULAR": "wrap", "REFLECT": "reflect"}


# ----------------------------------------------------------------------------------------------
# Argument forms shared by the nnx and linen modules.


def _spatial_pair(value: Any, name: str) -> tuple[int, int]:
    """kernel_size / strides / kernel_dilation: an int, a pair, or None (Flax's 'broadcast 1')."""
    return _args.pair(1 if value is None else value, name)


def _conv_padding(padding: Any):
    """Flax's padding forms -> 'SAME' / 'VALID' / 'CIRCULAR' / 'REFLECT' or ((t, b), (l, r)).

    As flax.nnx.nn.linear.canonicalize_padding: an int p pads every side by p; a length-2
    sequence gives one entry per spatial dim, each an int p (meaning (p, p)) or a (low, high) pair.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode in ("SAME", "VALID") or mode in _PAD_MODES:
            return mode
        raise ValueError(f"padding must be 'SAME', 'VALID', 'CIRCULAR', 'REFLECT', an int or "
                         f"two ints / (low, high) pairs, got {padding!r}")
    if isinstance(padding, (list, tuple)) and len(padding) == 2:
        per_dim = tuple(p if isinstance(p, (list, tuple)) else (p, p) for p in padding)
        return tuple(_args.pair(p, "padding", minimum=0) for p in per_dim)
    pad = _args.integer(padding, "padding",
                     "an int, a pair, a pair of (low, high) pairs, or 'SAME'/'VALID'")
    return ((pad, pad), (pad, pad))


def _flatten_batch(x, spatial_and_features: int = 3):
    """Flax convention: any number of leading batch dims (even none) -> exactly one."""
    batch_shape = x.shape[:x.ndim - spatial_and_features]
    return x.reshape((-1,) + x.shape[x.ndim - spatial_and_features:]), batch_shape


def _restore_batch(y, batch_shape):
    return y.reshape(batch_shape + y.shape[1:])


def _spatial_axes(layout: str) -> tuple[int, int]:
    return (2, 3) if layout == "NCHW" else (1, 2)


def _pad_spatial(x, pads, layout: str, **pad_kwargs):
    widths = [(0, 0)] * 4
    for axis, pad in zip(_spatial_axes(layout), pads):
        widths[axis] = pad
    return jnp.pad(x, widths, **pad_kwargs)


def _check_layout(layout: str) -> str:
    return _args.layout_code(layout).name


def _channels(x_shape: Sequence[int], layout: str) -> int:
    return x_shape[-3] if layout == "NCHW" else x_shape[-1]


def _jaxconv_conv(x, kernel_hwio, bias, *, stride, padding, dilation, groups, layout):
    """One jaxconv conv2d with a Flax (HWIO) kernel; the bias is fused into the kernel."""
    w = kernel_hwio if layout == "NHWC" else jnp.transpose(kernel_hwio, (3, 2, 0, 1))  # -> OIHW
    return conv2d(x, w, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                  layout=layout)


def _apply_conv(convolve: Callable, inputs, kernel, bias, mask, *, strides, padding,
                kernel_dilation, feature_group_count, layout, promote):
    """Flax's Conv.__call__ in order: batch dims, wrap/reflect padding, mask, dtype, conv."""
    x, batch_shape = _flatten_batch(inputs)
    if isinstance(padding, str) and padding in _PAD_MODES:
        # As Flax: pad ((k_eff - 1) // 2, k_eff // 2) with the input's own values, then VALID.
        k_eff = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:2], kernel_dilation)]
        x = _pad_spatial(x, [((k - 1) // 2, k // 2) for k in k_eff], layout,
                         mode=_PAD_MODES[padding])
        padding = "VALID"
    if mask is not None:
        if mask.shape != kernel.shape:
            raise ValueError(f"mask must have the kernel's shape {kernel.shape}, got {mask.shape}")
        kernel = kernel * mask
    x, kernel, bias = promote(x, kernel, bias)
    y = convolve(x, kernel, bias, stride=strides, padding=padding, dilation=kernel_dilation,
                 groups=feature_group_count, layout=layout)
    return _restore_batch(y, batch_shape)


# ----------------------------------------------------------------------------------------------
# Max pooling.


def max_pool(inputs, window_shape, strides=None, padding: Any = "VALID", *,
             layout: str = "NHWC"):
    """flax.nnx.max_pool / flax.linen.max_pool for 2 spatial dims, on jaxconv's kernel.

    Flax's semantics: ``strides`` defaults to 1 (not to the window, unlike PyTorch); padding is
    'SAME', 'VALID' or ((low, high), (low, high)) (also an int or a pair of ints here); padded
    cells are -inf. Inputs may have any number of leading batch dims.
    """
    layout = _check_layout(layout)
    window = _args.pair(window_shape, "window_shape")
    stride = _args.pair(1 if strides is None else strides, "strides")
    x, batch_shape = _flatten_batch(inputs)
    in_hw = tuple(x.shape[a] for a in _spatial_axes(layout))
    pads = _args.padding(padding, "padding", in_hw=in_hw, kernel_eff=window, stride=stride)
    if any(max(p) > k // 2 for p, k in zip(pads, window)):
        # jaxconv follows PyTorch, which limits padding to half the window; Flax does not. Wider
        # padding is -inf cells that a window can only select when it holds nothing else, so
        # padding the input explicitly gives Flax's result.
        x = _pad_spatial(x, pads, layout, constant_values=-jnp.inf)
        pads = 0
    y = max_pool2d(x, window, stride, pads, layout=layout)
    return _restore_batch(y, batch_shape)


class MaxPool2d(nnx.Module):
    """nnx module form of :func:`max_pool` (``strides`` defaults to 1, as in Flax)."""

    def __init__(self, window_shape, strides=None, padding: Any = "VALID", *,
                 layout: str = "NHWC"):
        self.window_shape = window_shape
        self.strides = strides
        self.padding = padding
        self.layout = _check_layout(layout)

    def __call__(self, inputs):
        return max_pool(inputs, self.window_shape, self.strides, self.padding,
                        layout=self.layout)


class LinenMaxPool2d(linen.Module):
    """flax.linen module form of :func:`max_pool` (``strides`` defaults to 1, as in Flax)."""
    window_shape: Any
    strides: Any = None
    padding: Any = "VALID"
    layout: str = "NHWC"

    def __call__(self, inputs):
        return max_pool(inputs, self.window_shape, self.strides, self.padding,
                        layout=self.layout)


# ----------------------------------------------------------------------------------------------
# Convolution.


class Conv2d(nnx.Module):
    """flax.nnx.Conv for 2-d inputs, computed by jaxconv.

    Same constructor as ``nnx.Conv`` (minus ``input_dilation``, ``precision`` and the lax hooks)
    plus ``layout``. Parameters: ``kernel`` (KH, KW, in_features // feature_group_count,
    out_features) and ``bias`` (out_features,), drawn from ``rngs.params()`` in Flax's order.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: int | Sequence[int] | None = 1, *, padding: Any = "SAME",
                 kernel_dilation: int | Sequence[int] | None = 1, feature_group_count: int = 1,
                 use_bias: bool = True, mask=None, dtype=None, param_dtype=jnp.float32,
                 kernel_init=default_kernel_init, bias_init=default_bias_init,
                 layout: str = "NHWC", rngs: nnx.Rngs):
        kernel_size = _spatial_pair(kernel_size, "kernel_size")
        if in_features % feature_group_count or out_features % feature_group_count:
            raise ValueError(f"feature_group_count={feature_group_count} must divide in_features="
                             f"{in_features} and out_features={out_features}")
        self.kernel_shape = kernel_size + (in_features // feature_group_count, out_features)
        # Flax draws the kernel key first and the bias key second; so do we, for equal params.
        self.kernel = nnx.Param(kernel_init(rngs.params(), self.kernel_shape, param_dtype))
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
        else:
            self.bias = nnx.data(None)
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.strides = _spatial_pair(strides, "strides")
        self.padding = _conv_padding(padding)
        self.kernel_dilation = _spatial_pair(kernel_dilation, "kernel_dilation")
        self.feature_group_count = feature_group_count
        self.use_bias = use_bias
        self.mask = nnx.data(mask)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.layout = _check_layout(layout)

    def _convolve(self, x, kernel_hwio, bias, **geometry):
        """The convolution itself (a subclass may compute it differently, e.g. with lax)."""
        return _jaxconv_conv(x, kernel_hwio, bias, **geometry)

    def __call__(self, inputs):
        bias = None if self.bias is None else self.bias[...]
        return _apply_conv(
            self._convolve, inputs, self.kernel[...], bias, self.mask, strides=self.strides,
            padding=self.padding, kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count, layout=self.layout,
            promote=lambda *a: _nnx_promote_dtype(a, dtype=self.dtype))


class LinenConv2d(linen.Module):
    """flax.linen.Conv for 2-d inputs, computed by jaxconv (same fields, params and init).

    ``features`` is the number of output channels; the input channels come from the input.
    """
    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] | None = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] | None = 1
    feature_group_count: int = 1
    use_bias: bool = True
    mask: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = default_bias_init
    layout: str = "NHWC"

    @linen.compact
    def __call__(self, inputs):
        layout = _check_layout(self.layout)
        in_features = _channels(inputs.shape, layout)
        if in_features % self.feature_group_count:
            raise ValueError(f"feature_group_count={self.feature_group_count} must divide the "
                             f"input features {in_features}")
        kernel_shape = _spatial_pair(self.kernel_size, "kernel_size") + (
            in_features // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        return _apply_conv(
            _jaxconv_conv, inputs, kernel, bias, self.mask,
            strides=_spatial_pair(self.strides, "strides"), padding=_conv_padding(self.padding),
            kernel_dilation=_spatial_pair(self.kernel_dilation, "kernel_dilation"),
            feature_group_count=self.feature_group_count, layout=layout,
            promote=lambda *a: tuple(_linen_promote_dtype(*a, dtype=self.dtype)))
