"""The CUDA extension module, checked on machines without a GPU: where the package was built
with nvcc, it loads without a GPU or driver and registers exactly the CPU module's targets
(skipped where it was not built), and a fresh process that imports jaxconv still computes on
the CPU."""

from __future__ import annotations

import importlib.util

import pytest

from jaxconv import _ffi

from child import run_python

# The extension module.


def _cuda_module_built() -> bool:
    return importlib.util.find_spec("jaxconv._jaxconv_cuda") is not None


def test_cuda_module_registers_the_cpu_targets():
    if not _cuda_module_built():
        pytest.skip("jaxconv was built without the CUDA extension (no nvcc)")
    from jaxconv import _jaxconv_cpu, _jaxconv_cuda  # a broken build fails here

    assert _ffi.HAS_CUDA_MODULE
    cuda, cpu = _jaxconv_cuda.registrations(), _jaxconv_cpu.registrations()
    assert sorted(cuda) == sorted(cpu) == sorted(_ffi.TARGETS)
    assert all(type(c).__name__ == "PyCapsule" for c in cuda.values())


def test_import_registers_targets_without_a_gpu():
    """A fresh process imports jaxconv (registering the CUDA targets where the module exists,
    for a platform this jaxlib may not have) and still computes on CPU."""
    code = (
        "import jax, jax.numpy as jnp, jaxconv\n"
        "from jaxconv import _ffi\n"
        "x = jnp.arange(2 * 3 * 5 * 5, dtype=jnp.float32).reshape(2, 3, 5, 5)\n"
        "y = jaxconv.conv2d(x, jnp.ones((4, 3, 3, 3), jnp.float32), padding=1)\n"
        "assert y.shape == (2, 4, 5, 5), y.shape\n"
        "print(_ffi.HAS_CUDA_MODULE)\n"
    )
    out = run_python("-c", code, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(_cuda_module_built())


# ---------------------------------------------------------------------------------------------
# Compiling the probes.
