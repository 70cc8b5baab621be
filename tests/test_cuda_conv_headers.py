"""Each CUDA convolution header compiles alone (issue 24: the conv headers split by level, each
self-contained): a translation unit holding nothing but `#include "cuda/<header>"`, under the
host emulation's C++ compiler (tests/cuda_emulation/emulate.h first, as every emulation library
does) and, where nvcc is installed, under nvcc for sm_90. A header that leans on an include its
includer happened to make first fails here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from emulation import EMU_DIR, FFI_DIR, cuda_include, cxx

pytestmark = pytest.mark.slow("runs the C++ compiler and nvcc once per header (a few seconds each)")

# The levels of conv2d_kernels.cuh (its file comment), the umbrella itself, and the direct
# kernels that share split_reduce.cuh. conv2d_mma.cuh is the tensor-core branch's umbrella, which
# expects the problem types before it; conv2d_launch.cuh includes it in that order.
HEADERS = [
    "conv2d_problem.cuh",
    "conv2d_simt.cuh",
    "split_reduce.cuh",
    "conv2d_plan.cuh",
    "conv2d_launch.cuh",
    "conv2d_kernels.cuh",
    "depthwise_kernels.cuh",
]


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None


@pytest.mark.parametrize("header", HEADERS)
def test_header_compiles_alone_on_the_emulation(tmp_path, header):
    compiler, inc = cxx(), cuda_include()
    if compiler is None or inc is None:
        pytest.skip("needs a C++ compiler and the CUDA headers (cuda_bf16.h)")
    src = tmp_path / "one.cc"
    src.write_text(f'#include "emulate.h"\n#include "cuda/{header}"\n')
    cmd = [compiler, "-std=c++20", "-fsyntax-only", "-I", str(EMU_DIR), "-I", str(FFI_DIR)]
    cmd += ["-I", inc, str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"


@pytest.mark.parametrize("header", HEADERS)
def test_header_compiles_alone_under_nvcc(tmp_path, header):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not installed")
    src = tmp_path / "one.cu"
    src.write_text(f'#include "cuda/{header}"\n')
    cmd = [nvcc, "-std=c++20", "-x", "cu", "-arch=sm_90", "-I", str(FFI_DIR), "-c", str(src)]
    cmd += ["-o", str(tmp_path / "one.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
