"""Is the installed NVIDIA driver new enough for the CUDA runtime the CUDA module was built with?

The CUDA module links the CUDA runtime statically, so it imports everywhere; but a runtime of
CUDA major version M needs a driver that supports CUDA M (CUDA 13 needs driver >= 580, CUDA 12
driver >= 525). Within one major version, CUDA's minor-version compatibility lets a newer
runtime run on an older driver of the same major version, since the module carries machine code
(SASS) for its architectures and needs no PTX compilation by the driver. With a driver that is
too old, every jaxconv call on the GPU fails with cudaErrorInsufficientDriver; this module turns
that into one warning at import, saying what to do. The CPU targets are unaffected.

`driver_mismatch` is a pure function of the two version numbers (unit-tested without a GPU);
`warn_if_driver_too_old` reads them from the CUDA module and warns once.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

# Oldest Linux driver branch that supports each CUDA major version (NVIDIA's CUDA toolkit
# release notes, "CUDA Toolkit and Corresponding Driver Versions").
MIN_DRIVER_BRANCH = {11: 450, 12: 525, 13: 580}

_warned = False


def version_text(version: int) -> str:
    """CUDA's integer encoding (1000 * major + 10 * minor, as CUDART_VERSION and
    cudaDriverGetVersion give it) as "major.minor": 12080 -> "12.8"."""
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_mismatch(runtime_version: int, driver_version: int) -> str | None:
    """The warning text when a module built with CUDA runtime `runtime_version` cannot run under
    a driver that supports CUDA up to `driver_version`; None when it can, or when there is no
    driver (driver_version 0: no GPU can be used, so there is nothing to warn about)."""
    if driver_version <= 0 or runtime_version <= 0:
        return None
    runtime_major, driver_major = runtime_version // 1000, driver_version // 1000
    if driver_major >= runtime_major:
        return None
    branch = MIN_DRIVER_BRANCH.get(runtime_major)
    needs = f" (CUDA {runtime_major} needs driver >= {branch})" if branch else ""
    return (f"jaxconv: the NVIDIA driver supports CUDA up to {version_text(driver_version)}, "
            f"but jaxconv's CUDA module was built with CUDA runtime "
            f"{version_text(runtime_version)}{needs}, so its GPU kernels will fail with "
            f"cudaErrorInsufficientDriver. Rebuild jaxconv with a CUDA toolkit <= "
            f"{driver_major}.x (e.g. CUDACXX=/usr/local/cuda-{driver_major}/bin/nvcc "
            f"pip install --no-build-isolation -e .) or update the driver. The CPU targets "
            f"keep working.")


def _gpu_hidden() -> bool:
    """CUDA_VISIBLE_DEVICES set to nothing (or -1) hides every GPU from this process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible is not None and visible.strip() in ("", "-1")


def warn_if_driver_too_old(cuda_module: Any) -> str | None:
    """Warns (once per process) when the driver is too old for `cuda_module`'s runtime; returns
    the message, or None. A GPU counts as visible when a driver is installed and
    CUDA_VISIBLE_DEVICES does not hide every device: asking JAX instead would initialize its
    backends at import, which must not happen before e.g. jax.distributed.initialize()."""
    global _warned
    if _gpu_hidden():
        return None
    message = driver_mismatch(cuda_module.runtime_version(), cuda_module.driver_version())
    if message is not None and not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return message
