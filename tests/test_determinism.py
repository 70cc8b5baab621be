"""bwd_filter's summation order is a function of the problem's shape only (README,
"Reproducibility"): run under the host emulation of CUDA (tests/cuda_emulation/determinism.cc,
the handler's own sequence of plan, workspace and launch), its float32 bits are identical
whatever number of blocks the GPU runs at once and from one run to the next, on the SIMT tiles
and on the tensor-core (TF32) tiles alike, and a workspace that cannot be allocated is an
error naming the bytes, never a switch to another order.

Compiled for the host emulation (tests/emulation.py) (a C++20 compiler and CUDA's headers; skipped
without them). On a GPU, the same plan code runs in every bwd_filter call of the other files.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from emulation import build_emulation, vec
from reference import ref_conv2d

pytestmark = [
    pytest.mark.cpu_only("compiles the kernels for the host emulation; no device"),
    pytest.mark.slow("builds a CUDA host-emulation library and runs its kernels"),
]

CUDA_ERROR_INVALID_VALUE = 1  # cudaErrorInvalidValue

# (x NCHW, w OIHW, stride, pad): enough positions (N*OH*OW) that bwd_filter splits its reduction
# into partial sums, with random float32 values, so that any other order changes the bits.
SPLIT = ((4, 3, 16, 16), (5, 3, 3, 3), 1, 1)
WIDE_SPLIT = ((2, 8, 16, 16), (70, 8, 3, 3), 1, 1)  # dW 70 x 72: mma 128 x 128 on tensor cores
MMA_SPLIT = ((4, 16, 16, 16), (24, 16, 3, 3), 1, 1)  # tensor cores, 64 x 64 (24 x 144 dW)
FILTER_KERNELS = {"simt_wide": 0, "simt_small": 1, "mma_large": 2, "mma_small": 3}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_emulation("determinism.cc", tmp_path_factory.mktemp("det"))


def _problem(case, seed=0):
    x_shape, w_shape, stride, pad = case
    rng = np.random.default_rng(seed)
    n, _, h, w = x_shape
    oh = (h + 2 * pad - w_shape[2]) // stride + 1
    ow = (w + 2 * pad - w_shape[3]) // stride + 1
    x = rng.standard_normal(x_shape).astype(np.float32)
    dy = rng.standard_normal((n, w_shape[0], oh, ow)).astype(np.float32)
    attrs = [stride, stride, 1, 1, pad, pad, pad, pad, 1, 0]
    return x, dy, attrs


def _handler(lib, case, *, resident_blocks, allocate_ok=True, tensor_cores=False):
    """(return code, dw, {splits, kernel}, message) of one emulated bwd_filter handler call;
    tensor_cores: a sm_80+ device with TF32 allowed."""
    x, dy, attrs = _problem(case)
    dw = np.full(case[1], np.nan, np.float32)  # never written: stays NaN
    plan = (ctypes.c_int64 * 2)()
    message = ctypes.create_string_buffer(1024)
    rc = lib.emu_filter_handler(
        vec(x.shape),
        vec(dw.shape),
        vec(attrs),
        x.ctypes.data_as(ctypes.c_void_p),
        dy.ctypes.data_as(ctypes.c_void_p),
        dw.ctypes.data_as(ctypes.c_void_p),
        ctypes.c_uint(resident_blocks),
        int(allocate_ok),
        int(tensor_cores),
        int(tensor_cores),
        plan,
        message,
        ctypes.c_size_t(len(message)),
    )
    return rc, dw, dict(splits=plan[0], kernel=plan[1]), message.value.decode()


@pytest.mark.parametrize(
    "case, tensor_cores, kernel",
    [
        (SPLIT, False, "simt_wide"),
        (WIDE_SPLIT, False, "simt_wide"),
        (WIDE_SPLIT, True, "mma_large"),
        (MMA_SPLIT, True, "mma_small"),
    ],
    ids=["simt_5_outputs", "simt_70_outputs", "mma_large_tile", "mma_small_tile"],
)
def test_bits_do_not_depend_on_the_gpu_size(backend, lib, case, tensor_cores, kernel):
    results = []
    for blocks in (1, 3, 8, 66, 3):  # 3 twice: a rerun gives the same bits too
        rc, dw, plan, _ = _handler(lib, case, resident_blocks=blocks, tensor_cores=tensor_cores)
        assert rc == 0
        assert plan["kernel"] == FILTER_KERNELS[kernel], plan
        assert plan["splits"] > 1, "the case must split its reduction, or it proves nothing"
        results.append((blocks, dw))
    first = results[0][1]
    for blocks, dw in results:
        np.testing.assert_array_equal(
            dw.view(np.uint32), first.view(np.uint32), err_msg=f"{blocks} resident blocks"
        )
    # And the bits are a correct result: against lax's float64 gradient (TF32 on tensor
    # cores: operands rounded to 10 mantissa bits).
    import jax

    x, dy, attrs = _problem(case)
    pad = case[3]
    _, vjp = jax.vjp(
        lambda w: ref_conv2d(
            x.astype(np.float64), w, stride=(case[2],) * 2, padding=((pad, pad), (pad, pad))
        ),
        np.zeros(case[1], np.float64),
    )
    (want,) = vjp(dy.astype(np.float64))
    if tensor_cores:  # TF32: relative to the largest value, as an accumulated sum's error goes
        err = np.abs(first - np.asarray(want)).max() / np.abs(want).max()
        assert err < 5e-3, err
    else:
        np.testing.assert_allclose(first, np.asarray(want), rtol=1e-4, atol=1e-4)


def test_failed_workspace_allocation_is_an_error(backend, lib):
    rc, dw, plan, message = _handler(lib, SPLIT, resident_blocks=3, allocate_ok=False)
    splits = plan["splits"]
    assert rc == 3, "the handler must fail, not run another plan"
    assert np.isnan(dw).all(), "nothing may be written"
    bytes_needed = splits * np.prod(SPLIT[1]) * 4  # float32 partial sums, one dw per split
    assert message.startswith(
        f"jaxconv_conv2d_bwd_filter: could not allocate {bytes_needed} bytes of device scratch"
    ), message
    assert (
        f"{splits}-way split" in message and "no fallback to another summation order" in message
    ), message


def test_launcher_refuses_a_missing_workspace(backend, lib):
    x, dy, attrs = _problem(SPLIT)
    dw = np.full(SPLIT[1], np.nan, np.float32)
    err = lib.emu_filter_run_without_workspace(
        vec(x.shape),
        vec(dw.shape),
        vec(attrs),
        x.ctypes.data_as(ctypes.c_void_p),
        dy.ctypes.data_as(ctypes.c_void_p),
        dw.ctypes.data_as(ctypes.c_void_p),
    )
    assert err == CUDA_ERROR_INVALID_VALUE
    assert np.isnan(dw).all()
