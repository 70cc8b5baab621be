"""Every CUDA header under ffi/cuda is self-contained (issue 24: the headers split by level, as
CUTLASS does): a translation unit holding nothing but `#include "cuda/<header>"` compiles under
the host emulation's C++ compiler (tests/cuda_emulation/emulate.h first, as every emulation
library does) and, where nvcc is installed, under nvcc for sm_90 (C++17, as the module builds).
A header that leans on an include its includer happened to make first fails here with the
compiler's message."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from emulation import EMU_DIR, FFI_DIR, cuda_include, cxx

pytestmark = pytest.mark.slow("runs the C++ compiler and nvcc once per header (seconds each)")

HEADERS = sorted(p.name for p in (FFI_DIR / "cuda").glob("*.cuh"))


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None


def _compile(cmd, source, src):
    src.write_text(source)
    res = subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)} on\n{source}\n{res.stderr[-4000:]}"


def test_the_levels_are_all_here():
    # The split this file guards: the conv umbrella headers and their levels.
    for name in ["conv2d_problem.cuh", "conv2d_simt.cuh", "split_reduce.cuh", "conv2d_plan.cuh",
                 "conv2d_launch.cuh", "conv2d_mma_tile.cuh", "conv2d_mma_fragment.cuh",
                 "conv2d_mma_mainloop.cuh", "conv2d_mma_pass.cuh", "conv2d_mma_filter.cuh",
                 "conv2d_mma_launch.cuh"]:  # fmt: skip
        assert name in HEADERS


@pytest.mark.parametrize("header", HEADERS)
def test_header_compiles_alone_under_the_emulation(header, tmp_path):
    compiler, inc = cxx(), cuda_include()
    if compiler is None or inc is None:
        pytest.skip("needs a C++ compiler and the CUDA headers (cuda_bf16.h)")
    cmd = [compiler, "-std=c++20", "-fsyntax-only", "-I", str(EMU_DIR), "-I", str(FFI_DIR)]
    _compile([*cmd, "-I", inc], f'#include "emulate.h"\n#include "cuda/{header}"\n',
             tmp_path / "one.cc")  # fmt: skip


@pytest.mark.parametrize("header", HEADERS)
def test_header_compiles_alone_under_nvcc(header, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not installed")
    cmd = [nvcc, "-std=c++17", "-x", "cu", "-arch=sm_90", "-I", str(FFI_DIR), "-c"]
    _compile([*cmd, "-o", str(tmp_path / "one.o")], f'#include "cuda/{header}"\n',
             tmp_path / "one.cu")  # fmt: skip
