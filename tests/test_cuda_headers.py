"""The tensor-core kernels' level headers (ffi/cuda/conv2d_mma_*.cuh, see conv2d_mma.cuh) are
self-contained: each compiles as the first include of a translation unit, under nvcc (C++17, as
the module builds) and under the host emulation (tests/cuda_emulation/emulate.h, which must come
first by design, then the header). A header that uses a name it does not include fails here
with the compiler's message, instead of compiling only in the order conv2d_kernels.cuh happens to
include it.

The kernel and launcher levels (conv2d_mma_pass.cuh, _filter.cuh, _launch.cuh) use the conv
problem types that conv2d_kernels.cuh defines before including the umbrella; they are compiled
here through conv2d_kernels.cuh, alone as well.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from emulation import EMU_DIR, FFI_DIR, cuda_include, cxx

STANDALONE = [
    "cuda/conv2d_mma_tile.cuh",
    "cuda/conv2d_mma_fragment.cuh",
    "cuda/conv2d_mma_mainloop.cuh",
    "cuda/conv2d_kernels.cuh",  # with the umbrella conv2d_mma.cuh and the kernel levels
]


def test_every_level_header_is_listed():
    levels = sorted(p.name for p in (FFI_DIR / "cuda").glob("conv2d_mma_*.cuh"))
    needs_problem = ["conv2d_mma_filter.cuh", "conv2d_mma_launch.cuh", "conv2d_mma_pass.cuh"]
    alone = sorted(h.split("/")[1] for h in STANDALONE if "conv2d_mma_" in h)
    assert sorted(alone + needs_problem) == levels


def _compile(cmd, source, tmp_path):
    src = tmp_path / "unit.cc"
    src.write_text(source)
    res = subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)} on\n{source}\n{res.stderr[-3000:]}"


@pytest.mark.parametrize("header", STANDALONE)
def test_header_compiles_alone_under_the_emulation(header, tmp_path):
    compiler, inc = cxx(), cuda_include()
    if compiler is None or inc is None:
        pytest.skip("no C++ compiler or no CUDA headers")
    cmd = [compiler, "-std=c++20", "-fsyntax-only", "-I", inc, "-I", str(EMU_DIR)]
    _compile([*cmd, "-I", str(FFI_DIR)], f'#include "emulate.h"\n#include "{header}"\n', tmp_path)


@pytest.mark.parametrize("header", STANDALONE)
def test_header_compiles_alone_under_nvcc(header, tmp_path):
    nvcc = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if shutil.which("/usr/local/cuda/bin/nvcc") else None
    )
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-std=c++17", "-x", "cu", "-arch=sm_90", "-c", "-o", str(tmp_path / "unit.o")]
    _compile([*cmd, "-I", str(FFI_DIR)], f'#include "{header}"\n', tmp_path)
