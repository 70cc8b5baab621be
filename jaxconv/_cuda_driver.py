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
    return (
        f"jaxconv: the NVIDIA driver supports CUDA up to {version_text(driver_version)}, "
        f"but jaxconv's CUDA module was built with CUDA runtime "
        f"{version_text(runtime_version)}{needs}, so its GPU kernels will fail with "
        f"cudaErrorInsufficientDriver. Rebuild jaxconv with a CUDA toolkit <= "
        f"{driver_major}.x (e.g. CUDACXX=/usr/local/cuda-{driver_major}/bin/nvcc "
        f"pip install --no-build-isolation -e .) or update the driver. The CPU targets "
        f"keep working."
    )


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


# ---- Can the visible GPUs run the module's code? -----------------------------------------------
# The CUDA module holds machine code (SASS) and/or PTX for the architectures it was built for
# (JAXCONV_CUDA_ARCHITECTURES, default "80;90-real"; the module reports them). A GPU runs SASS
# built for its own major version and a minor version no newer than its own ("80" SASS runs on
# 8.0, 8.6, 8.9; never on 9.0), arch-specific SASS ("90a") only on exactly that GPU, and PTX for
# any architecture no newer than its own (the driver compiles it at first use). A GPU that can
# run none of it fails every jaxconv call with cudaErrorNoKernelImageForDevice; this turns that
# into one warning at import that says what to build. jaxconv's kernels need sm_80 or newer
# (tensor-core instructions: mma.sync on bf16/f16/TF32, cp.async, ldmatrix), so the build
# refuses older architectures and a GPU below 8.0 (T4: 7.5) is told so (docs/gpu.md,
# "Architectures").

MIN_CAPABILITY = (8, 0)

_warned_arch = False


def parse_architecture(entry: str) -> tuple[int, int, bool]:
    """A CMake architecture number as the module reports it -> (major, minor, exact):
    "80" -> (8, 0, False), "120" -> (12, 0, False), "90a" -> (9, 0, True) (arch-specific code,
    for exactly that GPU; "f", family-specific, runs like the plain number)."""
    digits = entry.rstrip("af")
    if not digits.isdigit() or len(digits) < 2:
        raise ValueError(f"not a CUDA architecture number: {entry!r}")
    return int(digits[:-1]), int(digits[-1]), entry.endswith("a")


def runs_on(capability: tuple[int, int], sass: list[str], ptx: list[str]) -> bool:
    """Whether a GPU of this compute capability can run a module holding `sass` and `ptx`."""
    major, minor = capability
    for entry in sass:
        s_major, s_minor, exact = parse_architecture(entry)
        if s_major == major and (s_minor == minor if exact else s_minor <= minor):
            return True
    for entry in ptx:
        p_major, p_minor, exact = parse_architecture(entry)
        if (p_major, p_minor) == (major, minor) if exact else (p_major, p_minor) <= (major, minor):
            return True
    return False


def architecture_spec(sass: list[str], ptx: list[str]) -> str:
    """The JAXCONV_CUDA_ARCHITECTURES value that built this module: "80;90-real"."""
    entries = []
    for entry in sorted(set(sass) | set(ptx), key=lambda e: (parse_architecture(e), e)):
        if entry in sass and entry in ptx:
            entries.append(entry)
        elif entry in sass:
            entries.append(f"{entry}-real")
        else:
            entries.append(f"{entry}-virtual")
    return ";".join(entries)


def architecture_mismatch(
    capabilities: list[tuple[int, int]], sass: list[str], ptx: list[str]
) -> str | None:
    """The warning text when some of the GPUs (their compute capabilities, in device order)
    cannot run a module holding `sass` and `ptx`; None when all can (or there are none)."""
    unable = [
        (i, (c[0], c[1]))
        for i, c in enumerate(capabilities)
        if not runs_on((c[0], c[1]), sass, ptx)
    ]
    if not unable:
        return None
    built = architecture_spec(sass, ptx) or "nothing"
    names = ", ".join(f"GPU {i} (compute capability {c[0]}.{c[1]})" for i, c in unable)
    head = (
        f"jaxconv: its CUDA module was built for {built} (JAXCONV_CUDA_ARCHITECTURES), which "
        f"{names} cannot run: every jaxconv call placed on "
        f"{'it' if len(unable) == 1 else 'them'} would fail with "
        f"cudaErrorNoKernelImageForDevice."
    )
    old = sorted({c for _, c in unable if c < MIN_CAPABILITY})
    new = sorted({c for _, c in unable if c >= MIN_CAPABILITY})
    advice = []
    if new:
        wanted = ";".join(
            ([built] if built != "nothing" else []) + [f"{c[0]}{c[1]}-real" for c in new]
        )
        advice.append(
            f"Rebuild jaxconv with code for "
            f"{'it' if len(new) == 1 else 'them'}: JAXCONV_CUDA_ARCHITECTURES="
            f'"{wanted}" pip install --no-build-isolation -e . (the default '
            f'"80;90-real" runs on every GPU of compute capability 8.0 or newer).'
        )
    if old:
        advice.append(
            "jaxconv's CUDA kernels need compute capability 8.0 or newer (tensor-core "
            f"instructions of sm_80), so {', '.join(f'{c[0]}.{c[1]}' for c in old)} "
            "cannot be supported by any build: run jaxconv on the CPU there "
            "(jax.devices('cpu')), or on a newer GPU."
        )
    return " ".join([head] + advice)


def _jax_cuda_plugin_installed() -> bool:
    """Whether JAX can use NVIDIA GPUs here (its CUDA plugin is installed)."""
    import importlib.util

    for name in (
        "jax_plugins.xla_cuda13",
        "jax_plugins.xla_cuda12",
        "jax_cuda13_plugin",
        "jax_cuda12_plugin",
    ):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def warn_if_gpu_unsupported(cuda_module: Any) -> str | None:
    """Warns (once per process) when a visible GPU cannot run `cuda_module`'s code; returns the
    message, or None. Asks the CUDA runtime for the GPUs (device_capabilities(): it initializes
    the driver, cuInit, but creates no context), only where JAX's CUDA plugin is installed (so
    that JAX itself initializes the driver at its first use anyway) and no GPU is hidden."""
    global _warned_arch
    if (
        _gpu_hidden()
        or not hasattr(cuda_module, "cuda_architectures")
        or not _jax_cuda_plugin_installed()
    ):
        return None  # (a module built before it reported its architectures: nothing to compare)
    archs = cuda_module.cuda_architectures()
    message = architecture_mismatch(
        cuda_module.device_capabilities(), list(archs["sass"]), list(archs["ptx"])
    )
    if message is not None and not _warned_arch:
        _warned_arch = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return message
