"""What the built CUDA module's sm_90 machine code says, read without a GPU.

cuobjdump with nvdisasm (CUDA toolkit, or the pip packages nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm) disassembles the module's cubins: the tensor-core kernels
(ffi/cuda/conv2d_mma.cuh: the pass and bwd_filter) must multiply with HMMA, and no kernel may
use local memory (register spills or stack arrays: STL/LDL in the SASS, LOCAL/STACK
in the resource usage). The main loop of each tensor-core kernel (the innermost loop of its SASS
that holds HMMA) is measured in instructions per HMMA: the precomputed-iterator kernels that serve
16-byte NHWC operands (conv_pass_mma_tap_kernel, conv_filter_mma_pos_kernel) have bounds, the
rest print their figure. Skipped where the CUDA module was not built, it holds no sm_90 code, or
the tools are not found.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _cuda_module_path():
    spec = importlib.util.find_spec("jaxconv._jaxconv_cuda")
    return None if spec is None or spec.origin is None else spec.origin


def _tool(name):
    """A CUDA binary tool: on PATH, in the CUDA toolkit, or from its pip package
    (nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm put it under site-packages/nvidia/.../bin)."""
    found = shutil.which(name)
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.insert(0, str(Path(nvcc).resolve().parents[1]))
    for root in filter(None, roots):
        candidate = Path(root) / "bin" / name
        if candidate.exists():
            return str(candidate)
    for entry in sys.path:
        for candidate in glob.glob(
            os.path.join(entry, "nvidia", "**", "bin", name), recursive=True
        ):
            if os.access(candidate, os.X_OK):
                return candidate
    return None


def _run(*args, env=None):
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, f"{' '.join(args)}\n{res.stderr[-2000:]}"
    return res.stdout


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return dict(zip(names, names))
    res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else dict(zip(names, names))


@functools.cache
def _sm90():
    """{demangled kernel name: (sass text, resource-usage line)} of the sm_90 cubin."""
    module = _cuda_module_path()
    if module is None:
        pytest.skip("jaxconv was built without the CUDA extension (no nvcc)")
    tool, disasm = _tool("cuobjdump"), _tool("nvdisasm")
    if tool is None or disasm is None:
        pytest.skip(
            "cuobjdump/nvdisasm not found (CUDA toolkit, or pip install "
            "nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
        )
    env = dict(os.environ, PATH=os.path.dirname(disasm) + os.pathsep + os.environ.get("PATH", ""))
    sass = _run(tool, "-sass", "-arch", "sm_90", module, env=env)
    if "Function :" not in sass:
        pytest.skip("the CUDA module holds no sm_90 code")
    bodies = {}
    for chunk in sass.split("Function : ")[1:]:
        name, _, body = chunk.partition("\n")
        bodies[name.strip()] = body
    usage = {}
    for line in _run(tool, "-res-usage", "-arch", "sm_90", module).splitlines():
        m = re.match(r"\s*Function (\S+?):?\s*$", line)
        if m:
            current = m.group(1)
        elif "REG:" in line:
            usage[current] = line.strip()
    demangled = _demangle(sorted(bodies))
    return {demangled[k]: (bodies[k], usage.get(k, "")) for k in bodies}


def _kernels(fragment):
    return {k: v for k, v in _sm90().items() if fragment in k}


def test_mma_pass_kernels_use_tensor_cores():
    kernels = _kernels("conv_pass_mma_kernel")
    assert kernels, sorted(_sm90())
    # bf16, f16 and float (TF32), 2 tiles each, NCHW and NHWC (+ k-major B for 16-bit NHWC).
    for dtype in ("__nv_bfloat16", "__half", "float"):
        assert any(f"<{dtype}," in k for k in kernels), (dtype, sorted(kernels))
    for name, (sass, _) in kernels.items():
        assert re.search(r"\bHMMA\.16816\.F32", sass) or re.search(r"\bHMMA\.1688\.F32", sass), name
        assert "LDSM" in sass, name  # ldmatrix
        assert "LDGSTS" in sass, name  # cp.async
    for name, (sass, _) in kernels.items():
        if "<float," in name:
            assert "HMMA.1688.F32.TF32" in sass, name
        else:
            assert "HMMA.16816.F32" in sass, name


def test_mma_filter_kernels_use_tensor_cores():
    """bwd_filter's tensor-core kernel (conv_filter_mma_kernel): HMMA in every instantiation
    (bf16/f16 m16n8k16, float as TF32 m16n8k8), cp.async for the 16-byte chunks, ldmatrix
    wherever a fragment is 16-bit or m/n-major (the TF32 k-major NHWC fragments are plain
    shared loads: ldmatrix.trans would split 32-bit values)."""
    kernels = _kernels("conv_filter_mma_kernel")
    assert kernels, sorted(_sm90())
    for dtype in ("__nv_bfloat16", "__half", "float"):
        # 2 tiles x 2 layouts x int32 / int64 offsets
        assert sum(f"<{dtype}," in k for k in kernels) == 8, (dtype, sorted(kernels))
    for name, (sass, _) in kernels.items():
        if "<float," in name:
            assert "HMMA.1688.F32.TF32" in sass, name
        else:
            assert re.search(r"\bHMMA\.16816\.F32", sass), name
        assert "LDGSTS" in sass, name
        nchw = re.search(r"MmaTile<[^>]*>, 0,", name)  # kLayout: 0 NCHW, 1 NHWC
        if "<float," not in name or nchw:
            assert "LDSM" in sass, name


def test_mma_kernels_have_both_offset_widths():
    """Each tensor-core kernel exists with int32 offsets (operands below 2^31 elements) and
    with int64 ones (mma_index32 picks)."""
    for family in ("conv_pass_mma_kernel", "conv_filter_mma_kernel"):
        kernels = _kernels(family)
        narrow = {k: v for k, v in kernels.items() if re.search(r", int>\(", k)}
        wide = {k: v for k, v in kernels.items() if re.search(r", long>\(", k)}
        assert narrow and len(narrow) == len(wide) == len(kernels) // 2, sorted(kernels)
        for name in narrow:
            assert re.sub(r", int>\(", ", long>(", name) in wide, name


def test_simt_kernels_stay_simt():
    """The float64 pass keeps double FMAs; no SIMT kernel claims tensor cores."""
    kernels = _kernels("conv_pass_kernel<")
    assert kernels
    for name, (sass, _) in kernels.items():
        assert "HMMA" not in sass, name
        if "<double," in name:
            assert "DFMA" in sass, name


def test_mma_iterator_kernels_use_tensor_cores():
    """The precomputed-iterator kernels (16-byte NHWC operands, int32 offsets): for each mma
    dtype both tiles of the pass (16-bit types also with k-major B) and of bwd_filter; HMMA,
    cp.async, and ldmatrix except for the TF32 k-major bwd_filter fragments."""
    for family, per_dtype in (
        ("conv_pass_mma_tap_kernel", {"float": 2, "__half": 4, "__nv_bfloat16": 4}),
        ("conv_filter_mma_pos_kernel", {"float": 2, "__half": 2, "__nv_bfloat16": 2}),
    ):
        kernels = _kernels(family)
        for dtype, count in per_dtype.items():
            assert sum(f"<{dtype}," in k for k in kernels) == count, (dtype, sorted(kernels))
        for name, (sass, _) in kernels.items():
            kind = "HMMA.1688.F32.TF32" if "<float," in name else "HMMA.16816.F32"
            assert kind in sass, name
            assert "LDGSTS" in sass, name
            if "<float," not in name or family == "conv_pass_mma_tap_kernel":
                assert "LDSM" in sass, name


def _main_loop(sass):
    """(instructions, HMMA) of the innermost loop (a backward branch and its target) holding
    HMMA; None where no loop holds any. As /work/shared/tools/sass_loop_ratio.py."""
    ins = [
        (int(m.group(1), 16), m.group(2))
        for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    ]
    hmma = [a for a, t in ins if re.search(r"\b(HMMA|HGMMA)\b", t)]
    best = None
    for a, t in ins:
        m = re.search(r"\bBRA\s+0x([0-9a-f]+)", t)
        if not m or int(m.group(1), 16) >= a:
            continue
        target = int(m.group(1), 16)
        h = sum(1 for x in hmma if target <= x <= a)
        n = sum(1 for x, _ in ins if target <= x <= a)
        if h and (best is None or n < best[0]):
            best = (n, h)
    return best


# Instructions per HMMA of the main loop, for the kernels serving 16-byte NHWC operands of
# 16-bit types: the figures measured at this commit (nvcc 13, sm_90, 4-stage loop unrolled by
# the stage count: 128x128 pass 3.9 (n-major B) / 4.1 (k-major B), bwd_filter 3.9; 64x64 pass
# 5.6 / 6.0, bwd_filter 6.3) as a regression bound. Issue 21's targets are 4 and 6: the k-major
# 128x128 pass (3.6 without the shared-memory epilogue, whose registers change the loop's
# schedule) and the 64x64 bwd_filter (its per-chunk position carries) miss them by 0.1 and 0.3.
# TF32 kernels convert each fragment register (cvt.rna) in the loop and report their figure.
ITER_LOOP_BOUNDS = {"MmaTile<128": 4.2, "MmaTile<64": 6.4}


def test_mma_main_loop_instructions_per_hmma():
    rows, over = [], []
    for name, (sass, usage) in sorted(_sm90().items()):
        if "mma" not in name or "HMMA" not in sass:
            continue
        loop = _main_loop(sass)
        assert loop is not None, name
        n, h = loop
        regs = re.search(r"REG:(\d+)", usage)
        smem = re.search(r"SHARED:(\d+)", usage)
        rows.append(
            (n / h, n, h, regs.group(1) if regs else "?", smem.group(1) if smem else "?", name)
        )
        iterator = "mma_tap_kernel" in name or "mma_pos_kernel" in name
        if iterator and "<float," not in name:
            bound = next(b for tile, b in ITER_LOOP_BOUNDS.items() if tile in name)
            if n / h > bound:
                over.append(f"{n / h:.2f} > {bound}: {name}")
    # Static shared memory only: the stage buffers are dynamic (MmaTile::kSharedBytes).
    print("\ninstr/HMMA  instr  HMMA  regs  static-smem  kernel")
    for ratio, n, h, regs, smem, name in sorted(rows, reverse=True):
        print(f"{ratio:10.2f} {n:6d} {h:5d} {regs:>5} {smem:>12}  {name.split('(')[0]}")
    assert rows
    assert not over, "\n".join(over)


def test_small_tile_iterator_kernels_fit_three_blocks_per_sm():
    """The 64x64 iterator kernels are compiled for three 128-thread blocks per SM
    (MmaTile::kMinBlocks): at most 168 registers a thread, with no local memory
    (test_no_local_memory)."""
    kernels = {
        k: v
        for k, v in _sm90().items()
        if ("mma_tap_kernel" in k or "mma_pos_kernel" in k) and "MmaTile<64" in k
    }
    assert kernels
    for name, (_, usage) in kernels.items():
        regs = re.search(r"REG:(\d+)", usage)
        assert regs and int(regs.group(1)) <= 168, (name, usage)


@pytest.mark.parametrize(
    "family",
    [
        "conv_pass_mma_kernel",
        "conv_pass_mma_tap_kernel",
        "conv_filter_mma_pos_kernel",
        "conv_pass_kernel<",
        "conv_filter_kernel",
        "conv_filter_mma_kernel",
        "sum_partials_kernel",
        "max_pool_fwd_kernel",
        "max_pool_bwd_kernel",
        "direct_conv_",
        "fft_depthwise",
        "fft_filter_sum_kernel",
        "fft_dense_",
    ],
)
def test_no_local_memory(family):
    """No spills or stack frames: no STL/LDL instruction, LOCAL:0 and STACK:0."""
    kernels = _kernels(family)
    if not kernels:
        pytest.skip(f"no {family} kernels in this build")
    bad = []
    for name, (sass, usage) in kernels.items():
        if re.search(r"\b(STL|LDL)(\.\S+)?\s", sass):
            bad.append(f"{name}: STL/LDL in SASS")
        for field in ("LOCAL", "STACK"):
            m = re.search(field + r":(\d+)", usage)
            if m and int(m.group(1)) != 0:
                bad.append(f"{name}: {usage}")
    assert not bad, "\n".join(bad)


def test_values_only_pool_forward_stores_no_indices():
    """Every values-only forward (max_pool_fwd_kernel<..., false>: 4 dtypes x 2 layouts x 2 index
    widths) has its indexed twin (<..., true>) and fewer global stores than it: the index store
    is compiled out, not skipped at run time."""
    kernels = _kernels("max_pool_fwd_kernel<")
    if not kernels:
        pytest.skip("no max_pool_fwd_kernel in this build")
    values = {k: v for k, v in kernels.items() if ", false>" in k}
    assert len(values) == 16, sorted(kernels)

    def stores(sass):
        return len(re.findall(r"\bSTG(?:\.\w+)*\s", sass))

    for name, (sass, _) in values.items():
        twin = name.replace(", false>", ", true>")
        assert twin in kernels, (name, sorted(kernels))
        assert 0 < stores(sass) < stores(kernels[twin][0]), (
            name,
            stores(sass),
            stores(kernels[twin][0]),
        )
