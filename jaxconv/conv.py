"""conv2d and conv_transpose2d: argument normalization, primitives and custom_vjp rules.

Three kernels describe one convolution y = x (*) w from its three ends:

    fwd(x, w) -> y        bwd_data(dy, w) -> dx        bwd_filter(x, dy) -> dw

and they are closed under differentiation, so each is a custom_vjp whose rules call the others:

    y  = fwd(x, w):        dx = bwd_data(g, w),    dw = bwd_filter(x, g)
    dx = bwd_data(dy, w):  ddy = fwd(g, w),        dw = bwd_filter(g, dy)
    dw = bwd_filter(x, dy): dx = bwd_data(dy, g),  ddy = fwd(x, g)

Gradients of any order therefore come out of the same three kernels. A transposed convolution
is bwd_data of the convolution that it inverts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _args
from ._args import (
    ConvGeometry,
    IntPair,
    Layout,
    LayoutName,
    PaddingLike,
    PrecisionLike,
    act_channel_axis,
    act_dims,
    act_shape,
    weight_dims,
    weight_out_axis,
    weight_shape,
)
from ._primitive import NOT_MAPPED, Kernel, batch_over_n, batch_size, make_kernel, to_front
from ._sharding import Split, match_vma, out_aval

Array = jax.Array
Aval = Any  # a jax.core.ShapedArray: an operand's shape and dtype during abstract evaluation
Dims = Sequence[int | None]  # where vmap maps each operand (None: not mapped)

# ----------------------------------------------------------------------------------------------
# Public API.


def conv2d(
    x: ArrayLike,
    w: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    stride: IntPair = 1,
    padding: PaddingLike = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    layout: LayoutName = "NCHW",
    precision: PrecisionLike = None,
) -> jax.Array:
    """2-d convolution (cross-correlation), PyTorch's ``conv2d`` computed by jaxconv's kernels.

    The result equals ``lax.conv_general_dilated(x, w, stride, pads, rhs_dilation=dilation,
    feature_group_count=groups)`` with the same layout, up to floating-point rounding (the
    kernels add in another order than XLA's). It is a ``jax.custom_vjp`` whose rules call
    jaxconv's own backward kernels, so it works under ``jit``, ``grad`` (reverse mode, any
    order), ``vmap`` (one kernel call, also with per-example weights), ``jax.checkpoint``,
    ``lax.scan``, batch sharding and ``jax.export`` (with :func:`export_safety_checks`).
    Forward mode (``jvp``, ``jacfwd``) is not supported, as for any ``custom_vjp``.

    Args:
      x: the input, ``(N, C, H, W)`` for ``layout="NCHW"`` or ``(N, H, W, C)`` for ``"NHWC"``;
        a 3-d ``(C, H, W)`` / ``(H, W, C)`` is one example without its batch axis (as in
        PyTorch) and gives a 3-d result. float32, float64, float16 or bfloat16.
      w: the filters, ``(O, C // groups, KH, KW)`` (OIHW) for ``"NCHW"`` or
        ``(KH, KW, C // groups, O)`` (HWIO, Flax's kernel) for ``"NHWC"``; x's dtype.
      bias: ``None`` or ``(O,)`` in x's dtype, added to every output position (fused into the
        kernel's epilogue).
      stride: an int or ``(sh, sw)``, each >= 1.
      padding: an int, ``(ph, pw)``, ``((top, bottom), (left, right))`` (each >= 0), or
        ``"SAME"`` / ``"VALID"`` (any case) with lax's meaning: SAME gives
        ``ceil(H / stride)`` rows, the odd padding row at the bottom/right.
      dilation: the kernel dilation, an int or ``(dh, dw)``, each >= 1.
      groups: the number of groups (PyTorch's ``groups``, lax's ``feature_group_count``);
        it must divide C and O. ``groups == C`` is a depthwise convolution.
      layout: ``"NCHW"`` or ``"NHWC"`` (any case): where the channels of x and of the result
        are, and with them w's form (OIHW or HWIO).
      precision: lax's ``precision``: ``None``, a string (``"default"``, ``"high"``,
        ``"highest"``, ``"tensorfloat32"``, ``"float32"``, ...), a ``lax.Precision`` or a pair
        of them. It only decides whether a GPU may multiply float32 operands on TF32 tensor
        cores: allowed for DEFAULT and HIGH, never for HIGHEST; ``None`` follows
        ``jax.default_matmul_precision``. The CPU always computes in full float32.

    Returns:
      ``(N, O, OH, OW)`` for NCHW, ``(N, OH, OW, O)`` for NHWC (3-d for a 3-d x), in x's dtype,
      with ``OH = (H + top + bottom - dilation * (KH - 1) - 1) // stride + 1`` (OW alike).
      float16 and bfloat16 accumulate in float32.

    Raises:
      ValueError: at trace time (also under ``jit``, before anything runs), naming the
        argument and its values: a rank other than 4 (3 for x), an unknown layout or precision,
        channels of w that do not match x and ``groups``, a bias of another shape, a stride or
        dilation < 1, a negative padding or one of another form, an empty kernel or input, an
        output size < 1, an integer beyond int32.
      TypeError: at trace time: a dtype other than the four floating types, x, w and bias of
        different dtypes, a non-integer (or bool) where an int is expected.

    Results are deterministic: no atomics, partial sums added in a fixed order, so the same
    call on the same build and machine gives the same bits (see docs/design.md, "Determinism").
    An empty batch (N = 0) or O = 0 gives an empty result without launching a kernel.
    """
    if _args.unbatched(x):
        return _args.drop_batch_axis(
            conv2d(
                _args.add_batch_axis(x),
                w,
                bias,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                layout=layout,
                precision=precision,
            )
        )
    geom = _args.conv2d_geometry(
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
    return conv2d_fwd(*_operands(x, w, bias), geom)


def conv_transpose2d(
    x: ArrayLike,
    w: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    stride: IntPair = 1,
    padding: IntPair | Sequence[Sequence[int]] = 0,
    output_padding: IntPair = 0,
    groups: int = 1,
    dilation: IntPair = 1,
    layout: LayoutName = "NCHW",
    precision: PrecisionLike = None,
) -> jax.Array:
    """Transposed 2-d convolution with PyTorch's ``conv_transpose2d`` semantics.

    It is the gradient of :func:`conv2d` with respect to its input: conv_transpose2d with
    stride s, padding p and dilation d maps a conv2d's output shape back to its input shape.
    Computed by the same kernel as conv2d's input gradient, with conv2d's transformation
    support (``jit``, reverse-mode ``grad`` of any order, ``vmap``, sharding, export). Unlike
    ``lax.conv_transpose``, ``padding`` is PyTorch's (the padding of the convolution that this
    inverts) and w is PyTorch's ``(C_in, C_out // groups, KH, KW)``, not flipped.

    Args:
      x: the input, ``(N, C_in, H, W)`` for ``"NCHW"`` or ``(N, H, W, C_in)`` for ``"NHWC"``
        (3-d: one example without its batch axis). float32, float64, float16 or bfloat16.
      w: ``(C_in, C_out // groups, KH, KW)`` for ``"NCHW"`` or ``(KH, KW, C_out // groups,
        C_in)`` for ``"NHWC"``; x's dtype.
      bias: ``None`` or ``(C_out,)`` in x's dtype.
      stride: an int or ``(sh, sw)``, each >= 1.
      padding: an int, ``(ph, pw)`` or ``((top, bottom), (left, right))``, each >= 0: the
        padding of the inverted convolution, removed from the result's border. No strings.
      output_padding: an int or ``(oh, ow)``, each >= 0 and smaller than stride or dilation:
        extra rows / columns at the bottom / right that select among the input sizes that a
        strided convolution maps to the same output size.
      groups: the number of groups; it must divide C_in.
      dilation: the kernel dilation, an int or ``(dh, dw)``, each >= 1.
      layout: ``"NCHW"`` or ``"NHWC"`` (any case).
      precision: as in :func:`conv2d`.

    Returns:
      ``(N, C_out, OH, OW)`` (or NHWC, or 3-d for a 3-d x) in x's dtype, with
      ``OH = (H - 1) * stride - top - bottom + dilation * (KH - 1) + output_padding + 1``.

    Raises:
      ValueError: at trace time, naming the argument and its values: as :func:`conv2d`, and
        w's C_in not matching x's channels, an ``output_padding`` not smaller than stride or
        dilation, a string padding, an output size < 1.
      TypeError: at trace time: dtypes, as :func:`conv2d`.

    Deterministic as :func:`conv2d`.
    """
    if _args.unbatched(x):
        return _args.drop_batch_axis(
            conv_transpose2d(
                _args.add_batch_axis(x),
                w,
                bias,
                stride=stride,
                padding=padding,
                output_padding=output_padding,
                groups=groups,
                dilation=dilation,
                layout=layout,
                precision=precision,
            )
        )
    geom = _args.conv_transpose2d_geometry(
        x,
        w,
        bias,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        groups=groups,
        dilation=dilation,
        layout=layout,
        precision=precision,
    )
    return conv2d_bwd_data(*_operands(x, w, bias), geom)


def _operands(
    x: ArrayLike, w: ArrayLike, bias: ArrayLike | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The validated operands as arrays, the missing bias as an empty one.

    match_vma outside the custom_vjp: in shard_map a replicated w meeting a sharded x is cast to
    varying here, and AD turns that cast into the psum of the per-shard gradients of w."""
    x, w = jnp.asarray(x), jnp.asarray(w)
    return match_vma(x, w, _no_bias(x.dtype) if bias is None else jnp.asarray(bias))


# ----------------------------------------------------------------------------------------------
# The three custom_vjp functions.


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv2d_fwd(x: Array, w: Array, b: Array, geom: ConvGeometry) -> Array:
    return conv2d_fwd_kernel(x, w, b, geom=geom)


def _conv2d_fwd_vjp_fwd(
    x: Array, w: Array, b: Array, geom: ConvGeometry
) -> tuple[Array, tuple[Array, Array, Array]]:
    return conv2d_fwd(x, w, b, geom), (x, w, b)


def _conv2d_fwd_vjp_bwd(
    geom: ConvGeometry, res: tuple[Array, Array, Array], g: Array
) -> tuple[Array, Array, Array]:
    x, w, b = res
    return (
        conv2d_bwd_data(g, w, _no_bias(g.dtype), geom),
        conv2d_bwd_filter(x, g, geom),
        _bias_grad(g, b, geom.layout),
    )


conv2d_fwd.defvjp(_conv2d_fwd_vjp_fwd, _conv2d_fwd_vjp_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv2d_bwd_data(dy: Array, w: Array, b: Array, geom: ConvGeometry) -> Array:
    return conv2d_bwd_data_kernel(dy, w, b, geom=geom)


def _conv2d_bwd_data_vjp_fwd(
    dy: Array, w: Array, b: Array, geom: ConvGeometry
) -> tuple[Array, tuple[Array, Array, Array]]:
    return conv2d_bwd_data(dy, w, b, geom), (dy, w, b)


def _conv2d_bwd_data_vjp_bwd(
    geom: ConvGeometry, res: tuple[Array, Array, Array], g: Array
) -> tuple[Array, Array, Array]:
    dy, w, b = res
    return (
        conv2d_fwd(g, w, _no_bias(g.dtype), geom),
        conv2d_bwd_filter(g, dy, geom),
        _bias_grad(g, b, geom.layout),
    )


conv2d_bwd_data.defvjp(_conv2d_bwd_data_vjp_fwd, _conv2d_bwd_data_vjp_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_bwd_filter(x: Array, dy: Array, geom: ConvGeometry) -> Array:
    return conv2d_bwd_filter_kernel(x, dy, geom=geom)


def _conv2d_bwd_filter_vjp_fwd(
    x: Array, dy: Array, geom: ConvGeometry
) -> tuple[Array, tuple[Array, Array]]:
    return conv2d_bwd_filter(x, dy, geom), (x, dy)


def _conv2d_bwd_filter_vjp_bwd(
    geom: ConvGeometry, res: tuple[Array, Array], g: Array
) -> tuple[Array, Array]:
    x, dy = res
    return (
        conv2d_bwd_data(dy, g, _no_bias(g.dtype), geom),
        conv2d_fwd(x, g, _no_bias(g.dtype), geom),
    )


conv2d_bwd_filter.defvjp(_conv2d_bwd_filter_vjp_fwd, _conv2d_bwd_filter_vjp_bwd)


# ----------------------------------------------------------------------------------------------
# Abstract evaluation: output shapes from operand shapes and the geometry.


def _fwd_abstract(x: Aval, w: Aval, b: Aval, *, geom: ConvGeometry) -> Aval:
    n = act_dims(x.shape, geom.layout)[0]
    o = weight_dims(w.shape, geom.layout)[0]
    return out_aval(x, act_shape(n, o, *geom.out_hw, geom.layout), x.dtype, batched=True)


def _bwd_data_abstract(dy: Aval, w: Aval, b: Aval, *, geom: ConvGeometry) -> Aval:
    n = act_dims(dy.shape, geom.layout)[0]
    i = weight_dims(w.shape, geom.layout)[1]
    return out_aval(
        dy, act_shape(n, i * geom.groups, *geom.in_hw, geom.layout), dy.dtype, batched=True
    )


def _bwd_filter_abstract(x: Aval, dy: Aval, *, geom: ConvGeometry) -> Aval:
    c = act_dims(x.shape, geom.layout)[1]
    o = act_dims(dy.shape, geom.layout)[1]
    return out_aval(
        x, weight_shape(o, c // geom.groups, *geom.kernel_hw, geom.layout), x.dtype, batched=False
    )


# ----------------------------------------------------------------------------------------------
# Batching. vmap over activations only folds the mapped axis into N (one launch). vmap over the
# weights too uses the grouped-convolution trick: example b's channels become groups
# b*G .. b*G + G-1 of one convolution with B*G groups, so per-example weights still run as a
# single launch. Activations: (B, N, C, H, W) -> (N, B*C, H, W) (NCHW) or (N, H, W, B*C) (NHWC).
# An unmapped x meeting mapped weights (a batch of models on one batch of data) is broadcast
# into the groups too. Stacking the models' filters as extra output channels instead would
# spare that copy, but only the first layer has an unmapped input, and with the examples kept
# in whole groups the groups can be split over devices (_sharding.py) for any G.


def _fold_batch_into_channels(x: Array, layout: Layout) -> Array:
    """Activations (B, N, ...) -> N-leading with B*C channels (b-major)."""
    c_axis = act_channel_axis(layout) + 1  # axis of C in the batched array
    x = jnp.moveaxis(x, 0, c_axis - 1)  # B directly before C
    shape = x.shape
    return x.reshape(
        shape[: c_axis - 1] + (shape[c_axis - 1] * shape[c_axis],) + shape[c_axis + 1 :]
    )


def _unfold_channels(y: Array, size: int, layout: Layout) -> Array:
    c_axis = act_channel_axis(layout)
    shape = y.shape
    y = y.reshape(shape[:c_axis] + (size, shape[c_axis] // size) + shape[c_axis + 1 :])
    return jnp.moveaxis(y, c_axis, 0)


def _fold_batch_into_o(w: Array, layout: Layout) -> Array:
    """Weights (B, ...) -> B*O output channels (b-major)."""
    o_axis = weight_out_axis(layout)
    w = jnp.moveaxis(w, 0, o_axis)
    shape = w.shape
    return w.reshape(shape[:o_axis] + (shape[o_axis] * shape[o_axis + 1],) + shape[o_axis + 2 :])


def _unfold_o(w: Array, size: int, layout: Layout) -> Array:
    o_axis = weight_out_axis(layout)
    shape = w.shape
    w = w.reshape(shape[:o_axis] + (size, shape[o_axis] // size) + shape[o_axis + 1 :])
    return jnp.moveaxis(w, o_axis, 0)


def _grouped(geom: ConvGeometry, size: int) -> ConvGeometry:
    return dataclasses.replace(geom, groups=geom.groups * size)


def _batch_weights_into_groups(
    kernel: Kernel, args: Sequence[Array], dims: Dims, *, geom: ConvGeometry
) -> tuple[Array, int]:
    """fwd and bwd_data (operands: activation, weights, bias) under vmap."""
    if dims[1] is NOT_MAPPED and dims[2] is NOT_MAPPED:
        return batch_over_n(kernel, args, dims, geom=geom, n_activations=1)
    size = batch_size(args, dims)
    act, w, b = (to_front(a, d, size) for a, d in zip(args, dims))
    out = kernel.bind(
        _fold_batch_into_channels(act, geom.layout),
        _fold_batch_into_o(w, geom.layout),
        b.reshape(-1),
        geom=_grouped(geom, size),
    )
    return _unfold_channels(out, size, geom.layout), 0


def _fwd_batch(args: Sequence[Array], dims: Dims, *, geom: ConvGeometry) -> tuple[Array, int]:
    return _batch_weights_into_groups(conv2d_fwd_kernel, args, dims, geom=geom)


def _bwd_data_batch(args: Sequence[Array], dims: Dims, *, geom: ConvGeometry) -> tuple[Array, int]:
    return _batch_weights_into_groups(conv2d_bwd_data_kernel, args, dims, geom=geom)


def _bwd_filter_batch(
    args: Sequence[Array], dims: Dims, *, geom: ConvGeometry
) -> tuple[Array, int]:
    # Each example has its own dw, so the mapped axis cannot be summed into N: it always goes
    # into the groups.
    x, dy = args
    size = batch_size(args, dims)
    x = _fold_batch_into_channels(to_front(x, dims[0], size), geom.layout)
    dy = _fold_batch_into_channels(to_front(dy, dims[1], size), geom.layout)
    dw = conv2d_bwd_filter_kernel.bind(x, dy, geom=_grouped(geom, size))
    return _unfold_o(dw, size, geom.layout), 0


def _conv_split(operands: str, results: str) -> Split:
    """How a conv kernel divides over devices, for operands/results made of 'x' (activation:
    N, and channels in groups), 'w' (weights: output channels in groups) and 'b' (bias). The
    weight gradient has no N: it is summed over the shards of N. Sharding the channels in whole
    groups leaves each device a conv with groups / parts groups (e.g. vmapped weights)."""

    def dims(geom: ConvGeometry) -> tuple[tuple[str, ...], tuple[str, ...]]:
        table = {
            "x": "ng.." if geom.layout == Layout.NCHW else "n..g",
            "w": "g..." if geom.layout == Layout.NCHW else "...g",
            "b": "g",
        }
        return tuple(table[k] for k in operands), tuple(table[k] for k in results)

    return Split(
        dims,
        groups=lambda geom: geom.groups,
        local=lambda geom, parts: dataclasses.replace(geom, groups=geom.groups // parts),
    )


# The bias (third operand) is empty when there is none; only x / dy and w being empty makes the
# result zeros.
conv2d_fwd_kernel = make_kernel(
    "conv2d_fwd",
    _fwd_abstract,
    _fwd_batch,
    n_operands=3,
    n_data_operands=2,
    split=_conv_split("xwb", "x"),
)
conv2d_bwd_data_kernel = make_kernel(
    "conv2d_bwd_data",
    _bwd_data_abstract,
    _bwd_data_batch,
    n_operands=3,
    n_data_operands=2,
    split=_conv_split("xwb", "x"),
)
conv2d_bwd_filter_kernel = make_kernel(
    "conv2d_bwd_filter",
    _bwd_filter_abstract,
    _bwd_filter_batch,
    n_operands=2,
    split=_conv_split("xx", "w"),
)


def _no_bias(dtype: Any) -> Array:
    return jnp.zeros((0,), dtype)


def _bias_grad(g: Array, b: Array, layout: Layout) -> Array:
    """d(bias) = dy summed over N, H, W (in float32 for the half types)."""
    if b.size == 0:
        return jnp.zeros_like(b)
    axes = (0, *_args.act_spatial_axes(layout))
    acc = jnp.float64 if g.dtype == jnp.float64 else jnp.float32
    return jnp.sum(g, axis=axes, dtype=acc).astype(g.dtype)
