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

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _args
from ._args import IntPair, Layout, LayoutName, PaddingLike, PoolGeometry, act_dims, act_shape
from ._primitive import batch_over_n, make_kernel
from ._sharding import Split, out_aval

Array = jax.Array
Aval = Any  # a jax.core.ShapedArray: an operand's shape and dtype during abstract evaluation
Dims = Sequence[int | None]  # where vmap maps each operand (None: not mapped)

# ----------------------------------------------------------------------------------------------
# Public API.


@overload
def max_pool2d(
    x: ArrayLike,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: PaddingLike = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
    return_indices: Literal[False] = False,
    layout: LayoutName = "NCHW",
) -> jax.Array: ...


@overload
def max_pool2d(
    x: ArrayLike,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: PaddingLike = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
    *,
    return_indices: Literal[True],
    layout: LayoutName = "NCHW",
) -> tuple[jax.Array, jax.Array]: ...


@overload
def max_pool2d(
    x: ArrayLike,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: PaddingLike = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    layout: LayoutName = "NCHW",
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def max_pool2d(
    x: ArrayLike,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: PaddingLike = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    layout: LayoutName = "NCHW",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """2-d max pooling with PyTorch's ``max_pool2d`` semantics, on jaxconv's kernels.

    Padded cells are -inf and never selected; NaN wins over every number; among equal maxima
    the first in row-major window order wins and alone receives the gradient (lax's
    ``reduce_window`` gradient goes to every tie instead). Works under ``jit``, reverse-mode
    ``grad`` of any order, ``vmap``, batch and channel sharding and ``jax.export``. Without a
    gradient and without ``return_indices`` a values-only kernel runs (no index is written);
    under ``grad`` the forward also writes the indices that the backward reads. Both give the
    same values bit for bit, and results are deterministic.

    Args:
      x: ``(N, C, H, W)`` for ``"NCHW"`` or ``(N, H, W, C)`` for ``"NHWC"`` (3-d: one example
        without its batch axis, as in PyTorch). float32, float64, float16 or bfloat16. An input
        plane holds at most 2**31 - 1 cells (the indices are int32).
      kernel_size: the window, an int or ``(kh, kw)``, each >= 1.
      stride: an int or ``(sh, sw)``, each >= 1; ``None`` (the default) means kernel_size, as
        in PyTorch (Flax's ``max_pool`` defaults to 1: see :func:`jaxconv.nn.max_pool`).
      padding: an int, ``(ph, pw)``, ``((top, bottom), (left, right))`` or ``"SAME"`` /
        ``"VALID"``; each side at most half the effective (dilated) window,
        ``((k - 1) * dilation + 1) // 2`` (PyTorch's rule when dilation is 1).
      dilation: the window dilation, an int or ``(dh, dw)``, each >= 1.
      ceil_mode: PyTorch's ``ceil_mode``: round the output size up, without a window that
        starts in the bottom/right padding.
      return_indices: also return the position of each maximum.
      layout: ``"NCHW"`` or ``"NHWC"`` (any case).

    Returns:
      The pooled values ``(N, C, OH, OW)`` (or NHWC, or 3-d for a 3-d x) in x's dtype; with
      ``return_indices=True`` the pair (values, indices), the indices int32 flat offsets
      ``h * W + w`` into each input plane as PyTorch's (-1 for a window that holds only
      padding, possible only with dilation).

    Raises:
      ValueError: at trace time, naming the argument and its values: a rank other than 4 or
        3, an unknown layout, a kernel_size, stride or dilation < 1, a negative padding or more
        than half the effective window, an empty input, an output size < 1, an input plane
        over 2**31 - 1 cells.
      TypeError: at trace time: a dtype other than the four floating types, a non-integer
        where an int is expected, a ``ceil_mode`` / ``return_indices`` that is not a bool.
    """
    if _args.unbatched(x):
        return _args.drop_batch_axis(
            max_pool2d(
                _args.add_batch_axis(x),
                kernel_size,
                stride,
                padding,
                dilation,
                ceil_mode,
                return_indices,
                layout,
            )
        )
    geom, return_indices = _args.max_pool2d_geometry(
        x, kernel_size, stride, padding, dilation, ceil_mode, return_indices, layout
    )
    if return_indices:
        return _max_pool_with_indices(jnp.asarray(x), geom)
    return _max_pool(jnp.asarray(x), geom)


def max_unpool2d(
    x: ArrayLike,
    indices: ArrayLike,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair | Sequence[Sequence[int]] = 0,
    output_size: Sequence[int] | None = None,
    layout: LayoutName = "NCHW",
) -> jax.Array:
    """Inverse of :func:`max_pool2d` with PyTorch's ``max_unpool2d`` semantics.

    Places each value of x at its flat index ``h * W_out + w`` in its output plane, zeros
    elsewhere. Works under ``jit``, ``grad``, ``vmap`` and sharding (it is written with jnp
    scatters, no kernel of its own).

    Args:
      x: the pooled values, ``(N, C, H, W)`` for ``"NCHW"`` or ``(N, H, W, C)`` for ``"NHWC"``
        (3-d: one example). float32, float64, float16 or bfloat16.
      indices: x's shape, int32 or int64, as :func:`max_pool2d` returns them. Values are not
        known at trace time: an index outside the output plane (negative or >= H_out * W_out)
        is dropped, its value goes nowhere (PyTorch raises). Of two equal indices in one
        plane one value is kept, which one is unspecified.
      kernel_size: the pooling window, an int or ``(kh, kw)``, each >= 1.
      stride: an int or ``(sh, sw)``; ``None`` means kernel_size.
      padding: an int, ``(ph, pw)`` or ``((top, bottom), (left, right))``, each >= 0.
      output_size: ``None`` for the default ``(H - 1) * stride - top - bottom + kernel_size``,
        or ``(H_out, W_out)`` or a whole 4-d (3-d for a 3-d x) output shape, each within stride
        of the default.
      layout: ``"NCHW"`` or ``"NHWC"`` (any case).

    Returns:
      ``(N, C, H_out, W_out)`` (or NHWC, or 3-d for a 3-d x) in x's dtype.

    Raises:
      ValueError: at trace time: indices of another shape than x, an output_size of another
        length or too far from the default, an output plane over 2**31 - 1 cells, and the
        argument errors of :func:`max_pool2d`.
      TypeError: at trace time: indices neither int32 nor int64, x not floating, a
        non-integer output_size.
    """
    if _args.unbatched(x):
        if jnp.ndim(indices) != 3:
            raise ValueError(
                f"indices must have the shape of x {tuple(jnp.shape(x))}, got "
                f"{tuple(jnp.shape(indices))}"
            )
        if isinstance(output_size, (list, tuple)) and len(output_size) == 3:
            output_size = (1, *output_size)  # the full shape of one example
        return _args.drop_batch_axis(
            max_unpool2d(
                _args.add_batch_axis(x),
                _args.add_batch_axis(indices),
                kernel_size,
                stride,
                padding,
                output_size,
                layout,
            )
        )
    geom = _args.max_unpool2d_geometry(
        x, indices, kernel_size, stride, padding, output_size, layout
    )
    n, c, (h, w), out_hw = geom.batch, geom.channels, geom.in_hw, geom.out_hw
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
    def unpool_plane(vals: Array, idx: Array) -> Array:
        return jnp.zeros((plane,), x.dtype).at[idx].set(vals, mode="drop")

    if geom.layout == Layout.NCHW:
        out = jax.vmap(jax.vmap(unpool_plane))(x.reshape(n, c, h * w), indices.reshape(n, c, h * w))
        return out.reshape(n, c, *out_hw)
    per_pixel_c = jax.vmap(unpool_plane, in_axes=1, out_axes=1)  # (h*w, C) -> (plane, C)
    out = jax.vmap(per_pixel_c)(x.reshape(n, h * w, c), indices.reshape(n, h * w, c))
    return out.reshape(n, *out_hw, c)


# ----------------------------------------------------------------------------------------------
# custom_vjp rules: the forward kernels, and the backward kernel whose own VJP gathers.


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x: Array, geom: PoolGeometry) -> Array:
    """y alone. Without a gradient (the primal) the values-only kernel runs; under a gradient
    the fwd rule runs the indexed one, whose indices the backward needs."""
    return max_pool2d_fwd_values_kernel(x, geom=geom)


def _max_pool_vjp_fwd(x: Array, geom: PoolGeometry) -> tuple[Array, Array]:
    # Through the indexed custom_vjp, so that differentiating this rule (second order) works.
    y, idx = _max_pool_with_indices(x, geom)
    return y, idx


def _max_pool_vjp_bwd(geom: PoolGeometry, idx: Array, gy: Array) -> tuple[Array]:
    return (max_pool2d_bwd(gy, idx, geom),)


_max_pool.defvjp(_max_pool_vjp_fwd, _max_pool_vjp_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_with_indices(x: Array, geom: PoolGeometry) -> tuple[Array, Array]:
    """(y, indices): return_indices=True, and the fwd rule of _max_pool."""
    return max_pool2d_fwd_kernel(x, geom=geom)


def _max_pool_with_indices_vjp_fwd(
    x: Array, geom: PoolGeometry
) -> tuple[tuple[Array, Array], Array]:
    y, idx = _max_pool_with_indices(x, geom)
    return (y, idx), idx


def _max_pool_with_indices_vjp_bwd(
    geom: PoolGeometry, idx: Array, cts: tuple[Array, Any]
) -> tuple[Array]:
    gy, _ = cts  # the indices output is integer-valued: its cotangent is float0
    return (max_pool2d_bwd(gy, idx, geom),)


_max_pool_with_indices.defvjp(_max_pool_with_indices_vjp_fwd, _max_pool_with_indices_vjp_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def max_pool2d_bwd(dy: Array, idx: Array, geom: PoolGeometry) -> Array:
    return max_pool2d_bwd_kernel(dy, idx, geom=geom)


def _max_pool_bwd_vjp_fwd(dy: Array, idx: Array, geom: PoolGeometry) -> tuple[Array, Array]:
    return max_pool2d_bwd(dy, idx, geom), idx


def _max_pool_bwd_vjp_bwd(geom: PoolGeometry, idx: Array, g: Array) -> tuple[Array, None]:
    return _gather_at_indices(g, idx, geom.layout), None


max_pool2d_bwd.defvjp(_max_pool_bwd_vjp_fwd, _max_pool_bwd_vjp_bwd)


def _gather_at_indices(g: Array, idx: Array, layout: Layout) -> Array:
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


def _pool_fwd_abstract(x: Aval, *, geom: PoolGeometry) -> tuple[Aval, Aval]:
    n, c = act_dims(x.shape, geom.layout)[:2]
    shape = act_shape(n, c, *geom.out_hw, geom.layout)
    return (out_aval(x, shape, x.dtype, batched=True), out_aval(x, shape, jnp.int32, batched=True))


def _pool_fwd_values_abstract(x: Aval, *, geom: PoolGeometry) -> Aval:
    n, c = act_dims(x.shape, geom.layout)[:2]
    return out_aval(x, act_shape(n, c, *geom.out_hw, geom.layout), x.dtype, batched=True)


def _pool_bwd_abstract(dy: Aval, idx: Aval, *, geom: PoolGeometry) -> Aval:
    n, c = act_dims(dy.shape, geom.layout)[:2]
    return out_aval(dy, act_shape(n, c, *geom.in_hw, geom.layout), dy.dtype, batched=True)


# ----------------------------------------------------------------------------------------------
# Batching: pooling has no weights, so every vmapped axis folds into N (one launch).


def _pool_fwd_batch(args: Sequence[Array], dims: Dims, *, geom: PoolGeometry) -> tuple[Any, Any]:
    return batch_over_n(max_pool2d_fwd_kernel, args, dims, geom=geom, n_activations=1)


def _pool_fwd_values_batch(
    args: Sequence[Array], dims: Dims, *, geom: PoolGeometry
) -> tuple[Any, Any]:
    return batch_over_n(max_pool2d_fwd_values_kernel, args, dims, geom=geom, n_activations=1)


def _pool_bwd_batch(args: Sequence[Array], dims: Dims, *, geom: PoolGeometry) -> tuple[Any, Any]:
    return batch_over_n(max_pool2d_bwd_kernel, args, dims, geom=geom, n_activations=2)


def _pool_split(n_operands: int, n_results: int) -> Split:
    """Pooling divides over devices along N and along the channels (each channel is its own
    group), every array being an activation."""

    def dims(geom: PoolGeometry) -> tuple[tuple[str, ...], tuple[str, ...]]:
        act = "ng.." if geom.layout == Layout.NCHW else "n..g"
        return (act,) * n_operands, (act,) * n_results

    return Split(dims, groups=lambda geom: None, local=lambda geom, parts: geom)


max_pool2d_fwd_kernel = make_kernel(
    "max_pool2d_fwd",
    _pool_fwd_abstract,
    _pool_fwd_batch,
    n_operands=1,
    split=_pool_split(1, 2),
    multiple_results=True,
)
max_pool2d_fwd_values_kernel = make_kernel(
    "max_pool2d_fwd_values",
    _pool_fwd_values_abstract,
    _pool_fwd_values_batch,
    n_operands=1,
    split=_pool_split(1, 1),
)
max_pool2d_bwd_kernel = make_kernel(
    "max_pool2d_bwd", _pool_bwd_abstract, _pool_bwd_batch, n_operands=2, split=_pool_split(2, 1)
)
