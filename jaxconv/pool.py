"""max_pool2d and max_unpool2d: argument normalization, primitives and custom_vjp rules.

The forward kernel returns the pooled values and PyTorch's int32 flat indices h * W + w into the
input plane in one pass. The gradient goes to the first maximum of each window only, through
the backward kernel; that kernel is linear in dy, and its own VJP gathers the cotangent at the
saved indices, so second-order gradients work too.

Only a gradient (or return_indices=True) needs the indices. max_pool2d without them is its own
custom_vjp whose primal runs the values-only kernel (target max_pool2d_fwd_values: the same y,
no index bytes written; the indexed forward of a 2x2/2 float32 pool moves 20% more), while
its fwd rule, which runs only when a gradient is taken, runs the indexed kernel and saves the
indices for the backward.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from . import _args
from ._args import Layout, PoolGeometry, act_dims, act_shape
from ._primitive import batch_over_n, make_kernel
from ._sharding import Split, out_aval

# ----------------------------------------------------------------------------------------------
# Public API.


def max_pool2d(x, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
               ceil_mode: bool = False, return_indices: bool = False, layout: str = "NCHW"):
    """2-d max pooling with PyTorch's semantics.

    Padded cells are -inf and never selected; the first maximum in row-major window order wins
    and alone receives the gradient; NaN wins. With return_indices=True also returns int32 flat
    indices h * W + w into each input plane. stride defaults to kernel_size. An unbatched x
    ((C, H, W), or (H, W, C) for NHWC) gives unbatched outputs, as in PyTorch.
    """
    if _args.unbatched(x):
        return _args.drop_batch_axis(max_pool2d(
            _args.add_batch_axis(x), kernel_size, stride, padding, dilation, ceil_mode,
            return_indices, layout))
    lc = _args.layout_code(layout)
    xs = _args.check_rank4(x, "x", _args.activation_form(lc))
    _args.check_float(x, "x")
    geom = _pool_geometry(xs, lc, kernel_size, stride, padding, dilation, ceil_mode)
    return_indices = _args.flag(return_indices, "return_indices")
    if return_indices:
        return _max_pool_with_indices(jnp.asarray(x), geom)
    return _max_pool(jnp.asarray(x), geom)


def max_unpool2d(x, indices, kernel_size: Any, stride: Any = None, padding: Any = 0,
                 output_size: Any = None, layout: str = "NCHW"):
    """Inverse of max_pool2d: places each value at its flat index, zeros elsewhere (PyTorch).

    Default output size: (H - 1)*stride - pad_top - pad_bottom + kernel_size. output_size may
    give (H_out, W_out) or the full output shape. Indices outside the output plane cannot be
    detected at trace time; their values are dropped. An unbatched x with unbatched indices
    ((C, H, W), or (H, W, C) for NHWC) gives an unbatched output (output_size may then be (H, W) or 3-d).
    """
    if _args.unbatched(x):
        if jnp.ndim(indices) != 3:
            raise ValueError(f"indices must have the shape of x {tuple(jnp.shape(x))}, got "
                             f"{tuple(jnp.shape(indices))}")
        if isinstance(output_size, (list, tuple)) and len(output_size) == 3:
            output_size = (1, *output_size)  # the full shape of one example
        return _args.drop_batch_axis(max_unpool2d(
            _args.add_batch_axis(x), _args.add_batch_axis(indices), kernel_size, stride, padding,
            output_size, layout))
    lc = _args.layout_code(layout)
    xs = _args.check_rank4(x, "x", _args.activation_form(lc))
    _args.check_float(x, "x")
    idt = jnp.result_type(indices)
    if idt not in (jnp.int32, jnp.int64):
        raise TypeError(f"indices must be int32 or int64, got {idt}")
    if tuple(jnp.shape(indices)) != xs:
        raise ValueError(f"indices must have the shape of x {xs}, got {tuple(jnp.shape(indices))}")
    n, c, h, w = act_dims(xs, lc)
    kernel = _args.pair(kernel_size, "kernel_size")
    stride = kernel if stride is None else _args.pair(stride, "stride")
    pads = _args.padding(padding, "padding", in_hw=(h, w), kernel_eff=kernel, stride=stride,
                         allow_string=False)
    default = tuple((i - 1) * s - lo - hi + k for i, s, (lo, hi), k in zip((h, w), stride, pads,
                                                                         kernel))
    if output_size is None:
        out_hw = default
    else:
        if not isinstance(output_size, (list, tuple)):
            raise TypeError(f"output_size must be (H, W) or a 4-d shape, got {output_size!r}")
        size = tuple(_args.integer(v, "output_size") for v in output_size)
        if len(size) == 4:
            size = act_dims(size, lc)[2:]
        if len(size) != 2:
            raise ValueError(f"output_size must be (H, W) or a 4-d shape, got {output_size!r}")
        for got, d, s in zip(size, default, stride):
            if not d - s < got < d + s:
                raise ValueError(f"output_size {tuple(size)} must be within stride {stride} of "
                                 f"the default size {default}")
        out_hw = size
    if min(out_hw) < 1:
        raise ValueError(f"output size would be {out_hw} for input {(h, w)} with kernel_size="
                         f"{kernel}, stride={stride}, padding={pads}")
    _check_plane(*out_hw, "the output")
    plane = out_hw[0] * out_hw[1]
    x = jnp.asarray(x)
    # Out-of-range indices are dropped. Negative ones would wrap around in jnp indexing and int64
    # ones past int32 would wrap in the cast, so both are mapped to `plane` (out of range, fits
    # int32) before the cast.
    indices = jnp.asarray(indices)
    indices = jnp.where((indices < 0) | (indices >= plane), plane, indices).astype(jnp.int32)
    # Scatter per (n, c) plane. Windows that overlap can only send one input cell's value to one
    # index twice, so 'set' is order-independent. The plane scatter is vmapped over N and C so
    # that they become the scatter's batching dimensions, which XLA's partitioner keeps per
    # shard when N is sharded (iota index arrays for N and C would make it gather the batch).
    def unpool_plane(vals, idx):
        return jnp.zeros((plane,), x.dtype).at[idx].set(vals, mode="drop")

    if lc == Layout.NCHW:
        out = jax.vmap(jax.vmap(unpool_plane))(x.reshape(n, c, h * w), indices.reshape(n, c, h * w))
        return out.reshape(n, c, *out_hw)
    per_pixel_c = jax.vmap(unpool_plane, in_axes=1, out_axes=1)  # (h*w, C) -> (plane, C)
    out = jax.vmap(per_pixel_c)(x.reshape(n, h * w, c), indices.reshape(n, h * w, c))
    return out.reshape(n, *out_hw, c)


def _pool_geometry(x_shape, lc, kernel_size, stride, padding, dilation, ceil_mode):
    n, c, h, w = act_dims(x_shape, lc)
    if min(h, w) < 1:
        raise ValueError(f"x must have non-empty spatial dims, got shape {tuple(x_shape)}")
    _check_plane(h, w, "x")
    kernel = _args.pair(kernel_size, "kernel_size")
    stride = kernel if stride is None else _args.pair(stride, "stride")
    dilation = _args.pair(dilation, "dilation")
    keff = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))
    pads = _args.padding(padding, "padding", in_hw=(h, w), kernel_eff=keff, stride=stride)
    for (lo, hi), ke in zip(pads, keff):
        if max(lo, hi) > ke // 2:
            raise ValueError(
                f"padding must be at most half the effective kernel size, got padding={padding!r} "
                f"with kernel_size={kernel_size!r}, dilation={dilation} (effective kernel {keff})")
    ceil_mode = _args.flag(ceil_mode, "ceil_mode")
    out_hw = tuple(_pool_out(i, k, s, d, lo, hi, ceil_mode) for i, k, s, d, (lo, hi) in
                   zip((h, w), kernel, stride, dilation, pads))
    if min(out_hw) < 1:
        raise ValueError(f"output size would be {out_hw} for input {(h, w)} with kernel_size="
                         f"{kernel}, stride={stride}, dilation={dilation}, padding={pads}")
    return PoolGeometry(lc, (h, w), kernel, out_hw, stride, dilation, pads, ceil_mode)


def _check_plane(h: int, w: int, what: str):
    """Indices are int32 flat offsets h * W + w into a plane, so a plane must fit in int32."""
    if h * w > _args.INT32_MAX:
        raise ValueError(f"{what} has a {h}x{w} plane: int32 indices cannot address more than "
                         f"2**31 - 1 cells")


def _pool_out(i, k, s, d, lo, hi, ceil_mode):
    """PyTorch's pooled length; mirrors pool_out_size in ffi/geometry.h."""
    span = i + lo + hi - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and out > 0 and (out - 1) * s >= i + lo:
        out -= 1
    return out


# ----------------------------------------------------------------------------------------------
# custom_vjp rules: the forward kernels, and the backward kernel whose own VJP gathers.


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x, geom: PoolGeometry):
    """y alone. Without a gradient (the primal) the values-only kernel runs; under a gradient
    the fwd rule runs the indexed one, whose indices the backward needs."""
    return max_pool2d_fwd_values_kernel(x, geom=geom)


def _max_pool_vjp_fwd(x, geom):
    # Through the indexed custom_vjp, so that differentiating this rule (second order) works.
    y, idx = _max_pool_with_indices(x, geom)
    return y, idx


def _max_pool_vjp_bwd(geom, idx, gy):
    return (max_pool2d_bwd(gy, idx, geom),)


_max_pool.defvjp(_max_pool_vjp_fwd, _max_pool_vjp_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_with_indices(x, geom: PoolGeometry):
    """(y, indices): return_indices=True, and the fwd rule of _max_pool."""
    return max_pool2d_fwd_kernel(x, geom=geom)


def _max_pool_with_indices_vjp_fwd(x, geom):
    y, idx = _max_pool_with_indices(x, geom)
    return (y, idx), idx


def _max_pool_with_indices_vjp_bwd(geom, idx, cts):
    gy, _ = cts  # the indices output is integer-valued: its cotangent is float0
    return (max_pool2d_bwd(gy, idx, geom),)


_max_pool_with_indices.defvjp(_max_pool_with_indices_vjp_fwd, _max_pool_with_indices_vjp_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def max_pool2d_bwd(dy, idx, geom: PoolGeometry):
    return max_pool2d_bwd_kernel(dy, idx, geom=geom)


def _max_pool_bwd_vjp_fwd(dy, idx, geom):
    return max_pool2d_bwd(dy, idx, geom), idx


def _max_pool_bwd_vjp_bwd(geom, idx, g):
    return _gather_at_indices(g, idx, geom.layout), None


max_pool2d_bwd.defvjp(_max_pool_bwd_vjp_fwd, _max_pool_bwd_vjp_bwd)


def _gather_at_indices(g, idx, layout: Layout):
    """out[n, c, oh, ow] = g[n, c, idx[n, c, oh, ow]] (index -1 -> 0): the adjoint of bwd."""
    if layout == Layout.NCHW:
        n, c, h, w = g.shape
        flat_g, flat_i = g.reshape(n, c, h * w), idx.reshape(n, c, -1)
        axis = 2
    else:
        n, h, w, c = g.shape
        flat_g, flat_i = g.reshape(n, h * w, c), idx.reshape(n, -1, c)
        axis = 1
    out = jnp.take_along_axis(flat_g, jnp.maximum(flat_i, 0), axis=axis)
    return jnp.where(flat_i >= 0, out, jnp.zeros((), g.dtype)).reshape(idx.shape)


# ----------------------------------------------------------------------------------------------
# Abstract evaluation.


def _pool_fwd_abstract(x, *, geom: PoolGeometry):
    n, c = act_dims(x.shape, geom.layout)[:2]
    shape = act_shape(n, c, *geom.out_hw, geom.layout)
    return (out_aval(x, shape, x.dtype, batched=True), out_aval(x, shape, jnp.int32, batched=True))


def _pool_fwd_values_abstract(x, *, geom: PoolGeometry):
    n, c = act_dims(x.shape, geom.layout)[:2]
    return out_aval(x, act_shape(n, c, *geom.out_hw, geom.layout), x.dtype, batched=True)


def _pool_bwd_abstract(dy, idx, *, geom: PoolGeometry):
    n, c = act_dims(dy.shape, geom.layout)[:2]
    return out_aval(dy, act_shape(n, c, *geom.in_hw, geom.layout), dy.dtype, batched=True)


# ----------------------------------------------------------------------------------------------
# Batching: pooling has no weights, so every vmapped axis folds into N (one launch).


def _pool_fwd_batch(args, dims, *, geom):
    return batch_over_n(max_pool2d_fwd_kernel, args, dims, geom=geom, n_activations=1)


def _pool_fwd_values_batch(args, dims, *, geom):
    return batch_over_n(max_pool2d_fwd_values_kernel, args, dims, geom=geom, n_activations=1)


def _pool_bwd_batch(args, dims, *, geom):
    return batch_over_n(max_pool2d_bwd_kernel, args, dims, geom=geom, n_activations=2)


def _pool_split(n_operands: int, n_results: int) -> Split:
    """Pooling divides over devices along N and along the channels (each channel is its own
    group), every array being an activation."""
    def dims(geom):
        act = "ng.." if geom.layout == Layout.NCHW else "n..g"
        return (act,) * n_operands, (act,) * n_results

    return Split(dims, groups=lambda geom: None, local=lambda geom, parts: geom)


max_pool2d_fwd_kernel = make_kernel("max_pool2d_fwd", _pool_fwd_abstract, _pool_fwd_batch,
                                    n_operands=1, split=_pool_split(1, 2),
                                    multiple_results=True)
max_pool2d_fwd_values_kernel = make_kernel("max_pool2d_fwd_values", _pool_fwd_values_abstract,
                                           _pool_fwd_values_batch, n_operands=1,
                                           split=_pool_split(1, 1))
max_pool2d_bwd_kernel = make_kernel("max_pool2d_bwd", _pool_bwd_abstract, _pool_bwd_batch,
                                    n_operands=2, split=_pool_split(2, 1))
