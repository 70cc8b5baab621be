"""The warp-level operations of the host emulation themselves (tests/cuda_emulation/warp.h,
through warp_probe.cc: one emulated warp) against the PTX ISA's layouts, written out here
independently of warp.h: ldmatrix (plain and transposed), mma.sync m16n8k16 bf16/f16 and m16n8k8
TF32 fragments, shuffles, a partial warp, and cp.async groups landing at their wait."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from emulation import build_emulation, ptr

pytestmark = pytest.mark.slow(
    "builds a CUDA host-emulation library (a C++ compile of tens of "
    "seconds per worker), then emulates kernels thread by thread"
)


@pytest.fixture(scope="module")
def warp_probe(tmp_path_factory):
    return build_emulation("warp_probe.cc", tmp_path_factory.mktemp("warp"))


def _u32(n):
    return np.zeros(n, np.uint32)


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("matrices", [1, 2, 4])
def test_emulated_ldmatrix(warp_probe, matrices, trans):
    rows = np.arange(32 * 8, dtype=np.uint16).reshape(32, 8) * 3 + 1
    row_step = 5  # lane l points at row 5l % 32: addresses need not be in lane order
    out = _u32(32 * 4)
    assert warp_probe.probe_ldmatrix(matrices, int(trans), row_step, ptr(rows), ptr(out)) == 0
    out = out.reshape(32, 4)
    for lane in range(32):
        for j in range(4):
            if j >= matrices:
                assert out[lane, j] == 0
                continue
            # Matrix j: row i is the row whose address lane 8j + i gave.
            mat = rows[[((8 * j + i) * row_step) % 32 for i in range(8)]]
            g, t = lane // 4, lane % 4
            lo, hi = (
                (mat[2 * t, g], mat[2 * t + 1, g]) if trans else (mat[g, 2 * t], mat[g, 2 * t + 1])
            )
            assert out[lane, j] == int(lo) | (int(hi) << 16), (lane, j)


def _fragments_16bit(a, b):
    """a (16 x 16), b (16 x 8) as 16-bit values -> per-lane registers (PTX ISA m16n8k16)."""
    ra, rb = _u32(32 * 4).reshape(32, 4), _u32(32 * 2).reshape(32, 2)
    pack = lambda lo, hi: int(lo) | (int(hi) << 16)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for reg, (r, c) in enumerate(
            [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]
        ):
            ra[lane, reg] = pack(a[r, c], a[r, c + 1])
        for reg, k in enumerate([2 * t, 2 * t + 8]):
            rb[lane, reg] = pack(b[k, g], b[k + 1, g])
    return ra, rb


def _fragments_tf32(a, b):
    ra, rb = _u32(32 * 4).reshape(32, 4), _u32(32 * 2).reshape(32, 2)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for reg, (r, c) in enumerate([(g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)]):
            ra[lane, reg] = a[r, c]
        for reg, k in enumerate([t, t + 4]):
            rb[lane, reg] = b[k, g]
    return ra, rb


@pytest.mark.parametrize("kind", ["bfloat16", "float16", "tf32"])
def test_emulated_mma(warp_probe, kind):
    rng = np.random.default_rng(5)
    k = 8 if kind == "tf32" else 16
    a = rng.integers(-8, 9, (16, k)) / 8.0
    b = rng.integers(-8, 9, (k, 8)) / 8.0
    c = rng.integers(-8, 9, (16, 8)) / 4.0
    if kind == "tf32":
        ra, rb = _fragments_tf32(
            a.astype(np.float32).view(np.uint32), b.astype(np.float32).view(np.uint32)
        )
    else:
        dt = ml_dtypes.bfloat16 if kind == "bfloat16" else np.float16
        ra, rb = _fragments_16bit(a.astype(dt).view(np.uint16), b.astype(dt).view(np.uint16))
    rc = np.zeros((32, 4), np.float32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        rc[lane] = [c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1]]
    rd = np.zeros((32, 4), np.float32)
    code = {"bfloat16": 0, "float16": 1, "tf32": 2}[kind]
    ra, rb = np.ascontiguousarray(ra), np.ascontiguousarray(rb)
    assert warp_probe.probe_mma(code, ptr(ra), ptr(rb), ptr(rc), ptr(rd)) == 0
    want = a @ b + c
    for lane in range(32):
        g, t = lane // 4, lane % 4
        assert list(rd[lane]) == [
            want[g, 2 * t],
            want[g, 2 * t + 1],
            want[g + 8, 2 * t],
            want[g + 8, 2 * t + 1],
        ], lane


@pytest.mark.parametrize("mask", [1, 6, 16, 31])
def test_emulated_shuffles(warp_probe, mask):
    v = np.arange(32, dtype=np.float32) * 1.5 - 7
    out = np.zeros(64, np.float32)
    assert warp_probe.probe_shfl(mask, ptr(v), ptr(out)) == 0
    lanes = np.arange(32)
    np.testing.assert_array_equal(out[:32], v[lanes ^ mask])
    np.testing.assert_array_equal(out[32:], v[(lanes * 7 + 3) % 32])


def test_emulated_warp_operation_needs_a_full_warp(warp_probe):
    v, out = np.zeros(48, np.float32), np.zeros(96, np.float32)
    assert warp_probe.probe_partial_warp(ptr(v), ptr(out)) == 2


def test_emulated_cp_async_groups(warp_probe):
    """Copies land at the wait that releases their group, not before: a kernel that reads its
    stage early sees the old shared contents; wait_group 1 leaves the newest group in flight;
    a zero-fill copy writes zeros."""
    src = np.arange(32 * 8, dtype=np.float32) + 100
    out = np.zeros(32 * 24, np.float32)
    assert warp_probe.probe_cp_async(ptr(src), ptr(out)) == 0
    out, src = out.reshape(32, 3, 8), src.reshape(32, 8)
    for lane in range(32):
        before, after1, after0 = out[lane]
        np.testing.assert_array_equal(before, -1)
        np.testing.assert_array_equal(after1[:4], src[lane, :4])
        np.testing.assert_array_equal(after1[4:], -1)
        np.testing.assert_array_equal(after0[:4], src[lane, :4])
        np.testing.assert_array_equal(after0[4:], src[lane, 4:] if lane % 2 == 0 else 0)


def test_emulated_cp_async_left_in_flight_fails_the_launch(warp_probe):
    src, out = np.zeros(128, np.float32), np.zeros(32, np.float32)
    assert warp_probe.probe_cp_async_unwaited(ptr(src), ptr(out)) == 2


# Dynamic shared memory (emulate.h): the launch's size is the block's buffer, checked.
_KB = 1024


def _dynamic(warp_probe, mode, bytes_, launch_bytes, opt_in):
    src = np.arange(bytes_ // 4, dtype=np.float32)
    out = np.full(bytes_ // 4, np.nan, np.float32)
    rc = warp_probe.probe_dynamic_shared(mode, bytes_, launch_bytes, opt_in, ptr(src), ptr(out))
    return rc, src, out


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["cp_async", "plain_store", "ldmatrix"])
@pytest.mark.parametrize("size", [16 * _KB, 60 * _KB, 227 * _KB])
def test_emulated_dynamic_shared_memory(warp_probe, mode, size):
    rc, src, out = _dynamic(warp_probe, mode, size, size, size)
    assert rc == 0
    np.testing.assert_array_equal(out, src)


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["cp_async", "plain_store", "ldmatrix"])
def test_emulated_dynamic_shared_memory_too_small_fails_the_launch(warp_probe, mode):
    # The kernel fills 60 KB; the launch gives 16 bytes less.
    assert _dynamic(warp_probe, mode, 60 * _KB, 60 * _KB - 16, 60 * _KB)[0] == 2


def test_emulated_dynamic_shared_memory_needs_the_opt_in_above_48_kb(warp_probe):
    assert _dynamic(warp_probe, 0, 48 * _KB, 48 * _KB, 0)[0] == 0  # the default limit
    assert _dynamic(warp_probe, 0, 60 * _KB, 60 * _KB, 0)[0] == 1  # no opt-in
    assert _dynamic(warp_probe, 0, 60 * _KB, 60 * _KB, 56 * _KB)[0] == 1  # opted in to less
    assert _dynamic(warp_probe, 0, 60 * _KB, 60 * _KB, 228 * _KB)[0] == 1  # past sm_90's 227 KB


def test_launch_dynamic_shared_opts_in_by_itself(warp_probe):
    src = np.arange(100 * _KB // 4, dtype=np.float32)
    out = np.full_like(src, np.nan)
    assert warp_probe.probe_launch_dynamic_shared(100 * _KB, 100 * _KB, ptr(src), ptr(out)) == 0
    np.testing.assert_array_equal(out, src)
    assert warp_probe.probe_launch_dynamic_shared(100 * _KB, 228 * _KB, ptr(src), ptr(out)) == 1
