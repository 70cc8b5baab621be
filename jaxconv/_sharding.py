"""How jaxconv's primitives behave when arrays are spread over several devices.

Two mechanisms, both built on public JAX API (plus one registry hook, see mark_needs_devices):

1. Under `jit` with shardings (GSPMD/Shardy), XLA must be told how to split a custom call, or it
   gathers every operand onto every device first. Each primitive therefore lowers through
   `jax.experimental.custom_partitioning`: a Shardy sharding rule that ties the batch axis N
   (axis 0 of every activation, in both layouts) and the channel groups of activations and
   weights across operands and results, and a `partition` callback that keeps N sharded as the
   operands arrive, keeps channels sharded when the shards hold whole groups (this is how vmapped
   weights, folded into groups by the batching rules, stay split: per-example gradients, a batch
   of models), replicates everything else (space, a channel split that cuts groups) and runs the
   kernel on the local shard. A result without N (the weight gradient, a sum over N) is completed
   by one `psum` over the mesh axes that shard N: the single all-reduce of data parallelism. On
   one device, and inside `shard_map` (all axes manual), custom_partitioning inlines the plain
   FFI call.

2. Inside `shard_map`, JAX types every value with the manual mesh axes it varies over ("vma").
   A primitive's output must vary over the union of its operands' axes, and a replicated weight
   that meets a batch-sharded input must be cast to varying *outside* the custom_vjp, so that AD
   transposes that cast into the psum which sums the per-shard weight gradients. (Without the
   cast JAX rejects the custom_vjp's varying weight cotangent; an FFI call whose result drops
   the varying axes altogether leaves that gradient per-shard.) `match_vma` does the cast.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# ----------------------------------------------------------------------------------------------
# Varying manual axes (shard_map).


def varying_axes(x: Any) -> frozenset:
    """The manual mesh axes x varies over (empty outside shard_map or with check_vma=False)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax >= 0.10: ManualAxisType(varying=...)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # jax 0.7 - 0.9


def _cast_to_varying(x: jax.Array, axes: tuple) -> jax.Array:
    if hasattr(jax.lax, "pcast"):  # jax >= 0.9
        return jax.lax.pcast(x, axes, to="varying")
    # jax 0.6 - 0.8 (deprecated from 0.9 on, removed since: not in the type stubs)
    return jax.lax.pvary(x, axes)  # type: ignore[attr-defined]


def match_vma(*args):
    """Casts every array to vary over the union of the manual axes any of them varies over."""
    union = frozenset().union(*(varying_axes(a) for a in args))
    if not union:
        return args
    return tuple(
        a
        if varying_axes(a) == union
        else _cast_to_varying(a, tuple(sorted(union - varying_axes(a))))
        for a in args
    )


def out_aval(like: Any, shape: tuple[int, ...], dtype: Any, *, batched: bool) -> Any:
    """The abstract value of a result: `like`'s varying axes and mesh; in explicit-sharding mode
    the batch axis keeps `like`'s sharding (batched=True) or everything is replicated."""
    if not isinstance(like, jax.core.ShapedArray):  # an array or tracer, not its type
        like = jax.typeof(like)
    sharding = like.sharding
    spec = getattr(sharding, "spec", None)
    if spec is not None:
        lead = spec[0] if batched and len(spec) else None
        spec = P(lead, *([None] * (len(shape) - 1)))
        # NamedSharding.update arrived in jax 0.6; 0.5 has with_spec.
        sharding = (
            sharding.update(spec=spec) if hasattr(sharding, "update") else sharding.with_spec(spec)
        )
    return like.update(shape=tuple(shape), dtype=dtype, sharding=sharding)


# ----------------------------------------------------------------------------------------------
# Partitioning under jit.


def mark_needs_devices(prim: Any) -> bool:
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
    PARTITIONED.append(prim)
    return True


# The primitives mark_needs_devices registered (all of them unless this jax lacks the hook):
# tests/test_versions.py fails when one is missing, so a jax without the hook is noticed.
PARTITIONED: list = []


def for_export(ctx: Any) -> bool:
    """Whether this lowering is for jax.export (LoweringParameters.for_export)."""
    params = getattr(ctx.module_context, "lowering_parameters", None)
    return bool(getattr(params, "for_export", False))


@dataclasses.dataclass(frozen=True)
class Split:
    """How one kernel's operands and results may be split over devices.

    dims(geom) -> (operand dims, result dims): a string per array with a letter per axis,
    'n' for the batch N, 'g' for channels (which come in whole groups), '.' for anything else.
    A result without 'n' is a sum over N (the weight gradient).
    groups(geom): the number of channel groups, or None when every channel is independent
    (pooling). local(geom, parts): the geometry of one of `parts` equal slices of the groups.
    """

    dims: Callable
    groups: Callable
    local: Callable


def _entry_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _spec_entry(shape_and_sharding, axis):
    """The mesh axes (a PartitionSpec entry) that shard `axis` of an operand, or None."""
    sharding = shape_and_sharding.sharding
    spec = getattr(sharding, "spec", None)
    if not isinstance(sharding, NamedSharding) or spec is None or len(spec) <= axis:
        return None
    return spec[axis]


def _parts(mesh: Any, entry: Any) -> int:
    return math.prod(mesh.shape[a] for a in _entry_axes(entry))


def _sharding_rule(split: Split) -> Callable:
    """Shardy's view (used for propagation): the batch factor n is shared by every array that
    has it (a reduction factor when a result lacks it); grouped channel axes share the factor g
    of size `groups` (the rest of the axis is per array); everything else is per array."""

    def rule(geom, mesh, operand_types, result_types):
        dims_in, dims_out = split.dims(geom)
        groups = split.groups(geom)
        fresh = (f"d{i}" for i in itertools.count())
        options = {}

        def mapping(dims, ir_type):
            shape = mlir.ir.RankedTensorType(ir_type).shape
            out = []
            for d, size in zip(dims, shape):
                if d == "n":
                    out.append("n")
                elif d == "g" and groups is None:
                    out.append("c")
                elif d == "g" and groups > 1 and size == groups:  # one channel per group
                    out.append("g")
                elif d == "g" and groups > 1 and size:  # (group, channel within the group)
                    options["g"] = groups
                    options[within := next(fresh)] = size // groups
                    out.append(f"(g {within})")
                else:  # (Shardy refuses size-1 factors in a compound: no g for one group)
                    out.append(next(fresh))
            return " ".join(out)

        text = (
            f"{', '.join(map(mapping, dims_in, operand_types))} -> "
            f"{', '.join(map(mapping, dims_out, result_types))}"
        )
        if not all("n" in d for d in dims_out):
            options["reduction_factors"] = ("n",)
        return text, options

    return rule


# The psum that completes a sum over N inside the partitioned lowering, lowered with no mesh
# in context.
#
# XLA calls the partition callback while compiling, so its lower_fn is traced and lowered under
# whatever mesh is current then. Under an Explicit mesh (jax.set_mesh; make_mesh's default) a
# psum lowered there builds its reduction body from ops typed with that mesh: the add comes
# wrapped in `Sharding` custom calls, which an all-reduce cannot run (jax 0.12: "UNIMPLEMENTED:
# Unsupported reduction computation"). Everything in lower_fn is already per shard, placed by
# the shardings the callback returns, so the psum needs no mesh: this primitive lowers the very
# same psum with the empty mesh current.
_psum_p = Primitive("jaxconv_psum")
_psum_p.def_abstract_eval(lambda x, *, axes: x)


def _psum_lowering(ctx, x, *, axes):
    lower_psum = mlir.lower_fun(lambda v: jax.lax.psum(v, axes), multiple_results=False)
    use_abstract_mesh = getattr(jax.sharding, "use_abstract_mesh", None)  # jax >= 0.6
    if use_abstract_mesh is None:
        return lower_psum(ctx, x)
    with use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return lower_psum(ctx, x)


mlir.register_lowering(_psum_p, _psum_lowering)


def _psum_without_mesh(x: jax.Array, axes: tuple) -> jax.Array:
    return _psum_p.bind(x, axes=tuple(axes))


def partitioned(local_call: Callable, n_operands: int, split: Split) -> Callable:
    """Wraps local_call(*operands, geom) -> tuple of results in custom_partitioning.

    The partition callback keeps N sharded as the first operand with a sharded N has it, keeps
    the channels sharded as the first operand with sharded channels has them if that cuts the
    channel groups into equal whole parts, and replicates everything else; a shard count that
    does not divide N (or the groups) is not kept either, since XLA would pad the shards and
    the padding would leak into sums over N. Results without N are psum-ed over N's axes.
    """

    def partition(geom, mesh, arg_shapes, result_shape):
        dims_in, dims_out = split.dims(geom)

        def first_entry(letter):
            for shape, dims in zip(arg_shapes, dims_in):
                if letter in dims:
                    entry = _spec_entry(shape, dims.index(letter))
                    if entry is not None:
                        return entry, shape.shape[dims.index(letter)]
            return None, 0

        n_entry, n_size = first_entry("n")
        if n_entry is not None and n_size % _parts(mesh, n_entry):
            n_entry = None
        g_entry, channels = first_entry("g")
        groups = split.groups(geom)
        groups = channels if groups is None else groups
        if g_entry is not None and (
            set(_entry_axes(g_entry)) & set(_entry_axes(n_entry)) or groups % _parts(mesh, g_entry)
        ):
            g_entry = None
        g_parts = _parts(mesh, g_entry)
        local_geom = split.local(geom, g_parts) if g_parts > 1 else geom

        def sharding(dims, shape):
            entries = {"n": n_entry, "g": g_entry if math.prod(shape) else None}
            return NamedSharding(mesh, P(*(entries.get(d) for d in dims)))

        arg_shardings = tuple(sharding(d, a.shape) for d, a in zip(dims_in, arg_shapes))
        results = result_shape if isinstance(result_shape, (tuple, list)) else (result_shape,)
        result_shardings = tuple(sharding(d, r.shape) for d, r in zip(dims_out, results))
        sum_axes = _entry_axes(n_entry)

        def lower_fn(*operands):
            outs = local_call(*operands, local_geom)
            return tuple(
                o if "n" in d or not sum_axes else _psum_without_mesh(o, sum_axes)
                for o, d in zip(outs, dims_out)
            )

        return mesh, lower_fn, result_shardings, arg_shardings

    def infer(geom, mesh, arg_shapes, result_shape):  # GSPMD propagation (Shardy uses the rule)
        return partition(geom, mesh, arg_shapes, result_shape)[2]

    def fn(*args):
        return local_call(*args[:-1], args[-1])

    cp = custom_partitioning(fn, static_argnums=(n_operands,))
    cp.def_partition(
        partition=partition, infer_sharding_from_operands=infer, sharding_rule=_sharding_rule(split)
    )
    return cp
