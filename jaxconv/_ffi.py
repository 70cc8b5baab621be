"""Loads the compiled extension modules and registers every FFI target with XLA.

Importing jaxconv is enough: the CPU targets are always registered, the CUDA ones when the CUDA
extension was built and the CUDA runtime loads. Each module exposes `registrations()`, the single
table from full target name (e.g. "jaxconv_conv2d_fwd", spelled once in C++) to handler capsule;
Python takes the names from there (`target("conv2d_fwd")`) instead of repeating them.
"""

from __future__ import annotations

import importlib.util as _importlib_util
import os
import types
import warnings as _warnings

import jax

from ._cuda_driver import warn_if_driver_too_old, warn_if_gpu_unsupported

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
        "checkout after `pip install .`"
    ) from _err

# The CPU kernels' instruction set, chosen once: the highest the CPU has, or the one the
# environment variable JAXCONV_CPU_CAPABILITY (baseline, avx2, avx512, avx512_bf16) names. A
# value that is not a capability of this CPU fails the import with a ValueError naming it.
CPU_CAPABILITY_ENV = "JAXCONV_CPU_CAPABILITY"
CPU_CAPABILITY: str = _jaxconv_cpu.cpu_capability()


def cpu_capability() -> str:
    """The instruction set of the CPU kernels that run: "baseline", "avx2", "avx512" or
    "avx512_bf16" (avx512 with the bfloat16 GEMM on vdpbf16ps)."""
    return CPU_CAPABILITY


def cpu_gemm_kernels() -> dict[str, str]:
    """{dtype name: the GEMM its direct (im2col) convolutions run on under the active
    capability}: "float32" (half types widened), "float64", or "vdpbf16ps" for bfloat16 under
    avx512_bf16."""
    return dict(_jaxconv_cpu.cpu_gemm_kernels())


def cpu_capabilities() -> tuple[str, ...]:
    """Every capability this CPU (and build) can run, lowest first; JAXCONV_CPU_CAPABILITY may
    name any of them."""
    return tuple(_jaxconv_cpu.cpu_capabilities())


TARGETS: tuple[str, ...] = tuple(sorted(_jaxconv_cpu.registrations()))

# Every target name is "jaxconv_" + the kernel's short name ("conv2d_fwd", "max_pool2d_bwd", ...).
TARGET_PREFIX = "jaxconv_"
_TARGET_BY_KERNEL = {
    name[len(TARGET_PREFIX) :]: name for name in TARGETS if name.startswith(TARGET_PREFIX)
}


def target(kernel: str) -> str:
    """The registered FFI target name of a kernel, e.g. "conv2d_fwd" -> "jaxconv_conv2d_fwd"."""
    try:
        return _TARGET_BY_KERNEL[kernel]
    except KeyError:
        raise LookupError(
            f"the CPU extension registers no target for kernel {kernel!r}; it "
            f"registers {TARGETS} (rebuild it: pip install -e .)"
        ) from None


for _name, _capsule in _jaxconv_cpu.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")

# The CUDA module is built only where nvcc was found. Loading it and registering its targets
# need no GPU and no driver (the CUDA runtime is linked statically; without a GPU backend XLA
# keeps the "CUDA" registrations pending). A module that was built but does not load is
# reported rather than silently dropped.
_jaxconv_cuda: types.ModuleType | None = None
if _importlib_util.find_spec(f"{__package__}._jaxconv_cuda") is not None:
    try:
        from . import _jaxconv_cuda as _cuda_module

        _jaxconv_cuda = _cuda_module
    except ImportError as _err:  # pragma: no cover - depends on the build
        _warnings.warn(
            f"jaxconv: the CUDA extension was built but does not load ({_err}); "
            "only the CPU kernels are registered",
            RuntimeWarning,
            stacklevel=2,
        )

HAS_CUDA_MODULE: bool = _jaxconv_cuda is not None

if _jaxconv_cuda is not None:
    for _name, _capsule in _jaxconv_cuda.registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")
    # A driver too old for the module's runtime, or a GPU that can run none of the module's
    # architectures: say so once, with what to do (the first makes the second unanswerable).
    if warn_if_driver_too_old(_jaxconv_cuda) is None:
        warn_if_gpu_unsupported(_jaxconv_cuda)


def export_safety_checks() -> list[jax.export.DisabledSafetyCheck]:
    """The ``disabled_checks`` that ``jax.export.export`` needs for code that uses jaxconv.

    jax.export refuses custom calls that lack a compatibility guarantee; jaxconv's kernels are
    such calls (FFI targets), whose attributes and operands are the contract in
    docs/design.md. Usage::

        exported = jax.export.export(jax.jit(f),
                                     disabled_checks=jaxconv.export_safety_checks())(x)

    Returns:
      One ``jax.export.DisabledSafetyCheck.custom_call`` per registered target.

    The process that deserializes and runs the artifact must ``import jaxconv`` first (importing
    it registers the targets). Exported code holds the plain per-device calls: a batch-sharded
    input is gathered by XLA unless the exported function is a ``shard_map``.
    """
    from jax import export

    return [export.DisabledSafetyCheck.custom_call(name) for name in TARGETS]
