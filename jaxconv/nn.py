"""Flax modules whose convolutions and max pooling run on jaxconv's kernels.

Drop-in replacements for Flax's layers (Flax is an optional extra: ``pip install jaxconv[flax]``):

    flax.nnx.Conv(...)            ->  jaxconv.nn.Conv2d(...)         same arguments, params, init
    flax.nnx.max_pool / linen.max_pool  ->  jaxconv.nn.max_pool   (or the MaxPool2d modules)
    flax.nnx.ConvTranspose(...)   ->  jaxconv.nn.ConvTranspose2d(...)
    flax.linen.Conv(...)          ->  jaxconv.nn.LinenConv2d(...)
    flax.linen.ConvTranspose(...) ->  jaxconv.nn.LinenConvTranspose2d(...)
                                      jaxconv.nn.LinenMaxPool2d(...)

The convolution modules create their parameters exactly as Flax does (same names ``kernel`` and
``bias``, kernel in HWIO, same initializers, same order of rng draws), so a model that swaps
``nnx.Conv`` for ``Conv2d`` and is built with the same ``nnx.Rngs`` gets identical parameters
and the same outputs. Inputs are channels-last (NHWC) by default, as in Flax; ``layout="NCHW"``
takes (N, C, H, W) inputs with the same HWIO kernel (transposed for the kernel at call time),
so checkpoints do not depend on the layout.

Differences from Flax: two spatial dims only, so an int ``kernel_size`` means (k, k) here (Flax
would read it as a 1-d kernel); no ``input_dilation`` or unshared weights; ``precision`` only
decides whether a GPU may use TF32 (the CPU always computes in full float32); Conv2d's padding
must be >= 0; integer inputs to pooling are not supported.
"""
from __future__ import annotations

import functools
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

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
import numpy as np

from . import _args
from .conv import conv2d, conv_transpose2d
from .pool import max_pool2d

__all__ = ["Conv2d", "ConvTranspose2d", "MaxPool2d", "LinenConv2d", "LinenConvTranspose2d",
           "LinenMaxPool2d", "max_pool"]

# Flax's defaults (flax.nnx.nn.linear / flax.linen.linear): LeCun-normal kernels, zero biases.
default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()

_PAD_MODES = {"CIRCULAR": "wrap", "REFLECT": "reflect"}
# lax.conv_transpose knows SAME and VALID; Flax adds CIRCULAR (a VALID result folded onto a period).
_TRANSPOSE_PAD_MODES = ("SAME", "VALID", "CIRCULAR")


# ----------------------------------------------------------------------------------------------
# Argument forms shared by the nnx and linen modules.


def _spatial_pair(value: Any, name: str) -> tuple[int, int]:
    """kernel_size / strides / kernel_dilation: an int, a pair, or None (Flax's 'broadcast 1')."""
    return _args.pair(1 if value is None else value, name)


def _conv_padding(padding: Any, *, modes=("SAME", "VALID", "CIRCULAR", "REFLECT"),
                  minimum: int | None = 0):
    """Flax's padding forms -> one of `modes` or ((t, b), (l, r)), each pad >= minimum.

    As flax.nnx.nn.linear.canonicalize_padding: an int p pads every side by p; a length-2
    sequence gives one entry per spatial dim, each an int p (meaning (p, p)) or a (low, high)
    pair. Any other form is a ValueError, as in Flax.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode in modes:
            return mode
        raise ValueError(f"padding must be {', '.join(map(repr, modes))}, an int or two ints / "
                         f"(low, high) pairs, got {padding!r}")
    if _is_int(padding):
        return (_args.pair(padding, "padding", minimum=minimum),) * 2
    if (isinstance(padding, Sequence) and len(padding) == 2
            and all(_is_int(p) or (isinstance(p, (list, tuple)) and len(p) == 2) for p in padding)):
        return tuple(_args.pair(p, "padding", minimum=minimum) for p in padding)
    raise ValueError(f"padding must be a string, an int, or a sequence of 2 entries (one per "
                     f"spatial dim) each an int or a (low, high) pair of ints, got {padding!r}")


def _is_int(value: Any) -> bool:
    """An integer in Flax's sense (bools are not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


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


def _jaxconv_conv(x, kernel_hwio, bias, *, stride, padding, dilation, groups, layout, precision):
    """One jaxconv conv2d with a Flax (HWIO) kernel; the bias is fused into the kernel."""
    w = kernel_hwio if layout == "NHWC" else jnp.transpose(kernel_hwio, (3, 2, 0, 1))  # -> OIHW
    return conv2d(x, w, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                  layout=layout, precision=precision)


def _apply_conv(convolve: Callable, inputs, kernel, bias, mask, *, strides, padding,
                kernel_dilation, feature_group_count, layout, promote, precision):
    """Flax's Conv.__call__ in order: batch dims, wrap/reflect padding, mask, dtype, conv."""
    _args.allow_tf32(precision)  # refuses what lax refuses, also where the output is empty
    x, batch_shape = _flatten_batch(inputs)
    k_eff = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:2], kernel_dilation)]
    if isinstance(padding, str) and padding in _PAD_MODES:
        # As Flax: pad ((k_eff - 1) // 2, k_eff // 2) with the input's own values, then VALID.
        x = _pad_spatial(x, [((k - 1) // 2, k // 2) for k in k_eff], layout,
                         mode=_PAD_MODES[padding])
        padding = "VALID"
    _check_mask(mask, kernel.shape)
    if mask is not None:
        kernel = kernel * mask
    x, kernel, bias = promote(x, kernel, bias)
    if padding != "SAME":
        # lax (and so Flax) gives an empty output where the kernel does not fit the padded input;
        # jaxconv's conv2d refuses that geometry, so the empty result is made here.
        pads = ((0, 0), (0, 0)) if padding == "VALID" else padding
        in_hw = [x.shape[a] for a in _spatial_axes(layout)]
        out_hw = [max((i + lo + hi - k) // s + 1, 0)
                  for i, (lo, hi), k, s in zip(in_hw, pads, k_eff, strides)]
        if min(out_hw) == 0:
            y = jnp.zeros(_act_shape(x.shape[0], kernel.shape[-1], out_hw, layout), x.dtype)
            return _restore_batch(y, batch_shape)
    y = convolve(x, kernel, bias, stride=strides, padding=padding, dilation=kernel_dilation,
                 groups=feature_group_count, layout=layout)
    return _restore_batch(y, batch_shape)


def _check_mask(mask, kernel_shape):
    if mask is not None and tuple(mask.shape) != tuple(kernel_shape):
        raise ValueError(f"mask must have the kernel's shape {tuple(kernel_shape)}, got "
                         f"{tuple(mask.shape)}")


def _act_shape(n: int, c: int, hw: Sequence[int], layout: str) -> tuple[int, ...]:
    return (n, c, *hw) if layout == "NCHW" else (n, *hw, c)


def _lax_transpose_pads(k_eff: int, stride: int, padding: str) -> tuple[int, int]:
    """The (low, high) padding that lax.conv_transpose (and so Flax) puts around the
    stride-dilated input for one spatial dim, as lax's _conv_transpose_padding computes it:
    'SAME' and 'VALID' describe the forward convolution whose shape change this inverts."""
    if padding == "SAME":
        total = k_eff + stride - 2
        low = k_eff - 1 if stride > k_eff - 1 else -(-total // 2)
    elif padding == "VALID":
        total = k_eff + stride - 2 + max(k_eff - stride, 0)
        low = k_eff - 1
    else:
        raise ValueError(f"padding must be 'SAME' or 'VALID' here, got {padding!r}")
    return low, total - low


def _apply_conv_transpose(inputs, kernel, bias, mask, *, strides, padding, kernel_dilation,
                          transpose_kernel: bool, layout: str, promote, precision):
    """Flax's ConvTranspose.__call__ on jaxconv's conv_transpose2d.

    lax.conv_transpose correlates the stride-dilated input, padded by (lo, hi), with the kernel
    as stored: y = conv(dilate_s(x), K, pads (lo, hi), rhs_dilation d). jaxconv's
    conv_transpose2d is PyTorch's, the adjoint of a convolution: it correlates the same dilated
    input padded by (k_eff - 1 - p_lo, k_eff - 1 - p_hi) with the kernel flipped spatially and
    its channel axes swapped. So p = k_eff - 1 - lax pad, and the jaxconv kernel (KH, KW, O, I)
    is K flipped and swapped, which is K itself with transpose_kernel=True. Where lax pads more
    than k_eff - 1 the extra output rows see only zeros: they are added here as zeros (+ bias).
    """
    _args.allow_tf32(precision)  # refuses what lax refuses, also where the output is empty
    x, batch_shape = _flatten_batch(inputs)
    _check_mask(mask, kernel.shape)
    if mask is not None:
        kernel = kernel * mask
    x, kernel, bias = promote(x, kernel, bias)
    if not transpose_kernel:
        kernel = jnp.swapaxes(jnp.flip(kernel, (0, 1)), 2, 3)  # (KH, KW, I, O) -> (KH, KW, O, I)
    k_eff = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:2], kernel_dilation)]
    if isinstance(padding, str):
        mode = "VALID" if padding == "CIRCULAR" else padding
        lax_pads = [_lax_transpose_pads(k, s, mode) for k, s in zip(k_eff, strides)]
    else:
        lax_pads = list(padding)
    in_hw = [x.shape[a] for a in _spatial_axes(layout)]
    out_hw = [max((i - 1) * s + lo + hi - k + 2, 0)
              for i, s, (lo, hi), k in zip(in_hw, strides, lax_pads, k_eff)]
    torch_pads = [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(k_eff, lax_pads)]
    extra = [(max(-lo, 0), max(-hi, 0)) for lo, hi in torch_pads]  # output rows of zeros
    torch_pads = tuple((max(lo, 0), max(hi, 0)) for lo, hi in torch_pads)
    inner_hw = [o - lo - hi for o, (lo, hi) in zip(out_hw, extra)]
    out_features = kernel.shape[2]
    # The bias is fused into the kernel unless output rows are added around the kernel's result
    # or, as in Flax, the CIRCULAR fold follows (the bias goes on after the fold).
    fuse_bias = not any(map(any, extra)) and padding != "CIRCULAR"
    if min(inner_hw) < 1:  # every output row only sees padding (or there is no output at all)
        y = jnp.zeros(_act_shape(x.shape[0], out_features, out_hw, layout), x.dtype)
    else:
        w = kernel if layout == "NHWC" else jnp.transpose(kernel, (3, 2, 0, 1))  # -> (I, O, KH, KW)
        y = conv_transpose2d(x, w, bias if fuse_bias else None, stride=strides,
                             padding=torch_pads, dilation=kernel_dilation, layout=layout,
                             precision=precision)
        y = _pad_spatial(y, extra, layout)
    if padding == "CIRCULAR":
        y = _wrap_circular(y, in_hw, strides, transpose_kernel, layout)
    if bias is not None and not (fuse_bias and min(inner_hw) >= 1):
        y = y + _channel_vector(bias, layout)
    return _restore_batch(y, batch_shape)


def _channel_vector(bias, layout: str):
    """A (C,) bias shaped to broadcast against a 4-d activation."""
    return bias.reshape((-1, 1, 1) if layout == "NCHW" else (-1,))


def _wrap_circular(y, in_hw, strides, transpose_kernel: bool, layout: str):
    """Flax's CIRCULAR transposed convolution: the VALID output folded onto a period of
    in * stride per spatial dim (linen/nnx ConvTranspose, same alignment of the odd row)."""
    periods = [i * s for i, s in zip(in_hw, strides)]
    axes = _spatial_axes(layout)
    # Pad each dim to twice its period; the odd row goes after with transpose_kernel, as in Flax.
    diffs = [-(y.shape[a] - p) % (2 * p) for a, p in zip(axes, periods)]
    pads = [(d // 2, (d + 1) // 2) if transpose_kernel else ((d + 1) // 2, d // 2) for d in diffs]
    y = _pad_spatial(y, pads, layout)
    for axis, period in zip(axes, periods):
        y = y.reshape(y.shape[:axis] + (-1, period) + y.shape[axis + 1:]).sum(axis=axis)
    return y


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

    Same constructor as ``nnx.Conv`` (minus ``input_dilation`` and the lax hooks; ``precision``
    as lax's, see conv2d) plus
    ``layout``; ``kernel_metadata`` / ``bias_metadata`` annotate the parameters as in Flax. Parameters: ``kernel`` (KH, KW, in_features // feature_group_count,
    out_features) and ``bias`` (out_features,), drawn from ``rngs.params()`` in Flax's order.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: int | Sequence[int] | None = 1, *, padding: Any = "SAME",
                 kernel_dilation: int | Sequence[int] | None = 1, feature_group_count: int = 1,
                 use_bias: bool = True, mask=None, dtype=None, param_dtype=jnp.float32,
                 precision: Any = None, kernel_init=default_kernel_init,
                 bias_init=default_bias_init, layout: str = "NHWC", rngs: nnx.Rngs,
                 kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
                 bias_metadata: Mapping[str, Any] = MappingProxyType({})):
        kernel_size = _spatial_pair(kernel_size, "kernel_size")
        if in_features % feature_group_count or out_features % feature_group_count:
            raise ValueError(f"feature_group_count={feature_group_count} must divide in_features="
                             f"{in_features} and out_features={out_features}")
        self.kernel_shape = kernel_size + (in_features // feature_group_count, out_features)
        # Flax draws the kernel key first and the bias key second; so do we, for equal params.
        # The metadata (e.g. sharding annotations) goes on the nnx.Param as in nnx.Conv.
        self.kernel, self.bias = _make_params(rngs, self.kernel_shape, out_features, use_bias,
                                              param_dtype, kernel_init, bias_init,
                                              kernel_metadata, bias_metadata)
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
        self.precision = precision
        self.layout = _check_layout(layout)

    def _convolve(self, x, kernel_hwio, bias, **geometry):
        """The convolution itself (a subclass may compute it differently, e.g. with lax)."""
        return _jaxconv_conv(x, kernel_hwio, bias, precision=self.precision, **geometry)

    def __call__(self, inputs):
        bias = None if self.bias is None else self.bias[...]
        return _apply_conv(
            self._convolve, inputs, self.kernel[...], bias, self.mask, strides=self.strides,
            padding=self.padding, kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count, layout=self.layout,
            promote=lambda *a: _nnx_promote_dtype(a, dtype=self.dtype), precision=self.precision)


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
    precision: Any = None
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
            functools.partial(_jaxconv_conv, precision=self.precision), inputs, kernel, bias,
            self.mask,
            strides=_spatial_pair(self.strides, "strides"), padding=_conv_padding(self.padding),
            kernel_dilation=_spatial_pair(self.kernel_dilation, "kernel_dilation"),
            feature_group_count=self.feature_group_count, layout=layout,
            promote=lambda *a: tuple(_linen_promote_dtype(*a, dtype=self.dtype)),
            precision=self.precision)


def _make_params(rngs, kernel_shape, out_features, use_bias, param_dtype, kernel_init,
                 bias_init, kernel_metadata, bias_metadata):
    """nnx's kernel and bias Params, drawn in Flax's order (kernel key first, then bias)."""
    kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape, param_dtype), **kernel_metadata)
    if not use_bias:
        return kernel, nnx.data(None)
    return kernel, nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype),
                             **bias_metadata)


def _check_preferred_element_type(value):
    if value is not None:
        raise ValueError("jaxconv computes in the input dtype: preferred_element_type must be "
                         f"None, got {value!r}")


class ConvTranspose2d(nnx.Module):
    """flax.nnx.ConvTranspose for 2-d inputs, computed by jaxconv's conv_transpose2d.

    Same constructor, parameters (``kernel`` (KH, KW, in_features, out_features), or
    (KH, KW, out_features, in_features) with ``transpose_kernel=True``; ``bias``
    (out_features,)), initialization and output as ``nnx.ConvTranspose``, including its padding
    meaning (lax.conv_transpose's, not PyTorch's: 'SAME', 'VALID', 'CIRCULAR', an int or per-dim
    ints / (low, high) pairs), plus ``layout``. ``preferred_element_type`` must be None.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: int | Sequence[int] | None = None, *, padding: Any = "SAME",
                 kernel_dilation: int | Sequence[int] | None = None, use_bias: bool = True,
                 mask=None, dtype=None, param_dtype=jnp.float32, precision: Any = None,
                 kernel_init=default_kernel_init, bias_init=default_bias_init,
                 transpose_kernel: bool = False, promote_dtype=_nnx_promote_dtype,
                 preferred_element_type=None, layout: str = "NHWC", rngs: nnx.Rngs,
                 kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
                 bias_metadata: Mapping[str, Any] = MappingProxyType({})):
        _check_preferred_element_type(preferred_element_type)
        kernel_size = _spatial_pair(kernel_size, "kernel_size")
        channels = (out_features, in_features) if transpose_kernel else (in_features, out_features)
        self.kernel_shape = kernel_size + channels
        self.kernel, self.bias = _make_params(rngs, self.kernel_shape, out_features, use_bias,
                                              param_dtype, kernel_init, bias_init,
                                              kernel_metadata, bias_metadata)
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.strides = _spatial_pair(strides, "strides")
        self.padding = _conv_padding(padding, modes=_TRANSPOSE_PAD_MODES, minimum=None)
        self.kernel_dilation = _spatial_pair(kernel_dilation, "kernel_dilation")
        self.use_bias = use_bias
        self.mask = nnx.data(mask)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.transpose_kernel = _args.flag(transpose_kernel, "transpose_kernel")
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type
        self.layout = _check_layout(layout)

    def __call__(self, inputs):
        bias = None if self.bias is None else self.bias[...]
        return _apply_conv_transpose(
            inputs, self.kernel[...], bias, self.mask, strides=self.strides,
            padding=self.padding, kernel_dilation=self.kernel_dilation,
            transpose_kernel=self.transpose_kernel, layout=self.layout,
            promote=lambda *a: self.promote_dtype(a, dtype=self.dtype), precision=self.precision)


class LinenConvTranspose2d(linen.Module):
    """flax.linen.ConvTranspose for 2-d inputs, computed by jaxconv (same fields, params, init
    and output; see :class:`ConvTranspose2d` for the padding meaning), plus ``layout``."""
    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] | None = None
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] | None = None
    use_bias: bool = True
    mask: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = default_bias_init
    transpose_kernel: bool = False
    promote_dtype: Callable = _linen_promote_dtype
    preferred_element_type: Any = None
    layout: str = "NHWC"

    @linen.compact
    def __call__(self, inputs):
        _check_preferred_element_type(self.preferred_element_type)
        layout = _check_layout(self.layout)
        in_features = _channels(inputs.shape, layout)
        channels = ((self.features, in_features) if self.transpose_kernel
                    else (in_features, self.features))
        kernel_shape = _spatial_pair(self.kernel_size, "kernel_size") + channels
        _check_mask(self.mask, kernel_shape)  # before creating params, as Flax
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        return _apply_conv_transpose(
            inputs, kernel, bias, self.mask, strides=_spatial_pair(self.strides, "strides"),
            padding=_conv_padding(self.padding, modes=_TRANSPOSE_PAD_MODES, minimum=None),
            kernel_dilation=_spatial_pair(self.kernel_dilation, "kernel_dilation"),
            transpose_kernel=_args.flag(self.transpose_kernel, "transpose_kernel"),
            layout=layout,
            promote=lambda *a: tuple(self.promote_dtype(*a, dtype=self.dtype)),
            precision=self.precision)
