"""The machinery behind jaxconv.nn: Flax's argument forms and Flax's Conv / ConvTranspose
__call__ steps (batch dims, wrap/reflect/circular padding, mask, dtype promotion), computed with
jaxconv's conv2d / conv_transpose2d. The modules in jaxconv.nn and jaxconv.nn.linen are thin
shells over these functions, so nnx and linen behave the same by construction."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import initializers

from .. import _args
from .._args import IntPair, LayoutName, PrecisionLike
from ..conv import conv2d, conv_transpose2d

Array = jax.Array

# Flax's defaults (flax.nnx.nn.linear / flax.linen.linear): LeCun-normal kernels, zero biases.
default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()

_PAD_MODES = {"CIRCULAR": "wrap", "REFLECT": "reflect"}
# lax.conv_transpose knows SAME and VALID; Flax adds CIRCULAR (a VALID result folded onto a period).
TRANSPOSE_PAD_MODES = ("SAME", "VALID", "CIRCULAR")


# ----------------------------------------------------------------------------------------------
# Argument forms shared by the nnx and linen modules.


def spatial_pair(value: Any, name: str) -> tuple[int, int]:
    """kernel_size / strides / kernel_dilation: an int, a pair, or None (Flax's 'broadcast 1')."""
    return _args.pair(1 if value is None else value, name)


def conv_padding(
    padding: Any,
    *,
    modes: Sequence[str] = ("SAME", "VALID", "CIRCULAR", "REFLECT"),
    minimum: int | None = 0,
) -> str | tuple[tuple[int, int], ...]:
    """Flax's padding forms -> one of `modes` or ((t, b), (l, r)), each pad >= minimum.

    As flax.nnx.nn.linear.canonicalize_padding: an int p pads every side by p; a length-2
    sequence gives one entry per spatial dim, each an int p (meaning (p, p)) or a (low, high)
    pair. Any other form is a ValueError, as in Flax.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode in modes:
            return mode
        raise ValueError(
            f"padding must be {', '.join(map(repr, modes))}, an int or two ints / "
            f"(low, high) pairs, got {padding!r}"
        )
    if _is_int(padding):
        return (_args.pair(padding, "padding", minimum=minimum),) * 2
    if (
        isinstance(padding, Sequence)
        and len(padding) == 2
        and all(_is_int(p) or (isinstance(p, (list, tuple)) and len(p) == 2) for p in padding)
    ):
        return tuple(_args.pair(p, "padding", minimum=minimum) for p in padding)
    raise ValueError(
        f"padding must be a string, an int, or a sequence of 2 entries (one per "
        f"spatial dim) each an int or a (low, high) pair of ints, got {padding!r}"
    )


def _is_int(value: Any) -> bool:
    """An integer in Flax's sense (bools are not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def flatten_batch(x: Array, spatial_and_features: int = 3) -> tuple[Array, tuple[int, ...]]:
    """Flax convention: any number of leading batch dims (even none) -> exactly one."""
    batch_shape = x.shape[: x.ndim - spatial_and_features]
    return x.reshape((-1,) + x.shape[x.ndim - spatial_and_features :]), batch_shape


def restore_batch(y: Array, batch_shape: tuple[int, ...]) -> Array:
    return y.reshape(batch_shape + y.shape[1:])


def spatial_axes(layout: str) -> tuple[int, int]:
    return (2, 3) if layout == "NCHW" else (1, 2)


def pad_spatial(x: Array, pads: Sequence[tuple[int, int]], layout: str, **pad_kwargs: Any) -> Array:
    widths = [(0, 0)] * 4
    for axis, pad in zip(spatial_axes(layout), pads):
        widths[axis] = pad
    return jnp.pad(x, widths, **pad_kwargs)


def check_layout(layout: Any) -> LayoutName:
    """The `layout` argument, validated, as 'NCHW' or 'NHWC'."""
    return "NCHW" if _args.layout_code(layout) == _args.Layout.NCHW else "NHWC"


def channels(x_shape: Sequence[int], layout: str) -> int:
    return x_shape[-3] if layout == "NCHW" else x_shape[-1]


def jaxconv_conv(
    x: Array,
    kernel_hwio: Array,
    bias: Array | None,
    *,
    stride: IntPair,
    padding: Any,
    dilation: IntPair,
    groups: int,
    layout: LayoutName,
    precision: PrecisionLike,
) -> Array:
    """One jaxconv conv2d with a Flax (HWIO) kernel; the bias is fused into the kernel."""
    w = kernel_hwio if layout == "NHWC" else jnp.transpose(kernel_hwio, (3, 2, 0, 1))  # -> OIHW
    return conv2d(
        x,
        w,
        bias,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        layout=layout,
        precision=precision,
    )


def apply_conv(
    convolve: Callable[..., Array],
    inputs: Array,
    kernel: Array,
    bias: Array | None,
    mask: Any,
    *,
    strides: tuple[int, int],
    padding: Any,
    kernel_dilation: tuple[int, int],
    feature_group_count: int,
    layout: LayoutName,
    promote: Callable,
    precision: PrecisionLike,
) -> Array:
    """Flax's Conv.__call__ in order: batch dims, wrap/reflect padding, mask, dtype, conv."""
    _args.allow_tf32(precision)  # refuses what lax refuses, also where the output is empty
    x, batch_shape = flatten_batch(inputs)
    k_eff = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:2], kernel_dilation)]
    if isinstance(padding, str) and padding in _PAD_MODES:
        # As Flax: pad ((k_eff - 1) // 2, k_eff // 2) with the input's own values, then VALID.
        x = pad_spatial(
            x, [((k - 1) // 2, k // 2) for k in k_eff], layout, mode=_PAD_MODES[padding]
        )
        padding = "VALID"
    check_mask(mask, kernel.shape)
    if mask is not None:
        kernel = kernel * mask
    x, kernel, bias = promote(x, kernel, bias)
    if padding != "SAME":
        # lax (and so Flax) gives an empty output where the kernel does not fit the padded input;
        # jaxconv's conv2d refuses that geometry, so the empty result is made here.
        pads = ((0, 0), (0, 0)) if padding == "VALID" else padding
        in_hw = [x.shape[a] for a in spatial_axes(layout)]
        out_hw = [
            max((i + lo + hi - k) // s + 1, 0)
            for i, (lo, hi), k, s in zip(in_hw, pads, k_eff, strides)
        ]
        if min(out_hw) == 0:
            y = jnp.zeros(_act_shape(x.shape[0], kernel.shape[-1], out_hw, layout), x.dtype)
            return restore_batch(y, batch_shape)
    y = convolve(
        x,
        kernel,
        bias,
        stride=strides,
        padding=padding,
        dilation=kernel_dilation,
        groups=feature_group_count,
        layout=layout,
    )
    return restore_batch(y, batch_shape)


def check_mask(mask: Any, kernel_shape: Sequence[int]) -> None:
    if mask is not None and tuple(mask.shape) != tuple(kernel_shape):
        raise ValueError(
            f"mask must have the kernel's shape {tuple(kernel_shape)}, got {tuple(mask.shape)}"
        )


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


def apply_conv_transpose(
    inputs: Array,
    kernel: Array,
    bias: Array | None,
    mask: Any,
    *,
    strides: tuple[int, int],
    padding: Any,
    kernel_dilation: tuple[int, int],
    transpose_kernel: bool,
    layout: LayoutName,
    promote: Callable,
    precision: PrecisionLike,
) -> Array:
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
    x, batch_shape = flatten_batch(inputs)
    check_mask(mask, kernel.shape)
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
    in_hw = [x.shape[a] for a in spatial_axes(layout)]
    out_hw = [
        max((i - 1) * s + lo + hi - k + 2, 0)
        for i, s, (lo, hi), k in zip(in_hw, strides, lax_pads, k_eff)
    ]
    signed_pads = [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(k_eff, lax_pads)]
    extra = [(max(-lo, 0), max(-hi, 0)) for lo, hi in signed_pads]  # output rows of zeros
    torch_pads = tuple((max(lo, 0), max(hi, 0)) for lo, hi in signed_pads)
    inner_hw = [o - lo - hi for o, (lo, hi) in zip(out_hw, extra)]
    out_features = kernel.shape[2]
    # The bias is fused into the kernel unless output rows are added around the kernel's result
    # or, as in Flax, the CIRCULAR fold follows (the bias goes on after the fold).
    fuse_bias = not any(map(any, extra)) and padding != "CIRCULAR"
    if min(inner_hw) < 1:  # every output row only sees padding (or there is no output at all)
        y = jnp.zeros(_act_shape(x.shape[0], out_features, out_hw, layout), x.dtype)
    else:
        w = kernel if layout == "NHWC" else jnp.transpose(kernel, (3, 2, 0, 1))  # -> (I, O, KH, KW)
        y = conv_transpose2d(
            x,
            w,
            bias if fuse_bias else None,
            stride=strides,
            padding=torch_pads,
            dilation=kernel_dilation,
            layout=layout,
            precision=precision,
        )
        y = pad_spatial(y, extra, layout)
    if padding == "CIRCULAR":
        y = _wrap_circular(y, in_hw, strides, transpose_kernel, layout)
    if bias is not None and not (fuse_bias and min(inner_hw) >= 1):
        y = y + _channel_vector(bias, layout)
    return restore_batch(y, batch_shape)


def _channel_vector(bias: Array, layout: str) -> Array:
    """A (C,) bias shaped to broadcast against a 4-d activation."""
    return bias.reshape((-1, 1, 1) if layout == "NCHW" else (-1,))


def _wrap_circular(
    y: Array, in_hw: Sequence[int], strides: Sequence[int], transpose_kernel: bool, layout: str
) -> Array:
    """Flax's CIRCULAR transposed convolution: the VALID output folded onto a period of
    in * stride per spatial dim (linen/nnx ConvTranspose, same alignment of the odd row)."""
    periods = [i * s for i, s in zip(in_hw, strides)]
    axes = spatial_axes(layout)
    # Pad each dim to twice its period; the odd row goes after with transpose_kernel, as in Flax.
    diffs = [-(y.shape[a] - p) % (2 * p) for a, p in zip(axes, periods)]
    pads = [(d // 2, (d + 1) // 2) if transpose_kernel else ((d + 1) // 2, d // 2) for d in diffs]
    y = pad_spatial(y, pads, layout)
    for axis, period in zip(axes, periods):
        y = y.reshape(y.shape[:axis] + (-1, period) + y.shape[axis + 1 :]).sum(axis=axis)
    return y


def make_params(
    rngs: nnx.Rngs,
    kernel_shape: tuple[int, ...],
    out_features: int,
    use_bias: bool,
    param_dtype: Any,
    kernel_init: Callable,
    bias_init: Callable,
    kernel_metadata: Mapping[str, Any],
    bias_metadata: Mapping[str, Any],
) -> tuple[nnx.Param, Any]:
    """nnx's kernel and bias Params, drawn in Flax's order (kernel key first, then bias)."""
    kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape, param_dtype), **kernel_metadata)
    if not use_bias:
        return kernel, nnx.data(None)
    return kernel, nnx.Param(
        bias_init(rngs.params(), (out_features,), param_dtype), **bias_metadata
    )


def check_preferred_element_type(value: Any) -> None:
    if value is not None:
        raise ValueError(
            "jaxconv computes in the input dtype: preferred_element_type must be "
            f"None, got {value!r}"
        )
