"""conv_transpose2d against PyTorch's definition written through lax (ref_conv_transpose2d).

Weights are (C_in, C_out/groups, KH, KW) for NCHW and (KH, KW, C_out/groups, C_in) for NHWC.
Geometries are given in NCHW terms and each runs in both layouts; output_padding appears with
stride and with dilation (it only has to be smaller than one of them).
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
from reference import (assert_close, explicit_padding, on, random_array, ref_conv_transpose2d)

DTYPES = [jnp.float32, jnp.float64, jnp.float16, jnp.bfloat16]
LAYOUTS = ["NCHW", "NHWC"]


def _two(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclasses.dataclass(frozen=True)
class ConvT:
    n: int = 2
    c_in: int = 3
    c_out: int = 4
    h: int = 5
    w: int = 4
    kernel: tuple[int, int] = (3, 3)
    stride: Any = 1
    padding: Any = 0
    output_padding: Any = 0
    dilation: Any = 1
    groups: int = 1

    def operands(self, layout, dtype, seed=0, bias=True):
        rng = np.random.default_rng(seed)
        cout_g = self.c_out // self.groups
        if layout == "NCHW":
            x_shape, w_shape = (self.n, self.c_in, self.h, self.w), \
                (self.c_in, cout_g) + tuple(self.kernel)
        else:
            x_shape, w_shape = (self.n, self.h, self.w, self.c_in), \
                tuple(self.kernel) + (cout_g, self.c_in)
        x = random_array(rng, x_shape, dtype)
        w = random_array(rng, w_shape, dtype)
        b = random_array(rng, (self.c_out,), dtype) if bias else None
        return x, w, b

    def keywords(self):
        return dict(stride=self.stride, padding=self.padding, output_padding=self.output_padding,
                    dilation=self.dilation, groups=self.groups)

    def ref_keywords(self):
        pads = explicit_padding(self.padding, None, None, None)
        return dict(stride=_two(self.stride), padding=pads,
                    output_padding=_two(self.output_padding), dilation=_two(self.dilation),
                    groups=self.groups)

    def out_hw(self):
        """PyTorch's formula: (H - 1)*stride - pad_lo - pad_hi + dilation*(K - 1) + op + 1."""
        kw = self.ref_keywords()
        return tuple((i - 1) * s - lo - hi + d * (k - 1) + op + 1 for i, s, (lo, hi), d, k, op in
                     zip((self.h, self.w), kw["stride"], kw["padding"], kw["dilation"],
                         self.kernel, kw["output_padding"]))


def check(case: ConvT, backend, layout, dtype, bias=True, seed=0, jit=False):
    x, w, b = case.operands(layout, dtype, seed, bias)
    x, w = on(backend, x, w)
    b = None if b is None else on(backend, b)
    fn = partial(jaxconv.conv_transpose2d, **case.keywords(), layout=layout)
    got = jax.jit(fn)(x, w, b) if jit else fn(x, w, b)
    # jit: one XLA compilation for the whole reference instead of one per op (faster suite).
    want = jax.jit(partial(ref_conv_transpose2d, **case.ref_keywords(), layout=layout))(x, w, b)
    assert_close(got, want)
    oh, ow = case.out_hw()
    assert got.shape == ((case.n, case.c_out, oh, ow) if layout == "NCHW"
                         else (case.n, oh, ow, case.c_out))
    return got


GEOMETRIES = {
    "plain_3x3": ConvT(),
    "stride2": ConvT(stride=2),
    "stride2_output_padding1": ConvT(stride=2, output_padding=1),
    "stride_anisotropic_output_padding": ConvT(stride=(2, 3), output_padding=(1, 2),
                                               padding=(1, 0)),
    "padding_int": ConvT(padding=1),
    "padding_pair": ConvT(kernel=(3, 4), padding=(1, 2)),
    "padding_asymmetric": ConvT(stride=2, padding=((0, 2), (1, 0))),
    "dilation2": ConvT(dilation=2, padding=1),
    "output_padding_from_dilation": ConvT(dilation=2, output_padding=1),
    "groups2": ConvT(c_in=4, c_out=6, groups=2, stride=2),
    "depthwise": ConvT(c_in=4, c_out=4, groups=4, stride=2, padding=1),
    "depthwise_channel_multiplier": ConvT(c_in=3, c_out=6, groups=3),
    "anisotropic_everything": ConvT(c_in=4, c_out=6, groups=2, kernel=(3, 2), stride=(2, 3),
                                    padding=((1, 0), (0, 2)), output_padding=(1, 0),
                                    dilation=(1, 2)),
    "image_1x1": ConvT(h=1, w=1, stride=2),
    "kernel_1x1_stride2_output_padding": ConvT(kernel=(1, 1), stride=2, output_padding=1),
    "even_kernel_stride2_padded": ConvT(kernel=(4, 4), stride=2, padding=1),  # DCGAN upsampler
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry_float32(backend, name, layout):
    check(GEOMETRIES[name], backend, layout, jnp.float32, bias=len(name) % 2 == 0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", ["anisotropic_everything", "depthwise"])
def test_dtypes(backend, name, dtype, layout):
    # Every dtype runs with bias in one layout and without in the other.
    bias = (DTYPES.index(dtype) + LAYOUTS.index(layout)) % 2 == 0
    got = check(GEOMETRIES[name], backend, layout, dtype, bias=bias)
    assert got.dtype == dtype


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_size_batch(backend, layout):
    check(ConvT(n=0, stride=2, output_padding=1), backend, layout, jnp.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_under_jit(backend, layout):
    check(GEOMETRIES["anisotropic_everything"], backend, layout, jnp.float64, jit=True)


def test_inverts_conv2d_shape(backend):
    # With output_padding the transposed conv maps a strided conv's output back to its input
    # size exactly: 7 -> conv(k3, s2, p1) -> 4 -> convT(k3, s2, p1, op=0) -> 7,
    # and 8 -> 4 -> convT(..., op=1) -> 8.
    for size, op in ((7, 0), (8, 1)):
        x = on(backend, jnp.ones((1, 2, size, size)))
        y = jaxconv.conv2d(x, jnp.ones((3, 2, 3, 3)), stride=2, padding=1)
        back = jaxconv.conv_transpose2d(y, jnp.ones((3, 2, 3, 3)), stride=2, padding=1,
                                        output_padding=op)
        assert back.shape == x.shape


def random_convt(rng: np.random.Generator) -> ConvT:
    while True:
        groups = int(rng.choice([1, 1, 2]))
        kernel = tuple(int(k) for k in rng.integers(1, 5, 2))
        stride = tuple(int(s) for s in rng.integers(1, 4, 2))
        dilation = tuple(int(d) for d in rng.integers(1, 3, 2))
        output_padding = tuple(int(rng.integers(0, max(s, d))) for s, d in zip(stride, dilation))
        padding = tuple(tuple(int(p) for p in rng.integers(0, 3, 2)) for _ in range(2))
        case = ConvT(n=int(rng.integers(1, 3)), c_in=groups * int(rng.integers(1, 4)),
                     c_out=groups * int(rng.integers(1, 4)), h=int(rng.integers(1, 7)),
                     w=int(rng.integers(1, 7)), kernel=kernel, stride=stride, padding=padding,
                     output_padding=output_padding, dilation=dilation, groups=groups)
        if min(case.out_hw()) >= 1:
            return case


@pytest.mark.parametrize("seed", range(16))
def test_random_configurations(backend, seed):
    case = random_convt(np.random.default_rng(2000 + seed))
    check(case, backend, LAYOUTS[seed % 2], [jnp.float32, jnp.float64][(seed // 2) % 2],
          bias=bool(seed % 3), seed=seed)
