"""max_pool2d values and indices, and max_unpool2d.

Values are compared with lax.reduce_window (reference.ref_max_pool2d_lax) where lax can express
the geometry (not ceil_mode), and values + int32 indices with the NumPy loop
(reference.ref_max_pool2d) everywhere. Max pooling is exact (no arithmetic), so every comparison
is exact, in every dtype. Every case also runs max_pool2d without indices (the values-only
target) and requires its y to equal the indexed forward's bit for bit.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv

from reference import (
    explicit_padding,
    on,
    pool_out_size,
    random_array,
    ref_max_pool2d,
    ref_max_pool2d_lax,
)

DTYPES = [jnp.float32, jnp.float64, jnp.float16, jnp.bfloat16]
LAYOUTS = ["NCHW", "NHWC"]


def _two(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def to_layout(x_nchw, layout):
    return x_nchw if layout == "NCHW" else jnp.transpose(x_nchw, (0, 2, 3, 1))


@dataclasses.dataclass(frozen=True)
class Pool:
    n: int = 2
    c: int = 3
    h: int = 6
    w: int = 6
    kernel: Any = 2
    stride: Any = None
    padding: Any = 0
    dilation: Any = 1
    ceil_mode: bool = False

    def keywords(self):
        return dict(
            kernel_size=self.kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            ceil_mode=self.ceil_mode,
        )

    def ref_keywords(self):
        kernel = _two(self.kernel)
        stride = kernel if self.stride is None else _two(self.stride)
        dilation = _two(self.dilation)
        k_eff = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel))
        pads = explicit_padding(self.padding, (self.h, self.w), k_eff, stride)
        return dict(kernel=kernel, stride=stride, padding=pads, dilation=dilation)

    def x(self, layout, dtype, seed=0):
        return to_layout(
            random_array(np.random.default_rng(seed), (self.n, self.c, self.h, self.w), dtype),
            layout,
        )


def bits(a):
    """The array's raw bits (NaN payloads and signed zeros included)."""
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def check(case: Pool, backend, x, layout, jit=False):
    """Values and indices against the NumPy loop (and values against lax where it applies); the
    values-only forward (no return_indices) bitwise equal to the indexed forward's values."""
    x = on(backend, x)
    fn = partial(jaxconv.max_pool2d, **case.keywords(), return_indices=True, layout=layout)
    values_only = partial(jaxconv.max_pool2d, **case.keywords(), layout=layout)
    got, idx = jax.jit(fn)(x) if jit else fn(x)
    got_values = jax.jit(values_only)(x) if jit else values_only(x)
    assert got_values.dtype == got.dtype and got_values.shape == got.shape
    np.testing.assert_array_equal(bits(got_values), bits(got))
    ref = case.ref_keywords()
    want, want_idx = ref_max_pool2d(x, **ref, ceil_mode=case.ceil_mode, layout=layout)
    assert got.dtype == x.dtype and idx.dtype == jnp.int32
    assert got.shape == want.shape and idx.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got).astype(np.float64), want)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    if not case.ceil_mode:
        lax_values = ref_max_pool2d_lax(x, **ref, layout=layout)
        np.testing.assert_array_equal(
            np.asarray(got).astype(np.float64), np.asarray(lax_values).astype(np.float64)
        )
    return got, idx


GEOMETRIES = {
    "k2_default_stride": Pool(),
    "k2_default_stride_odd_sizes": Pool(h=7, w=5),
    "k3_s2_overlapping": Pool(h=7, w=7, kernel=3, stride=2),
    "k3_s2_padding1": Pool(kernel=3, stride=2, padding=1),
    "kernel_stride_padding_anisotropic": Pool(
        h=7, w=5, kernel=(3, 2), stride=(2, 1), padding=(1, 0)
    ),
    "padding_asymmetric": Pool(kernel=3, stride=2, padding=((0, 1), (1, 0))),
    "padding_SAME": Pool(h=7, w=6, kernel=3, stride=2, padding="SAME"),
    "padding_valid_lowercase": Pool(h=7, kernel=3, stride=2, padding="valid"),
    "dilation2_padded": Pool(h=7, w=8, kernel=3, stride=1, dilation=2, padding=2),
    "dilation_anisotropic": Pool(h=7, w=7, kernel=(2, 3), stride=(1, 2), dilation=(2, 1)),
    "ceil_mode_extra_window": Pool(h=7, w=6, kernel=3, stride=2, ceil_mode=True),
    "ceil_mode_padded": Pool(h=6, w=7, kernel=3, stride=2, padding=1, ceil_mode=True),
    # H = 3, k2 s2 p1: ceil gives 3 windows, but the third would start at padded row 4 - 1 = 3
    # (in the bottom padding), so PyTorch drops it.
    "ceil_mode_drops_window_in_padding": Pool(
        h=3, w=5, kernel=2, stride=2, padding=1, ceil_mode=True
    ),
    "ceil_mode_dilated": Pool(h=8, w=7, kernel=2, stride=2, dilation=2, ceil_mode=True),
    "image_1x1": Pool(h=1, w=1, kernel=1),
    "global_pool": Pool(h=4, w=5, kernel=(4, 5)),
    "stride_larger_than_kernel": Pool(h=9, w=8, kernel=2, stride=3),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry_float32(backend, name, layout):
    case = GEOMETRIES[name]
    check(case, backend, case.x(layout, jnp.float32), layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", ["ceil_mode_padded", "kernel_stride_padding_anisotropic"])
def test_dtypes(backend, name, dtype, layout):
    case = GEOMETRIES[name]
    check(case, backend, case.x(layout, dtype), layout)


def random_pool(rng: np.random.Generator) -> Pool:
    """Small random pooling whose padding is legal (at most half the dilated kernel, as in
    PyTorch) and whose output is non-empty; every padding form and ceil_mode are drawn."""
    while True:
        kernel = tuple(int(k) for k in rng.integers(1, 5, 2))
        dilation = tuple(int(d) for d in rng.integers(1, 3, 2))
        half = [(d * (k - 1) + 1) // 2 for k, d in zip(kernel, dilation)]
        pads = [tuple(int(rng.integers(0, m + 1)) for _ in range(2)) for m in half]
        form = rng.integers(0, 4)
        padding = (
            ("SAME" if rng.random() < 0.5 else "valid")
            if form == 0
            else min(half)
            if form == 1
            else (pads[0][0], pads[1][0])
            if form == 2
            else tuple(pads)
        )
        case = Pool(
            n=int(rng.integers(1, 3)),
            c=int(rng.integers(1, 4)),
            h=int(rng.integers(1, 10)),
            w=int(rng.integers(1, 10)),
            kernel=kernel,
            stride=None if rng.random() < 0.3 else tuple(int(s) for s in rng.integers(1, 4, 2)),
            padding=padding,
            dilation=dilation,
            ceil_mode=bool(rng.random() < 0.5),
        )
        ref = case.ref_keywords()
        sizes = [
            pool_out_size(i, k, s, d, lo, hi, case.ceil_mode)
            for i, k, s, d, (lo, hi) in zip(
                (case.h, case.w), ref["kernel"], ref["stride"], ref["dilation"], ref["padding"]
            )
        ]
        if min(sizes) >= 1:
            return case


@pytest.mark.parametrize("seed", range(24))
def test_random_configurations(backend, seed):
    case = random_pool(np.random.default_rng(5000 + seed))
    layout = LAYOUTS[seed % 2]
    dtype = DTYPES[(seed // 2) % 4]
    check(case, backend, case.x(layout, dtype, seed=seed), layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_under_jit(backend, layout):
    case = GEOMETRIES["ceil_mode_padded"]
    check(case, backend, case.x(layout, jnp.float32), layout, jit=True)


def test_stride_defaults_to_kernel_size(backend):
    x = on(backend, GEOMETRIES["k2_default_stride_odd_sizes"].x("NCHW", jnp.float32))
    explicit = jaxconv.max_pool2d(x, (2, 3), stride=(2, 3))
    for implicit in (jaxconv.max_pool2d(x, (2, 3)), jaxconv.max_pool2d(x, (2, 3), None)):
        np.testing.assert_array_equal(implicit, explicit)
    assert explicit.shape == (2, 3, 3, 1)


def test_return_indices_false_returns_values_only(backend):
    x = on(backend, Pool().x("NCHW", jnp.float32))
    y = jaxconv.max_pool2d(x, 2)
    assert isinstance(y, jax.Array) and y.shape == (2, 3, 3, 3)


def _targets(fn, *args):
    """The jaxconv FFI targets that jit(fn) lowers to, in order of appearance."""
    import re

    return re.findall(r"custom_call @(jaxconv_\w+)\(", jax.jit(fn).lower(*args).as_text())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_gradient_lowers_to_the_values_only_target(backend, layout):
    """Without a gradient max_pool2d writes no indices: one call to the values-only target.
    A gradient (first and second order) and return_indices=True use the indexed forward."""
    x = on(backend, Pool(h=7, w=7).x(layout, jnp.float32))
    pool = partial(jaxconv.max_pool2d, kernel_size=3, stride=2, padding=1, layout=layout)
    assert _targets(pool, x) == ["jaxconv_max_pool2d_fwd_values"]
    assert _targets(lambda x: pool(x, return_indices=True), x) == ["jaxconv_max_pool2d_fwd"]
    loss = lambda x: jnp.sum(jnp.sin(pool(x)))
    assert sorted(_targets(jax.grad(loss), x)) == [
        "jaxconv_max_pool2d_bwd",
        "jaxconv_max_pool2d_fwd",
    ]
    # value_and_grad: the primal value comes from the fwd rule, so no second forward.
    assert sorted(_targets(jax.value_and_grad(loss), x)) == [
        "jaxconv_max_pool2d_bwd",
        "jaxconv_max_pool2d_fwd",
    ]
    second = _targets(jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2)), x)
    assert "jaxconv_max_pool2d_fwd_values" not in second and "jaxconv_max_pool2d_fwd" in second
    # vmap keeps one launch of the values-only target.
    xb = jnp.stack([x, -x])
    assert _targets(jax.vmap(pool), xb) == ["jaxconv_max_pool2d_fwd_values"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_values_only_gradient_matches_indexed(backend, layout):
    """The custom_vjp of the values-only path gives the indexed path's gradient, also under
    jit and vmap (its fwd rule runs the indexed forward)."""
    case = GEOMETRIES["ceil_mode_padded"]
    x = on(backend, case.x(layout, jnp.float64))
    pool = partial(jaxconv.max_pool2d, **case.keywords(), layout=layout)
    grad = jax.grad(lambda x: jnp.sum(jnp.cos(pool(x))))
    g_indexed = jax.grad(lambda x: jnp.sum(jnp.cos(pool(x, return_indices=True)[0])))(x)
    np.testing.assert_array_equal(np.asarray(grad(x)), np.asarray(g_indexed))
    np.testing.assert_array_equal(np.asarray(jax.jit(grad)(x)), np.asarray(g_indexed))
    batched = jax.jit(jax.vmap(grad))(jnp.stack([x, x]))
    np.testing.assert_array_equal(np.asarray(batched[1]), np.asarray(g_indexed))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_ties_first_maximum_wins(backend, layout, dtype):
    # Values from {0, 1, 2}: most windows hold several maxima; the first in row-major window
    # order must be reported. Overlapping, dilated, padded windows.
    case = Pool(h=7, w=6, kernel=3, stride=2, padding=1, dilation=(1, 2))
    x = jnp.asarray(np.random.default_rng(5).integers(0, 3, (2, 3, 7, 6)), dtype)
    check(case, backend, to_layout(x, layout), layout)


def test_constant_input_reports_top_left_of_each_window(backend):
    # Every cell ties; window (i, j) of a 2x2 / stride-2 pool starts at row 2i, col 2j of a
    # 4-wide plane: flat index 2i*4 + 2j.
    _, idx = jaxconv.max_pool2d(on(backend, jnp.ones((1, 1, 4, 4))), 2, return_indices=True)
    np.testing.assert_array_equal(idx[0, 0], [[0, 2], [8, 10]])


@pytest.mark.parametrize(
    "layout, dtype",
    [("NCHW", jnp.float64), ("NHWC", jnp.float32), ("NCHW", jnp.bfloat16), ("NHWC", jnp.float16)],
    ids=["NCHW-float64", "NHWC-float32", "NCHW-bfloat16", "NHWC-float16"],
)
def test_nan_wins_with_its_index(backend, layout, dtype):
    x = np.random.default_rng(6).standard_normal((1, 2, 6, 6))
    x[0, 0, 1, 1] = np.nan  # alone in window (0, 0) of a 2x2 pool
    x[0, 1, 2, 3] = np.nan  # two NaNs in window (1, 1): the first, row-major, wins
    x[0, 1, 3, 2] = np.nan
    x[0, 1, 5, 5] = np.inf  # +inf is the maximum of its window, but it is no NaN
    x = jnp.asarray(x, dtype)
    got, idx = check(Pool(n=1, c=2), backend, to_layout(x, layout), layout)
    if layout == "NHWC":
        got, idx = jnp.transpose(got, (0, 3, 1, 2)), jnp.transpose(idx, (0, 3, 1, 2))
    assert np.isnan(got[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 1 * 6 + 1
    assert np.isnan(got[0, 1, 1, 1]) and idx[0, 1, 1, 1] == 2 * 6 + 3
    assert np.isnan(got).sum() == 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_padding_never_selected_all_negative(backend, layout):
    # Zero padding would win every border window here; -inf padding never does.
    case = Pool(h=5, w=6, kernel=3, stride=2, padding=1)
    x = -1.0 - jnp.abs(case.x("NCHW", jnp.float32, seed=7))
    got, idx = check(case, backend, to_layout(x, layout), layout)
    assert float(jnp.max(got)) <= -1.0
    assert int(jnp.min(idx)) >= 0 and int(jnp.max(idx)) < 5 * 6


def test_padding_never_selected_all_minus_infinity(backend):
    # Real cells equal to -inf still beat padding: the value is -inf and the index a real cell.
    case = Pool(n=1, c=1, h=3, w=3, kernel=3, stride=1, padding=1)
    got, idx = check(case, backend, jnp.full((1, 1, 3, 3), -jnp.inf), "NCHW")
    assert np.all(np.isneginf(got))
    # Window (i, j) covers rows i-1..i+1, cols j-1..j+1; its first real cell is
    # (max(i-1, 0), max(j-1, 0)).
    np.testing.assert_array_equal(idx[0, 0], [[0, 0, 1], [0, 0, 1], [3, 3, 4]])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_size_batch(backend, layout):
    case = Pool(n=0, kernel=3, stride=2, padding=1)
    got, idx = check(case, backend, case.x(layout, jnp.float32), layout)
    assert got.shape[0] == 0 and idx.shape[0] == 0


# ----------------------------------------------------------------------------------------------
# max_unpool2d


def ref_max_unpool2d(x, indices, out_hw, layout):
    """PyTorch's MaxUnpool2d: out plane (n, c) gets x[n, c, i, j] at flat index idx[n, c, i, j]."""
    x, indices = np.asarray(x.astype(jnp.float64)), np.asarray(indices)
    if layout == "NHWC":
        x, indices = x.transpose(0, 3, 1, 2), indices.transpose(0, 3, 1, 2)
    n, c = x.shape[:2]
    out = np.zeros((n, c, out_hw[0] * out_hw[1]))
    for ni in range(n):
        for ci in range(c):
            out[ni, ci, indices[ni, ci].ravel()] = x[ni, ci].ravel()
    out = out.reshape(n, c, *out_hw)
    return out.transpose(0, 2, 3, 1) if layout == "NHWC" else out


def _unpool_check(backend, case: Pool, layout, dtype, out_hw, output_size=None):
    x = on(backend, case.x(layout, dtype, seed=3))
    pooled, idx = jaxconv.max_pool2d(x, **case.keywords(), return_indices=True, layout=layout)
    # Under jit: the scatter compiles once instead of op by op (test_unpool_eager covers that).
    unpool = jax.jit(
        partial(
            jaxconv.max_unpool2d,
            kernel_size=case.kernel,
            stride=case.stride,
            padding=case.padding,
            output_size=output_size,
            layout=layout,
        )
    )
    got = unpool(pooled, idx)
    want = ref_max_unpool2d(pooled, idx, out_hw, layout)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got).astype(np.float64), want)
    return x, got


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16], ids=["float32", "float16"])
def test_unpool_default_output_size(backend, layout, dtype):
    # 6x8 -> k2 pool -> 3x4 -> default ((3 - 1)*2 + 2, (4 - 1)*2 + 2) = (6, 8): the input size.
    x, got = _unpool_check(backend, Pool(h=6, w=8), layout, dtype, (6, 8))
    # Each kept value is the maximum of its window, so unpooling puts only input values back.
    x_nchw = x if layout == "NCHW" else jnp.transpose(x, (0, 3, 1, 2))
    g = got if layout == "NCHW" else jnp.transpose(got, (0, 3, 1, 2))
    kept = np.asarray(g) != 0
    np.testing.assert_array_equal(np.asarray(g)[kept], np.asarray(x_nchw)[kept])
    assert kept.sum() == 2 * 3 * 12


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unpool_overlapping_padded_windows(backend, layout):
    # 5x5, k3 s2 p1 -> 3x3 -> default (3 - 1)*2 - 2 + 3 = 5. Overlapping windows may pick the
    # same cell twice; it receives its own value once.
    _unpool_check(
        backend, Pool(h=5, w=5, kernel=3, stride=2, padding=1), layout, jnp.float32, (5, 5)
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unpool_explicit_output_size(backend, layout):
    # 5x5 -> k2 pool -> 2x2; the default would be 4x4, output_size restores 5x5. Both the (H, W)
    # and the full-shape forms.
    case = Pool(n=2, c=3, h=5, w=5)
    _unpool_check(backend, case, layout, jnp.float32, (5, 5), output_size=(5, 5))
    full = (2, 3, 5, 5) if layout == "NCHW" else (2, 5, 5, 3)
    _, got = _unpool_check(backend, case, layout, jnp.float32, (5, 5), output_size=full)
    assert got.shape == full


def test_unpool_eager(backend):
    case = Pool(h=5, w=5, kernel=3, stride=2, padding=1)
    x = on(backend, case.x("NCHW", jnp.float64))
    pooled, idx = jaxconv.max_pool2d(x, **case.keywords(), return_indices=True)
    got = jaxconv.max_unpool2d(pooled, idx, kernel_size=3, stride=2, padding=1)
    np.testing.assert_array_equal(got, ref_max_unpool2d(pooled, idx, (5, 5), "NCHW"))
