"""Oracles the tests compare against, written independently of jaxconv's own index math.

- conv2d: lax.conv_general_dilated at HIGHEST precision.
- conv_transpose2d: PyTorch's definition through lax: the input dilated by the stride
  (stride - 1 zeros inserted by lax.pad), the kernel flipped and its in/out channels swapped per
  group, padded by dilation*(k-1) - pad (plus output_padding after).
- max_pool2d values and indices: a plain NumPy loop over windows (first maximum wins, NaN wins,
  padded cells never chosen), and lax.reduce_window for values.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

TOL = {  # (rtol, atol) per dtype for results of O(1) inputs summed over O(100) terms
    "float64": (1e-10, 1e-10),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 2e-2),
    "bfloat16": (4e-2, 8e-2),
}


def tol(dtype):
    return TOL[jnp.dtype(dtype).name]


def on(backend: str, *arrays):
    dev = jax.devices(backend)[0]
    out = tuple(jax.device_put(a, dev) for a in arrays)
    return out[0] if len(out) == 1 else out


def lowering_platform(backend: str) -> str:
    """The platform name that jax.export and JAX_PLATFORMS use for a `backend` fixture value."""
    return "cuda" if backend == "gpu" else backend


def random_array(rng: np.random.Generator, shape, dtype):
    """Standard-normal values drawn in float64 by NumPy, then rounded to dtype."""
    return jnp.asarray(rng.standard_normal(shape), dtype=dtype)


def assert_close(got, want, dtype=None):
    """Same shape and dtype, values within tol(dtype) (dtype defaults to want's)."""
    dtype = want.dtype if dtype is None else dtype
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    rtol, atol = tol(dtype)
    np.testing.assert_allclose(
        np.asarray(got).astype(np.float64),
        np.asarray(want).astype(np.float64),
        rtol=rtol,
        atol=atol,
    )


def explicit_padding(padding, in_hw, window_eff, stride):
    """Any public padding form -> ((top, bottom), (left, right)); strings through lax's own rule."""
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(in_hw, window_eff, stride, padding.upper()))
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding[0], int):
        return ((padding[0], padding[0]), (padding[1], padding[1]))
    return tuple(tuple(p) for p in padding)


def dimension_numbers(layout: str):
    return ("NCHW", "OIHW", "NCHW") if layout == "NCHW" else ("NHWC", "HWIO", "NHWC")


def ref_conv2d(
    x,
    w,
    bias=None,
    *,
    stride=(1, 1),
    padding=((0, 0), (0, 0)),
    dilation=(1, 1),
    groups=1,
    layout="NCHW",
):
    """padding: ((top, bottom), (left, right)) or a lax padding string."""
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    y = lax.conv_general_dilated(
        x.astype(acc),
        w.astype(acc),
        stride,
        padding,
        rhs_dilation=dilation,
        feature_group_count=groups,
        dimension_numbers=dimension_numbers(layout),
        precision=lax.Precision.HIGHEST,
    )
    if bias is not None:
        shape = (1, -1, 1, 1) if layout == "NCHW" else (1, 1, 1, -1)
        y = y + bias.astype(acc).reshape(shape)
    return y.astype(x.dtype)


def ref_conv_transpose2d(
    x,
    w,
    bias=None,
    *,
    stride=(1, 1),
    padding=((0, 0), (0, 0)),
    output_padding=(0, 0),
    groups=1,
    dilation=(1, 1),
    layout="NCHW",
):
    """PyTorch ConvTranspose2d. w: (C_in, C_out/g, KH, KW) (NCHW) or (KH, KW, C_out/g, C_in)."""
    if layout == "NHWC":
        x = jnp.transpose(x, (0, 3, 1, 2))
        w = jnp.transpose(w, (3, 2, 0, 1))
    c_in, cout_g, kh, kw = w.shape
    # (g, C_in/g, C_out/g, kh, kw) -> (g, C_out/g, C_in/g, kh, kw) -> OIHW, flipped spatially.
    wt = w.reshape(groups, c_in // groups, cout_g, kh, kw).transpose(0, 2, 1, 3, 4)
    wt = wt.reshape(groups * cout_g, c_in // groups, kh, kw)[:, :, ::-1, ::-1]
    pads = [
        (d * (k - 1) - lo, d * (k - 1) - hi + op)
        for d, k, (lo, hi), op in zip(dilation, (kh, kw), padding, output_padding)
    ]
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    # Zero insertion (stride - 1 zeros between inputs) and the edge pads as an explicit lax.pad,
    # then a plain stride-1 correlation. (The same thing as lhs_dilation=stride with these pads,
    # but XLA's CPU compiler aborts on some of those convolutions, e.g. lhs_dilation (2, 1),
    # pads ((0, 0), (2, 0)), input 5x2, kernel 2x3, killing the whole test process.)
    xp = lax.pad(
        x.astype(acc),
        jnp.zeros((), acc),
        [(0, 0, 0), (0, 0, 0)] + [(lo, hi, s - 1) for (lo, hi), s in zip(pads, stride)],
    )
    y = lax.conv_general_dilated(
        xp,
        wt.astype(acc),
        (1, 1),
        ((0, 0), (0, 0)),
        rhs_dilation=dilation,
        feature_group_count=groups,
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=lax.Precision.HIGHEST,
    )
    if bias is not None:
        y = y + bias.astype(acc).reshape(1, -1, 1, 1)
    y = y.astype(x.dtype)
    return jnp.transpose(y, (0, 2, 3, 1)) if layout == "NHWC" else y


def pool_out_size(n, k, s, d, lo, hi, ceil_mode):
    span = n + lo + hi - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + lo:
        out -= 1
    return out


def ref_max_pool2d(
    x, kernel, stride, padding=((0, 0), (0, 0)), dilation=(1, 1), ceil_mode=False, layout="NCHW"
):
    """NumPy loop: returns (values, int32 indices) with PyTorch's rules."""
    x = np.asarray(x.astype(jnp.float64) if x.dtype != jnp.float64 else x)
    if layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    n, c, h, w = x.shape
    (pt, pb), (pl, pr) = padding
    oh = pool_out_size(h, kernel[0], stride[0], dilation[0], pt, pb, ceil_mode)
    ow = pool_out_size(w, kernel[1], stride[1], dilation[1], pl, pr, ceil_mode)
    vals = np.full((n, c, oh, ow), -np.inf)
    idx = np.full((n, c, oh, ow), -1, np.int32)
    for i in range(oh):
        for j in range(ow):
            taps = [
                (i * stride[0] - pt + a * dilation[0], j * stride[1] - pl + b * dilation[1])
                for a in range(kernel[0])
                for b in range(kernel[1])
            ]
            taps = [(r, q) for r, q in taps if 0 <= r < h and 0 <= q < w]
            for ni in range(n):
                for ci in range(c):
                    best, arg = None, -1
                    for r, q in taps:
                        v = x[ni, ci, r, q]
                        if best is None or v > best or (np.isnan(v) and not np.isnan(best)):
                            best, arg = v, r * w + q
                    if best is not None:
                        vals[ni, ci, i, j], idx[ni, ci, i, j] = best, arg
    if layout == "NHWC":
        vals, idx = vals.transpose(0, 2, 3, 1), idx.transpose(0, 2, 3, 1)
    return vals, idx


def ref_max_pool2d_lax(x, kernel, stride, padding, dilation=(1, 1), layout="NCHW"):
    """Values only, the way Flax computes them (reduce_window with -inf padding)."""
    if layout == "NCHW":
        dims, strides, pads, dil = (
            (1, 1) + tuple(kernel),
            (1, 1) + tuple(stride),
            ((0, 0), (0, 0)) + tuple(padding),
            (1, 1) + tuple(dilation),
        )
    else:
        dims, strides, pads, dil = (
            (1,) + tuple(kernel) + (1,),
            (1,) + tuple(stride) + (1,),
            ((0, 0),) + tuple(padding) + ((0, 0),),
            (1,) + tuple(dilation) + (1,),
        )
    return lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, pads, window_dilation=dil)


def _two(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """One conv2d call (transpose=False) or conv_transpose2d call (transpose=True), the single
    description of a convolution test case across test files, in NCHW terms.

    x is (n, c, h, w); the output has o channels. Weights: conv2d (o, c/groups, *kernel)
    (NHWC: (*kernel, c/groups, o)); conv_transpose2d (c, o/groups, *kernel) (NHWC: (*kernel,
    o/groups, c)). stride, padding, dilation and output_padding take any public form.
    """

    n: int = 2
    c: int = 3
    h: int = 6
    w: int = 7
    o: int = 4
    kernel: tuple[int, int] = (3, 3)
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    output_padding: Any = 0  # conv_transpose2d only
    transpose: bool = False

    def x_shape(self, layout):
        return (
            (self.n, self.c, self.h, self.w)
            if layout == "NCHW"
            else (self.n, self.h, self.w, self.c)
        )

    def w_shape(self, layout):
        if self.transpose:
            io = (self.c, self.o // self.groups)
        else:
            io = (self.o, self.c // self.groups)
        return io + tuple(self.kernel) if layout == "NCHW" else tuple(self.kernel) + io[::-1]

    def operands(self, layout, dtype, seed=0, bias=True):
        """(x, w, bias or None), standard-normal values rounded to dtype."""
        rng = np.random.default_rng(seed)
        x = random_array(rng, self.x_shape(layout), dtype)
        w = random_array(rng, self.w_shape(layout), dtype)
        b = random_array(rng, (self.o,), dtype) if bias else None
        return x, w, b

    def keywords(self):
        kw = dict(
            stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups
        )
        if self.transpose:
            kw["output_padding"] = self.output_padding
        return kw

    def ref_keywords(self):
        """The same call for the oracle: explicit pairs, padding strings resolved by lax."""
        stride, dilation = _two(self.stride), _two(self.dilation)
        if self.transpose:
            return dict(
                stride=stride,
                padding=explicit_padding(self.padding, None, None, None),
                output_padding=_two(self.output_padding),
                dilation=dilation,
                groups=self.groups,
            )
        k_eff = tuple(d * (k - 1) + 1 for d, k in zip(dilation, self.kernel))
        pads = explicit_padding(self.padding, (self.h, self.w), k_eff, stride)
        return dict(stride=stride, padding=pads, dilation=dilation, groups=self.groups)

    def function(self, layout="NCHW"):
        """jaxconv's function with this case's keywords bound."""
        import jaxconv

        op = jaxconv.conv_transpose2d if self.transpose else jaxconv.conv2d
        return partial(op, **self.keywords(), layout=layout)

    def reference(self, layout="NCHW"):
        """The oracle with the same call bound."""
        op = ref_conv_transpose2d if self.transpose else ref_conv2d
        return partial(op, **self.ref_keywords(), layout=layout)

    def out_hw(self):
        """Output height and width. conv2d: (H + pads - dilation*(K - 1) - 1) // stride + 1;
        conv_transpose2d (PyTorch): (H - 1)*stride - pads + dilation*(K - 1) + output_padding
        + 1."""
        kw = self.ref_keywords()
        if self.transpose:
            return tuple(
                (i - 1) * s - lo - hi + d * (k - 1) + op + 1
                for i, s, (lo, hi), d, k, op in zip(
                    (self.h, self.w),
                    kw["stride"],
                    kw["padding"],
                    kw["dilation"],
                    self.kernel,
                    kw["output_padding"],
                )
            )
        return tuple(
            (i + lo + hi - d * (k - 1) - 1) // s + 1
            for i, s, (lo, hi), d, k in zip(
                (self.h, self.w), kw["stride"], kw["padding"], kw["dilation"], self.kernel
            )
        )

    def y_shape(self, layout):
        oh, ow = self.out_hw()
        return (self.n, self.o, oh, ow) if layout == "NCHW" else (self.n, oh, ow, self.o)
