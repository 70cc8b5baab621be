"""One JAX primitive per FFI target, and the rules that every kernel shares.

Each target is wrapped in a primitive whose only parameter is a frozen geometry record (see
_args.py). The primitive gives what a bare ffi_call cannot: jaxconv's own batching rules (vmap
folds into the batch or channel axis instead of looping), a partitioned lowering (_sharding.py)
and a single lowering that turns the geometry into the integer attributes the handlers read.

conv.py and pool.py describe their kernels to `make_kernel` and write only their own rules; what
they share lives here: binding with the "an empty operand gives zeros without a launch" rule,
and the helpers that fold a vmapped axis into N.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from . import _sharding
from ._ffi import target
from ._sharding import match_vma

# How vmap marks an operand that is not mapped (jax removed the batching.not_mapped alias in 0.10;
# the value has always been None).
NOT_MAPPED = None


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One FFI target as a JAX primitive, with the abstract evaluation that gives its outputs.

    `n_data_operands` leading operands carry data whose emptiness makes the result all zeros
    (the conv bias, which is empty when there is none, comes after them).
    """

    primitive: Primitive
    abstract_eval: Callable
    n_data_operands: int

    def __call__(self, *args, geom):
        """The kernel's result; an empty data operand gives zeros without launching a kernel.

        Inside shard_map the operands are first cast to vary over the same manual axes (e.g. the
        empty bias made in a bwd rule is invariant while dy is not), as any lax op would, and so
        are the zeros."""
        args = match_vma(*args)
        multiple = self.primitive.multiple_results
        if any(a.size == 0 for a in args[: self.n_data_operands]):
            out = self.abstract_eval(
                *[jax.core.ShapedArray(a.shape, a.dtype) for a in args], geom=geom
            )
            avals = out if multiple else (out,)
            zeros = match_vma(*(jnp.zeros(a.shape, a.dtype) for a in avals), *args)[: len(avals)]
            return tuple(zeros) if multiple else zeros[0]
        out = self.primitive.bind(*args, geom=geom)
        return tuple(out) if multiple else out

    def bind(self, *args, geom):
        """The primitive itself, for batching rules (their operands are never empty)."""
        return self.primitive.bind(*args, geom=geom)


def make_kernel(
    kernel: str,
    abstract_eval: Callable,
    batch_rule: Callable,
    *,
    n_operands: int,
    split: _sharding.Split,
    multiple_results: bool = False,
    n_data_operands: int | None = None,
) -> Kernel:
    """The primitive for the FFI target of `kernel` (e.g. "conv2d_fwd"); `split` says how it
    divides over devices."""
    name = target(kernel)
    prim = Primitive(name)
    prim.multiple_results = multiple_results

    @functools.cache
    def _jitted(geom):
        return jax.jit(lambda *args: prim.bind(*args, geom=geom))

    prim.def_impl(lambda *args, geom: _jitted(geom)(*args))
    prim.def_abstract_eval(abstract_eval)

    # The kernel on whatever shapes it is given (one device, or one shard): a second primitive
    # with the plain FFI lowering, which the partitioned lowering below calls.
    local = Primitive(name + "_local")
    local.multiple_results = multiple_results
    local.def_abstract_eval(abstract_eval)
    ffi_rule = jax.ffi.ffi_lowering(name)

    def local_lowering(ctx, *args, geom):
        attrs = {k: np.int64(v) for k, v in geom.attrs().items()}
        return ffi_rule(ctx, *args, **attrs)

    mlir.register_lowering(local, local_lowering)

    def local_call(*args_and_geom):
        *args, geom = args_and_geom
        out = local.bind(*args, geom=geom)
        return tuple(out) if multiple_results else (out,)

    partitioned_call = _sharding.partitioned(local_call, n_operands, split)

    def lowering(*args, geom):
        out = partitioned_call(*args, geom)
        return tuple(out) if multiple_results else out[0]

    partitioned_lowering = mlir.lower_fun(lowering, multiple_results=multiple_results)

    def lowering_rule(ctx, *args, geom):
        # jax.export cannot serialize custom_partitioning (its partitioner is a Python
        # callback), so exported code holds the plain call: correct, and XLA gathers sharded
        # operands for it. Exporting a shard_map keeps the per-shard calls (see README).
        if _sharding.for_export(ctx):
            return local_lowering(ctx, *args, geom=geom)
        return partitioned_lowering(ctx, *args, geom=geom)

    if _sharding.mark_needs_devices(prim):
        mlir.register_lowering(prim, lowering_rule)
    else:  # this jax cannot partition it: correct, but XLA gathers sharded operands first
        mlir.register_lowering(prim, local_lowering)
    batching.primitive_batchers[prim] = batch_rule
    return Kernel(prim, abstract_eval, n_operands if n_data_operands is None else n_data_operands)


# ----------------------------------------------------------------------------------------------
# Batching helpers. A batch rule receives operands with the vmapped axis at `dims` (NOT_MAPPED
# for operands that vmap does not map) and returns outputs with it at axis 0.


def batch_size(args: Sequence[jax.Array], dims: Sequence[int | None]) -> int:
    """The size of the vmapped axis, read from the first mapped operand."""
    return next(a.shape[d] for a, d in zip(args, dims) if d is not NOT_MAPPED)


def to_front(x: jax.Array, bdim: int | None, size: int) -> jax.Array:
    """Moves the mapped axis to 0, broadcasting an unmapped operand to `size` copies."""
    if bdim is NOT_MAPPED:
        return jnp.broadcast_to(x, (size,) + x.shape)
    return jnp.moveaxis(x, bdim, 0)


def fold_into_n(x):
    """(B, N, ...) -> (B*N, ...): the vmapped axis becomes more examples."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def unfold_n(y: jax.Array, size: int) -> jax.Array:
    """(B*N, ...) -> (B, N, ...), the inverse of fold_into_n."""
    return y.reshape((size, y.shape[0] // size) + y.shape[1:])


def batch_over_n(
    kernel: Kernel,
    args: Sequence[jax.Array],
    dims: Sequence[int | None],
    *,
    geom: Any,
    n_activations: int,
) -> tuple[Any, Any]:
    """The batch rule when only the first `n_activations` operands (all N-leading) may be mapped:
    one launch on B*N examples. The remaining operands must be unmapped and pass through."""
    size = batch_size(args, dims)
    folded = [
        fold_into_n(to_front(a, d, size))
        for a, d in zip(args[:n_activations], dims[:n_activations])
    ]
    out = kernel.bind(*folded, *args[n_activations:], geom=geom)
    if kernel.primitive.multiple_results:
        return tuple(unfold_n(o, size) for o in out), (0,) * len(out)
    return unfold_n(out, size), 0
