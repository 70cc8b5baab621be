# Type stub of the compiled CUDA extension (ffi/module_cuda.cc).
from typing import Any

def registrations() -> dict[str, Any]:
    """{full FFI target name: handler capsule}, one entry per CUDA target."""

def runtime_version() -> int:
    """CUDART_VERSION of the statically linked CUDA runtime, e.g. 13000."""

def driver_version() -> int:
    """The newest CUDA version the installed driver supports; 0 without a driver."""

def cuda_architectures() -> dict[str, list[str]]:
    """The architectures the module holds code for: {"sass": [...], "ptx": [...]}."""

def device_capabilities() -> list[tuple[int, int]]:
    """Each visible GPU's compute capability (major, minor), in device order."""
