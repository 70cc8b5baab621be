# Type stub of the compiled CPU extension (ffi/module_cpu.cc).
from typing import Any

def registrations() -> dict[str, Any]:
    """{full FFI target name: handler capsule}, one entry per CPU target."""
