"""How jaxconv's primitives behave when arrays are spread over several devices.

Two mechanisms, both public JAX API:

1. Under `jit` with shardings (GSPMD/Shardy), XLA must be told how to split a custom call, or it
   gathers every operand onto every device first. Each primitive therefore lowers through
   `jax.experimental.custom_partitioning`: a Shardy sharding rule in which only the batch axis N
   (axis 0 of every activation, in both layouts) is shared between operands and results, and a
   `partition` callback that keeps N sharded as the operands arrive, replicates everything else
   (weights, channels, space) and runs the kernel on the local shard. A result without N (the
   weight gradient, a sum over N) is completed by one `psum` over the mesh axes that shard N:
   the single all-reduce of data parallelism. On one device, and inside `shard_map` (all axes
   manual), custom_partitioning inlines the plain FFI call.

2. Inside `shard_map`, JAX types every value with the manual mesh axes it varies over ("vma").
   A primitive's output must vary over the union of its operands' axes, and a replicated weight
   that meets a batch-sharded input must be cast to varying *outside* the custom_vjp, so that AD
   transposes that cast into the psum which sums the per-shard weight gradients (without it the
   gradient of a replicated weight silently stays per-shard). `match_vma` does that cast.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

# ----------------------------------------------------------------------------------------------
# Varying manual axes (shard_map).


def varying_axes(x) -> frozenset:
    """The manual mesh axes x varies over (empty outside shard_map or with check_vma=False)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax >= 0.10: ManualAxisType(varying=...)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # jax 0.7 - 0.9


def match_vma(*args):
    """Casts every array to vary over the union of the manual axes any of them varies over."""
    union = frozenset().union(*(varying_axes(a) for a in args))
    if not union:
        return args
    return tuple(a if varying_axes(a) == union else
                 jax.lax.pcast(a, tuple(sorted(union - varying_axes(a))), to="varying")
                 for a in args)


def out_aval(like, shape, dtype, *, batched: bool):
    """The abstract value of a result: `like`'s varying axes and mesh; in explicit-sharding mode
    the batch axis keeps `like`'s sharding (batched=True) or everything is replicated."""
    if not isinstance(like, jax.core.ShapedArray):  # an array or tracer, not its type
        like = jax.typeof(like)
    sharding = like.sharding
    spec = getattr(sharding, "spec", None)
    if spec is not None:
        lead = spec[0] if batched and len(spec) else None
        sharding = sharding.update(spec=P(lead, *([None] * (len(shape) - 1))))
    return like.update(shape=tuple(shape), dtype=dtype, sharding=sharding)


# ----------------------------------------------------------------------------------------------
# Partitioning under jit.


def mark_needs_devices(prim) -> bool:
    """custom_partitioning needs the device assignment while lowering, and jit only provides it
    for primitives in this registry (JAX registers custom_partitioning's own primitive there;
    ours lowers into it). The registry is not public API, but JAX's cuDNN attention and
    TransformerEngine use the same hook; if it disappears we lose partitioning, not correctness.
    """
    try:
        from jax._src import dispatch
        dispatch.prim_requires_devices_during_lowering.add(prim)
    except (ImportError, AttributeError):  # pragma: no cover - depends on the jax version
        return False
    return True


def for_export(ctx) -> bool:
    """Whether this lowering is for jax.export (LoweringParameters.for_export)."""
    params = getattr(ctx.module_context, "lowering_parameters", None)
    return bool(getattr(params, "for_export", False))


def _batch_entry(sharding):
    """The mesh axes (a PartitionSpec entry) that shard axis 0, or None."""
    spec = getattr(sharding, "spec", None)
    if not isinstance(sharding, NamedSharding) or spec is None or not len(spec):
        return None
    return spec[0]


def _entry_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def partitioned(local_call: Callable, n_operands: int, batched_operands: Sequence[bool],
                batched_results: Sequence[bool], operand_ranks: Sequence[int],
                result_ranks: Sequence[int]):
    """Wraps local_call(*operands, geom) -> tuple of results for custom_partitioning.

    batched_operands[i]: operand i has the batch N at axis 0; batched_results likewise. A result
    that is not batched is a sum over N and gets a psum over the axes that shard N.
    """
    assert len(batched_operands) == n_operands == len(operand_ranks)
    letters = iter("abcdefghijklmopqrstuvwxyz")  # 'n' is the batch factor

    def factors(rank, batched):
        return " ".join(["n" if (batched and d == 0) else next(letters) for d in range(rank)])

    lhs = ", ".join(factors(r, b) for r, b in zip(operand_ranks, batched_operands))
    rhs = ", ".join(factors(r, b) for r, b in zip(result_ranks, batched_results))
    summed = not all(batched_results)
    rule = f"{lhs} -> {rhs}"

    def batch_entry_of(arg_shapes):
        entries = [_batch_entry(a.sharding) for a, b in zip(arg_shapes, batched_operands) if b]
        return next((e for e in entries if e is not None), None)

    def shardings(mesh, entry, ranks, batched):
        return tuple(NamedSharding(mesh, P(entry if b else None, *([None] * (r - 1))))
                     for r, b in zip(ranks, batched))

    def partition(geom, mesh, arg_shapes, result_shape):
        entry = batch_entry_of(arg_shapes)
        arg_sh = shardings(mesh, entry, operand_ranks, batched_operands)
        res_sh = shardings(mesh, entry, result_ranks, batched_results)
        axes = _entry_axes(entry)

        def lower_fn(*operands):
            outs = local_call(*operands, geom)
            if summed and axes:
                outs = tuple(o if b else jax.lax.psum(o, axes)
                             for o, b in zip(outs, batched_results))
            return outs

        return mesh, lower_fn, res_sh, arg_sh

    def infer(geom, mesh, arg_shapes, result_shape):  # GSPMD propagation (Shardy uses `rule`)
        return shardings(mesh, batch_entry_of(arg_shapes), result_ranks, batched_results)

    def fn(*args):
        return local_call(*args[:-1], args[-1])

    cp = custom_partitioning(fn, static_argnums=(n_operands,))
    kwargs = {"reduction_factors": ("n",)} if summed else {}
    cp.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=rule, **kwargs)
    return cp
