"""The sanitizer harness of benchmarks/gpu_check.sh (benchmarks/sanitize_harness.cu), without a
GPU: built on the host emulation (tests/cuda_emulation/emulate.h) with every launcher of
ffi/cuda/kernel_units.cu in one unit, under AddressSanitizer.

- Its buffers are exact: the element counts it allocates (--list) equal the tensors' sizes from
  JAX's own shape rules (lax.conv_general_dilated, PyTorch's pooling formula in reference.py).
  compute-sanitizer's memcheck on the GPU can then only be silent if no kernel touches an
  element outside its tensor.
- It runs every family it reaches on those buffers under the emulation with malloc for
  cudaMalloc: AddressSanitizer reports any access past a buffer's end (the large-tile case is
  left to the GPU: the emulation runs its 256 tiles too slowly).
"""

import functools
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from jax import lax

from reference import pool_out_size

pytestmark = pytest.mark.slow(
    "builds the sanitizer harness for the emulation with AddressSanitizer"
)

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "benchmarks" / "sanitize_harness.cu"
UNITS = ROOT / "ffi" / "cuda" / "kernel_units.cu"
EMU_DIR = ROOT / "tests" / "cuda_emulation"

# The harness's cases (benchmarks/sanitize_harness.cu, kConvCases / kPoolCases), restated as
# the oracle's input: name -> (n, c, h, w, o, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups).
CONV = {
    "stem_c3": (2, 3, 9, 9, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "depthwise_m2": (2, 16, 10, 10, 32, (3, 3), (2, 2), (1, 1), (1, 1), 16),
    "wide_strided": (1, 8, 11, 10, 70, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    "grouped_dilated": (2, 32, 13, 11, 48, (3, 2), (3, 1), (2, 1), (1, 2), 2),
    "split_filter": (4, 8, 32, 32, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "pointwise_16": (2, 16, 8, 8, 16, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    "large_pass": (2, 16, 128, 128, 96, (1, 1), (1, 1), (0, 0), (1, 1), 1),
}
# name -> (n, c, h, w, kernel, stride, pad, dilation, ceil_mode)
POOL = {
    "pool_c8": (2, 8, 9, 11, (3, 3), 2, 1, 1, True),
    "pool_c5": (2, 5, 9, 11, (3, 3), 2, 1, 1, True),
    "pool_dilated": (1, 3, 10, 9, (2, 3), 1, 0, 2, False),
}


def _cuda_include():
    for c in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if c and (Path(c) / "include" / "cuda_bf16.h").exists():
            return str(Path(c) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc and (Path(nvcc).resolve().parents[1] / "include" / "cuda_bf16.h").exists():
        return str(Path(nvcc).resolve().parents[1] / "include")
    return None


@functools.cache
def _build(out_dir: str) -> Path:
    cxx = shutil.which(os.environ.get("CXX", "") or "g++") or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip("needs a C++ compiler and the CUDA headers (cuda_bf16.h)")
    exe = Path(out_dir) / "harness"
    cmd = [
        cxx,
        "-std=c++20",
        "-O1",
        "-pthread",
        "-fsanitize=address",
        "-fno-omit-frame-pointer",
        "-include",
        str(EMU_DIR / "emulate.h"),
        "-I",
        str(EMU_DIR),
        "-I",
        str(ROOT / "ffi"),
        "-I",
        inc,
        "-DJAXCONV_UNIT=0",
        "-DJAXCONV_UNIT_DTYPE=0",
        "-x",
        "c++",
        str(UNITS),
        "-x",
        "c++",
        str(HARNESS),
        "-o",
        str(exe),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
    return exe


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return _build(str(tmp_path_factory.mktemp("harness")))


def _listed(harness):
    res = subprocess.run([str(harness), "--list"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = {}
    for line in res.stdout.splitlines():
        kind, name, layout, *sizes = line.split()
        out[(kind, name, layout)] = {k: int(v) for k, v in (s.split("=") for s in sizes)}
    return out


def _conv_sizes(name, layout):
    n, c, h, w, o, k, s, p, d, g = CONV[name]
    xs = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
    ws = (o, c // g) + k if layout == "NCHW" else k + (c // g, o)
    dn = ("NCHW", "OIHW", "NCHW") if layout == "NCHW" else ("NHWC", "HWIO", "NHWC")
    y = jax.eval_shape(
        lambda a, b: lax.conv_general_dilated(
            a,
            b,
            s,
            [(p[0], p[0]), (p[1], p[1])],
            rhs_dilation=d,
            feature_group_count=g,
            dimension_numbers=dn,
        ),
        jax.ShapeDtypeStruct(xs, np.float32),
        jax.ShapeDtypeStruct(ws, np.float32),
    )
    return {
        "x": math.prod(xs),
        "w": math.prod(ws),
        "y": math.prod(y.shape),
        "bias_y": o,
        "bias_x": c,
    }


def _pool_sizes(name):
    n, c, h, w, k, s, p, d, ceil = POOL[name]
    oh = pool_out_size(h, k[0], s, d, p, p, ceil)
    ow = pool_out_size(w, k[1], s, d, p, p, ceil)
    return {"x": n * c * h * w, "y": n * c * oh * ow}


def test_harness_buffers_are_the_tensors_exact_sizes(harness):
    listed = _listed(harness)
    want = {}
    for layout in ("NCHW", "NHWC"):
        for name in CONV:
            want[("conv", name, layout)] = _conv_sizes(name, layout)
        for name in POOL:
            want[("pool", name, layout)] = _pool_sizes(name)
    assert listed == want


def test_harness_runs_every_family_on_the_emulation_within_its_buffers(harness):
    """Every case but the large one, both layouts, tensor cores on, in bfloat16 (the 16-bit
    tensor-core kernels, 16-byte pool lanes) and float64 (the SIMT, direct and pool kernels with
    8-byte elements); float32, TF32 and float16 instantiate the same templates and run on the
    GPU (about 30 s of CPU per dtype here, mostly the emulation's thread starts). Exit 0 and no
    AddressSanitizer report (an access past any buffer's end aborts with one)."""
    res = subprocess.run(
        [str(harness), "--skip-large", "--dtypes", "bf16,f64"],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"},
    )
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert "AddressSanitizer" not in res.stderr
    assert "sanitize_harness: all launches ok, tensor cores on" in res.stdout
    for dtype in ("bf16", "f64"):
        assert re.search(rf"sanitize_harness: {dtype} done \(0 failures", res.stdout), dtype
