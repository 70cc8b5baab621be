# Type stub of the compiled CPU extension (ffi/module_cpu.cc).
from typing import Any

def registrations() -> dict[str, Any]:
    """{full FFI target name: handler capsule}, one entry per CPU target."""

def conv_algorithm(
    direction: str,
    float64: bool,
    x: list[int],
    w: list[int],
    attrs: list[int],
    bfloat16: bool = False,
) -> str:
    """The CPU algorithm (direct, winograd2/4, "fft PxQ/THxTW") one conv call would take."""

def cpu_capability() -> str:
    """The instruction-set capability whose kernels run: "baseline", "avx2", "avx512" or
    "avx512_bf16"."""

def cpu_capabilities() -> list[str]:
    """Every capability this CPU and build can run, lowest first."""

def cpu_gemm_kernels() -> dict[str, str]:
    """{dtype name: the GEMM its direct convolutions run on}: "float32", "float64", "vdpbf16ps"."""
