# Type stub of the compiled CUDA extension (ffi/module_cuda.cc).
from typing import Any

def registrations() -> dict[str, Any]:
    """{full FFI target name: handler capsule}, one entry per CUDA target."""

def runtime_version() -> int:
    """CUDART_VERSION of the statically linked CUDA runtime, e.g. 13000."""

def driver_version() -> int:
    """The newest CUDA version the installed driver supports; 0 without a driver."""
