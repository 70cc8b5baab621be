"""bwd_filter's summation order is a function of the problem's shape only (README,
"Reproducibility"): run under the host emulation of CUDA (tests/cuda_emulation/determinism.cc,
the handler's own sequence of plan, workspace and launch), its float32 bits are identical
whatever number of blocks the GPU runs at once, and a workspace that cannot be allocated is an
error naming the bytes, never a switch to another order.

Compiled here like test_cuda_build.py's emulation (a C++20 compiler and CUDA's headers; skipped
without them). On a GPU, the same plan code runs in every bwd_filter call of the other files.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from reference import ref_conv2d
from test_cuda_build import EMU_DIR, _compile, _cuda_include, _vec

pytestmark = pytest.mark.cpu_only("compiles the kernels for the host emulation; no device")

CUDA_ERROR_INVALID_VALUE = 1  # cudaErrorInvalidValue

# (x NCHW, w OIHW, stride, pad): enough positions (N*OH*OW) that bwd_filter splits its reduction
# into partial sums, with random float32 values, so that any other order changes the bits.
SPLIT = ((4, 3, 16, 16), (5, 3, 3, 3), 1, 1)
WIDE_SPLIT = ((2, 8, 16, 16), (70, 8, 3, 3), 1, 1)  # the wide tile (> 16 output channels)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    inc = _cuda_include()
    if inc is None:
        pytest.skip("CUDA headers not found (cuda_bf16.h); the emulation needs the half types")
    return _compile([EMU_DIR / "determinism.cc"], tmp_path_factory.mktemp("det") / "d.so",
                    ["-std=c++20", "-O1", "-pthread", "-I", inc])


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


def _handler(lib, case, *, resident_blocks, allocate_ok=True):
    """(return code, dw, splits, message) of one emulated bwd_filter handler call."""
    x, dy, attrs = _problem(case)
    dw = np.full(case[1], np.nan, np.float32)  # never written: stays NaN
    splits = ctypes.c_int64(0)
    message = ctypes.create_string_buffer(1024)
    rc = lib.emu_filter_handler(_vec(x.shape), _vec(dw.shape), _vec(attrs),
                                x.ctypes.data_as(ctypes.c_void_p),
                                dy.ctypes.data_as(ctypes.c_void_p),
                                dw.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint(resident_blocks),
                                int(allocate_ok), ctypes.byref(splits), message,
                                ctypes.c_size_t(len(message)))
    return rc, dw, splits.value, message.value.decode()


@pytest.mark.parametrize("case", [SPLIT, WIDE_SPLIT], ids=["small_tile", "wide_tile"])
def test_bits_do_not_depend_on_the_gpu_size(backend, lib, case):
    results = {}
    for blocks in (1, 3, 8, 66):
        rc, dw, splits, _ = _handler(lib, case, resident_blocks=blocks)
        assert rc == 0
        assert splits > 1, "the case must split its reduction, or it proves nothing"
        results[blocks] = dw
    first = results[1]
    for blocks, dw in results.items():
        np.testing.assert_array_equal(dw.view(np.uint32), first.view(np.uint32),
                                      err_msg=f"{blocks} resident blocks")
    # And the bits are a correct result: against lax's float64 gradient.
    import jax
    x, dy, attrs = _problem(case)
    pad = case[3]
    _, vjp = jax.vjp(lambda w: ref_conv2d(x.astype(np.float64), w, stride=(case[2],) * 2,
                                          padding=((pad, pad), (pad, pad))),
                     np.zeros(case[1], np.float64))
    (want,) = vjp(dy.astype(np.float64))
    np.testing.assert_allclose(first, np.asarray(want), rtol=1e-4, atol=1e-4)


def test_failed_workspace_allocation_is_an_error(backend, lib):
    rc, dw, splits, message = _handler(lib, SPLIT, resident_blocks=3, allocate_ok=False)
    assert rc == 3, "the handler must fail, not run another plan"
    assert np.isnan(dw).all(), "nothing may be written"
    bytes_needed = splits * np.prod(SPLIT[1]) * 4  # float32 partial sums, one dw per split
    assert message.startswith(f"jaxconv_conv2d_bwd_filter: could not allocate {bytes_needed} "
                              f"bytes of device scratch"), message
    assert f"{splits}-way split" in message and "no fallback to another summation order" in \
        message, message


def test_launcher_refuses_a_missing_workspace(backend, lib):
    x, dy, attrs = _problem(SPLIT)
    dw = np.full(SPLIT[1], np.nan, np.float32)
    err = lib.emu_filter_run_without_workspace(
        _vec(x.shape), _vec(dw.shape), _vec(attrs), x.ctypes.data_as(ctypes.c_void_p),
        dy.ctypes.data_as(ctypes.c_void_p), dw.ctypes.data_as(ctypes.c_void_p))
    assert err == CUDA_ERROR_INVALID_VALUE
    assert np.isnan(dw).all()
