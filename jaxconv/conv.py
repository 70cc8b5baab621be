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
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from . import _args
from ._args import (ConvGeometry, Layout, act_channel_axis, act_dims, act_shape, weight_dims,
                    weight_out_axis, weight_shape)
from ._primitive import NOT_MAPPED, batch_over_n, batch_size, make_kernel, to_front
from ._sharding import Split, match_vma, out_aval

# ----------------------------------------------------------------------------------------------
# Public API.


def conv2d(x, w, bias=None, *, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
           groups: int = 1, layout: str = "NCHW", precision: Any = None):
    """2-d convolution (cross-correlation, as in PyTorch and lax), computed by jaxconv kernels.

    x: (N, C, H, W) with w: (O, C/groups, KH, KW) for layout="NCHW";
    x: (N, H, W, C) with w: (KH, KW, C/groups, O) for layout="NHWC". The output follows x's layout.
    An unbatched x ((C, H, W), or (H, W, C) for NHWC) gives an unbatched output, as in PyTorch.
    padding: int, (ph, pw), ((top, bottom), (left, right)), or "SAME" / "VALID".
    precision: as lax's (None, a string such as "highest", a lax.Precision, or a pair of them).
    It only decides whether a GPU may multiply float32 operands on TF32 tensor cores (None and
    DEFAULT follow jax.default_matmul_precision; HIGHEST never does); the CPU always computes in
    full float32.
    """
    if _args.unbatched(x):
        return _args.drop_batch_axis(conv2d(
            _args.add_batch_axis(x), w, bias, stride=stride, padding=padding, dilation=dilation,
            groups=groups, layout=layout, precision=precision))
    lc = _args.layout_code(layout)
    xs, ws, dtype = _check_operands(
        x, w, bias, layout=lc,
        x_what=_args.activation_form(lc),
        w_what="(O, I, KH, KW)" if lc == Layout.NCHW else "(KH, KW, I, O)")
    n, c, h, wd = act_dims(xs, lc)
    o, i, kh, kw = weight_dims(ws, lc)
    groups = _args.integer(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if c % groups:
        raise ValueError(f"groups={groups} must divide the input channels C={c}")
    if o % groups:
        raise ValueError(f"groups={groups} must divide the output channels O={o}")
    if i * groups != c:
        raise ValueError(
            f"w has {i} input channels per group but x has C={c} channels with groups={groups} "
            f"(expected {c // groups}; layout {lc.name}, x shape {xs}, w shape {ws})")
    if min(kh, kw) < 1:
        raise ValueError(f"w must have a non-empty kernel, got shape {ws}")
    if min(c, h, wd) < 1:
        raise ValueError(f"x must have non-empty channel and spatial dims, got shape {xs}")
    stride = _args.pair(stride, "stride")
    dilation = _args.pair(dilation, "dilation")
    keff = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
    pads = _args.padding(padding, "padding", in_hw=(h, wd), kernel_eff=keff, stride=stride)
    out_hw = tuple(_args.out_size(s, k, st, d, lo, hi) for s, k, st, d, (lo, hi) in
                   zip((h, wd), (kh, kw), stride, dilation, pads))
    if min(out_hw) < 1:
        raise ValueError(
            f"output size would be {out_hw} for input {(h, wd)}, kernel {(kh, kw)}, stride "
            f"{stride}, dilation {dilation}, padding {pads}: the dilated kernel is larger than "
            "the padded input")
    geom = ConvGeometry(lc, (h, wd), (kh, kw), out_hw, stride, dilation, pads, groups,
                        _args.allow_tf32(precision))
    # match_vma outside the custom_vjp: in shard_map a replicated w meeting a sharded x is cast
    # to varying here, and AD turns that cast into the psum of the per-shard gradients of w.
    operands = match_vma(jnp.asarray(x), jnp.asarray(w), _bias_array(bias, o, dtype))
    return conv2d_fwd(*operands, geom)


def conv_transpose2d(x, w, bias=None, *, stride: Any = 1, padding: Any = 0,
                     output_padding: Any = 0, groups: int = 1, dilation: Any = 1,
                     layout: str = "NCHW", precision: Any = None):
    """Transposed 2-d convolution with PyTorch's semantics (the gradient of conv2d w.r.t. x).

    x: (N, C_in, H, W) with w: (C_in, C_out/groups, KH, KW) for layout="NCHW";
    x: (N, H, W, C_in) with w: (KH, KW, C_out/groups, C_in) for layout="NHWC".
    Output size: (H - 1)*stride - pad_top - pad_bottom + dilation*(KH - 1) + output_padding + 1.
    An unbatched x ((C_in, H, W), or (H, W, C_in) for NHWC) gives an unbatched output.
    precision: as in conv2d.
    """
    if _args.unbatched(x):
        return _args.drop_batch_axis(conv_transpose2d(
            _args.add_batch_axis(x), w, bias, stride=stride, padding=padding,
            output_padding=output_padding, groups=groups, dilation=dilation, layout=layout,
            precision=precision))
    lc = _args.layout_code(layout)
    xs, ws, dtype = _check_operands(
        x, w, bias, layout=lc,
        x_what=_args.activation_form(lc, "C_in"),
        w_what="(C_in, C_out/groups, KH, KW)" if lc == Layout.NCHW else "(KH, KW, C_out/groups, C_in)")
    n, c_in, h, wd = act_dims(xs, lc)
    # In the equivalent convolution, w's "O" is our C_in and its "I" is C_out / groups.
    w_cin, cout_g, kh, kw = weight_dims(ws, lc)
    groups = _args.integer(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if c_in % groups:
        raise ValueError(f"groups={groups} must divide the input channels C_in={c_in}")
    if w_cin != c_in:
        raise ValueError(
            f"w must have C_in={c_in} as its {'first' if lc == Layout.NCHW else 'last'} dim, got shape {ws}")
    if min(kh, kw, cout_g) < 1:
        raise ValueError(f"w must have non-empty dims, got shape {ws}")
    if min(c_in, h, wd) < 1:
        raise ValueError(f"x must have non-empty channel and spatial dims, got shape {xs}")
    stride = _args.pair(stride, "stride")
    dilation = _args.pair(dilation, "dilation")
    pads = _args.padding(padding, "padding", in_hw=(h, wd), kernel_eff=(kh, kw), stride=stride,
                         allow_string=False)
    out_pad = _args.pair(output_padding, "output_padding", minimum=0)
    for name, op, s, d in zip("hw", out_pad, stride, dilation):
        if op >= max(s, d):
            raise ValueError(
                f"output_padding must be smaller than stride or dilation, got output_padding="
                f"{output_padding} with stride={stride}, dilation={dilation}")
    out_hw = tuple((i - 1) * s - lo - hi + d * (k - 1) + op + 1 for i, s, (lo, hi), d, k, op in
                   zip((h, wd), stride, pads, dilation, (kh, kw), out_pad))
    if min(out_hw) < 1:
        raise ValueError(f"output size would be {out_hw}: padding {pads} is too large for input "
                         f"{(h, wd)} and kernel {(kh, kw)}")
    # The convolution this inverts reads an out_hw input with pads (lo, hi - output_padding):
    # (out + lo + hi - op - d*(k-1) - 1) / s + 1 = h exactly.
    conv_pads = tuple((lo, hi - op) for (lo, hi), op in zip(pads, out_pad))
    geom = ConvGeometry(lc, out_hw, (kh, kw), (h, wd), stride, dilation, conv_pads, groups,
                        _args.allow_tf32(precision))
    operands = match_vma(jnp.asarray(x), jnp.asarray(w),
                         _bias_array(bias, cout_g * groups, dtype))  # as in conv2d
    return conv2d_bwd_data(*operands, geom)


def _check_operands(x, w, bias, *, x_what: str, w_what: str, layout: int):
    xs = _args.check_rank4(x, "x", x_what)
    ws = _args.check_rank4(w, "w", w_what)
    xdt = _args.check_float(x, "x")
    wdt = _args.check_float(w, "w")
    if xdt != wdt:
        raise TypeError(f"x and w must have the same dtype, got x: {xdt} and w: {wdt}")
    if bias is not None:
        bdt = _args.check_float(bias, "bias")
        if bdt != xdt:
            raise TypeError(f"bias must have the dtype of x ({xdt}), got {bdt}")
    return xs, ws, xdt


def _bias_array(bias, channels: int, dtype):
    if bias is None:
        return _no_bias(dtype)
    if tuple(jnp.shape(bias)) != (channels,):
        raise ValueError(f"bias must have shape ({channels},), got {tuple(jnp.shape(bias))}")
    return jnp.asarray(bias)


# ----------------------------------------------------------------------------------------------
# The three custom_vjp functions.


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv2d_fwd(x, w, b, geom: ConvGeometry):
    return conv2d_fwd_kernel(x, w, b, geom=geom)


def _conv2d_fwd_vjp_fwd(x, w, b, geom):
    return conv2d_fwd(x, w, b, geom), (x, w, b)


def _conv2d_fwd_vjp_bwd(geom, res, g):
    x, w, b = res
    return (conv2d_bwd_data(g, w, _no_bias(g.dtype), geom), conv2d_bwd_filter(x, g, geom),
            _bias_grad(g, b, geom.layout))


conv2d_fwd.defvjp(_conv2d_fwd_vjp_fwd, _conv2d_fwd_vjp_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv2d_bwd_data(dy, w, b, geom: ConvGeometry):
    return conv2d_bwd_data_kernel(dy, w, b, geom=geom)


def _conv2d_bwd_data_vjp_fwd(dy, w, b, geom):
    return conv2d_bwd_data(dy, w, b, geom), (dy, w, b)


def _conv2d_bwd_data_vjp_bwd(geom, res, g):
    dy, w, b = res
    return (conv2d_fwd(g, w, _no_bias(g.dtype), geom), conv2d_bwd_filter(g, dy, geom),
            _bias_grad(g, b, geom.layout))


conv2d_bwd_data.defvjp(_conv2d_bwd_data_vjp_fwd, _conv2d_bwd_data_vjp_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_bwd_filter(x, dy, geom: ConvGeometry):
    return conv2d_bwd_filter_kernel(x, dy, geom=geom)


def _conv2d_bwd_filter_vjp_fwd(x, dy, geom):
    return conv2d_bwd_filter(x, dy, geom), (x, dy)


def _conv2d_bwd_filter_vjp_bwd(geom, res, g):
    x, dy = res
    return (conv2d_bwd_data(dy, g, _no_bias(g.dtype), geom),
            conv2d_fwd(x, g, _no_bias(g.dtype), geom))


conv2d_bwd_filter.defvjp(_conv2d_bwd_filter_vjp_fwd, _conv2d_bwd_filter_vjp_bwd)


# ----------------------------------------------------------------------------------------------
# Abstract evaluation: output shapes from operand shapes and the geometry.


def _fwd_abstract(x, w, b, *, geom: ConvGeometry):
    n = act_dims(x.shape, geom.layout)[0]
    o = weight_dims(w.shape, geom.layout)[0]
    return out_aval(x, act_shape(n, o, *geom.out_hw, geom.layout), x.dtype, batched=True)


def _bwd_data_abstract(dy, w, b, *, geom: ConvGeometry):
    n = act_dims(dy.shape, geom.layout)[0]
    i = weight_dims(w.shape, geom.layout)[1]
    return out_aval(dy, act_shape(n, i * geom.groups, *geom.in_hw, geom.layout), dy.dtype,
                    batched=True)


def _bwd_filter_abstract(x, dy, *, geom: ConvGeometry):
    c = act_dims(x.shape, geom.layout)[1]
    o = act_dims(dy.shape, geom.layout)[1]
    return out_aval(x, weight_shape(o, c // geom.groups, *geom.kernel_hw, geom.layout), x.dtype,
                    batched=False)


# ----------------------------------------------------------------------------------------------
# Batching. vmap over activations only folds the mapped axis into N (one launch). vmap over the
# weights too uses the grouped-convolution trick: example b's channels become groups
# b*G .. b*G + G-1 of one convolution with B*G groups, so per-example weights still run as a
# single launch. Activations: (B, N, C, H, W) -> (N, B*C, H, W) (NCHW) or (N, H, W, B*C) (NHWC).
# An unmapped x meeting mapped weights (a batch of models on one batch of data) is broadcast
# into the groups too. Stacking the models' filters as extra output channels instead would
# spare that copy, but only the first layer has an unmapped input, and with the examples kept
# in whole groups the groups can be split over devices (_sharding.py) for any G.


def _fold_batch_into_channels(x, layout: Layout):
    """Activations (B, N, ...) -> N-leading with B*C channels (b-major)."""
    c_axis = act_channel_axis(layout) + 1  # axis of C in the batched array
    x = jnp.moveaxis(x, 0, c_axis - 1)  # B directly before C
    shape = x.shape
    return x.reshape(shape[:c_axis - 1] + (shape[c_axis - 1] * shape[c_axis],) + shape[c_axis + 1:])


def _unfold_channels(y, size: int, layout: Layout):
    c_axis = act_channel_axis(layout)
    shape = y.shape
    y = y.reshape(shape[:c_axis] + (size, shape[c_axis] // size) + shape[c_axis + 1:])
    return jnp.moveaxis(y, c_axis, 0)


def _fold_batch_into_o(w, layout: Layout):
    """Weights (B, ...) -> B*O output channels (b-major)."""
    o_axis = weight_out_axis(layout)
    w = jnp.moveaxis(w, 0, o_axis)
    shape = w.shape
    return w.reshape(shape[:o_axis] + (shape[o_axis] * shape[o_axis + 1],) + shape[o_axis + 2:])


def _unfold_o(w, size: int, layout: Layout):
    o_axis = weight_out_axis(layout)
    shape = w.shape
    w = w.reshape(shape[:o_axis] + (size, shape[o_axis] // size) + shape[o_axis + 1:])
    return jnp.moveaxis(w, o_axis, 0)


def _grouped(geom: ConvGeometry, size: int) -> ConvGeometry:
    return dataclasses.replace(geom, groups=geom.groups * size)


def _batch_weights_into_groups(kernel, args, dims, *, geom):
    """fwd and bwd_data (operands: activation, weights, bias) under vmap."""
    if dims[1] is NOT_MAPPED and dims[2] is NOT_MAPPED:
        return batch_over_n(kernel, args, dims, geom=geom, n_activations=1)
    size = batch_size(args, dims)
    act, w, b = (to_front(a, d, size) for a, d in zip(args, dims))
    out = kernel.bind(_fold_batch_into_channels(act, geom.layout),
                      _fold_batch_into_o(w, geom.layout), b.reshape(-1),
                      geom=_grouped(geom, size))
    return _unfold_channels(out, size, geom.layout), 0


def _fwd_batch(args, dims, *, geom):
    return _batch_weights_into_groups(conv2d_fwd_kernel, args, dims, geom=geom)


def _bwd_data_batch(args, dims, *, geom):
    return _batch_weights_into_groups(conv2d_bwd_data_kernel, args, dims, geom=geom)


def _bwd_filter_batch(args, dims, *, geom):
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
    def dims(geom):
        table = {"x": "ng.." if geom.layout == Layout.NCHW else "n..g",
                 "w": "g..." if geom.layout == Layout.NCHW else "...g", "b": "g"}
        return tuple(table[k] for k in operands), tuple(table[k] for k in results)

    return Split(dims, groups=lambda geom: geom.groups,
                 local=lambda geom, parts: dataclasses.replace(geom, groups=geom.groups // parts))


# The bias (third operand) is empty when there is none; only x / dy and w being empty makes the
# result zeros.
conv2d_fwd_kernel = make_kernel("conv2d_fwd", _fwd_abstract, _fwd_batch, n_operands=3,
                                n_data_operands=2, split=_conv_split("xwb", "x"))
conv2d_bwd_data_kernel = make_kernel("conv2d_bwd_data", _bwd_data_abstract, _bwd_data_batch,
                                     n_operands=3, n_data_operands=2,
                                     split=_conv_split("xwb", "x"))
conv2d_bwd_filter_kernel = make_kernel("conv2d_bwd_filter", _bwd_filter_abstract,
                                       _bwd_filter_batch, n_operands=2,
                                       split=_conv_split("xx", "w"))


def _no_bias(dtype):
    return jnp.zeros((0,), dtype)


def _bias_grad(g, b, layout):
    """d(bias) = dy summed over N, H, W (in float32 for the half types)."""
    if b.size == 0:
        return jnp.zeros_like(b)
    axes = (0, *_args.act_spatial_axes(layout))
    acc = jnp.float64 if g.dtype == jnp.float64 else jnp.float32
    return jnp.sum(g, axis=axes, dtype=acc).astype(g.dtype)
