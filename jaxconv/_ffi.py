"""Loads the compiled extension modules and registers every FFI target with XLA.

Importing jaxconv is enough: the CPU targets are always registered, the CUDA ones when the CUDA
extension was built and the CUDA runtime loads. Each module exposes `registrations()`, the single
table from target name to handler capsule.
"""
from __future__ import annotations

import importlib.util as _importlib_util
import os

import jax

try:
    from . import _jaxconv_cpu
except ImportError as _err:
    if _importlib_util.find_spec(f"{__package__}._jaxconv_cpu") is not None:
        raise  # the extension is there but does not load: its own error says why
    # Not there: Python found a source checkout (e.g. the current directory, which `python -m`
    # and `python -c` put first on sys.path) instead of the installed package.
    raise ImportError(
        f"jaxconv's compiled CPU extension (_jaxconv_cpu) is missing from "
        f"{os.path.dirname(os.path.abspath(__file__))}: this looks like an unbuilt source "
        "checkout. Install it in place with `pip install -e .`, or run from outside the "
        "checkout after `pip install .`") from _err

TARGETS: tuple[str, ...] = tuple(sorted(_jaxconv_cpu.registrations()))

for _name, _capsule in _jaxconv_cpu.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")

# The CUDA module is built only where nvcc was found. Loading it and registering its targets
# need no GPU and no driver (the CUDA runtime is linked statically; without a GPU backend XLA
# keeps the "CUDA" registrations pending). A module that was built but does not load is
# reported rather than silently dropped.
import warnings as _warnings  # noqa: E402

_jaxconv_cuda = None
if _importlib_util.find_spec(f"{__package__}._jaxconv_cuda") is not None:
    try:
        from . import _jaxconv_cuda  # type: ignore[attr-defined]
    except ImportError as _err:  # pragma: no cover - depends on the build
        _warnings.warn(f"jaxconv: the CUDA extension was built but does not load ({_err}); "
                       "only the CPU kernels are registered", RuntimeWarning, stacklevel=2)

HAS_CUDA_MODULE: bool = _jaxconv_cuda is not None

if _jaxconv_cuda is not None:
    for _name, _capsule in _jaxconv_cuda.registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")
    from ._cuda_driver import warn_if_driver_too_old  # noqa: E402
    warn_if_driver_too_old(_jaxconv_cuda)  # a driver too old for the module's runtime: say so


def export_safety_checks() -> list:
    """What `jax.export.export(..., disabled_checks=...)` needs to serialize code using jaxconv.

    jax.export refuses custom calls without a compatibility guarantee; these are jaxconv's
    targets, whose attributes and operands are the contract in DESIGN.md. The process that
    deserializes and runs the artifact must `import jaxconv` first (it registers the targets).
    """
    from jax import export
    return [export.DisabledSafetyCheck.custom_call(name) for name in TARGETS]


# --- one JAX primitive per FFI target --------------------------------------------------------
#
# Each target is wrapped in a primitive whose only parameter is a frozen geometry record (see
# _args.py). The primitive gives us what a bare ffi_call cannot: our own batching rules (vmap
# folds into the batch or channel axis instead of looping) and a single lowering that turns the
# geometry into the integer attributes the handlers read.
import functools  # noqa: E402

import numpy as np  # noqa: E402
from jax.extend.core import Primitive  # noqa: E402
from jax.interpreters import batching, mlir  # noqa: E402

from . import _sharding  # noqa: E402


# How vmap marks an operand that is not mapped (jax removed the batching.not_mapped alias in 0.10;
# the value has always been None).
NOT_MAPPED = None


def make_primitive(target: str, abstract_eval, batch_rule, *, n_operands: int,
                   split: _sharding.Split, multiple_results: bool = False):
    """The primitive for one FFI target; `split` says how it divides over devices."""
    prim = Primitive(target)
    prim.multiple_results = multiple_results

    @functools.lru_cache(maxsize=None)
    def _jitted(geom):
        return jax.jit(lambda *args: prim.bind(*args, geom=geom))

    prim.def_impl(lambda *args, geom: _jitted(geom)(*args))
    prim.def_abstract_eval(abstract_eval)

    # The kernel on whatever shapes it is given (one device, or one shard): a second primitive
    # with the plain FFI lowering, which the partitioned lowering below calls.
    local = Primitive(target + "_local")
    local.multiple_results = multiple_results
    local.def_abstract_eval(abstract_eval)
    ffi_rule = jax.ffi.ffi_lowering(target)

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
    return prim
