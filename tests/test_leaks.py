"""Thousands of calls leave resident memory flat: forward and backward under jit, eager calls,
every dtype and layout through the handlers' scratch buffers, and the handlers' error path.

Method: warm up (compilation, caches, per-thread scratch reach their size), read the resident
set size from /proc/self/statm, run many more calls, read it again. The bound is generous
(allocator noise), yet a leak of one output-sized buffer per call would exceed it; each test
states that arithmetic.
"""

import gc
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconv import conv2d, conv_transpose2d, max_pool2d

from reference import on

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/statm"), reason="resident set size is read from /proc (Linux)"
)

MIB = 1 << 20
BOUND = 8 * MIB  # measured growth on a quiet run: 0.1-0.2 MiB per test


def rss_bytes() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def growth(step, warmup: int, calls: int) -> int:
    for _ in range(warmup):
        step()
    before = rss_bytes()
    for _ in range(calls):
        step()
    return rss_bytes() - before


def test_jit_forward_backward_is_flat(backend):
    # x: 2*8*24*24 float32 = 36 KiB; a leaked copy of x (or of dx, y, ...) per call would grow
    # the RSS by 2000 * 36 KiB = 70 MiB.
    rng = np.random.default_rng(0)
    x = on(backend, jnp.asarray(rng.standard_normal((2, 8, 24, 24)), jnp.float32))
    w = jnp.asarray(rng.standard_normal((8, 8, 3, 3)), jnp.float32)
    wt = jnp.asarray(rng.standard_normal((8, 4, 2, 2)), jnp.float32)
    b = jnp.zeros((8,), jnp.float32)

    @jax.jit
    def step(x, w, wt, b):
        def loss(x, w, wt, b):
            y = conv2d(x, w, b, padding=1)
            p, idx = max_pool2d(y, 3, stride=2, padding=1, return_indices=True)
            z = conv_transpose2d(p, wt, stride=2)
            return jnp.sum(z**2) + jnp.sum(idx) * 0.0

        return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w, wt, b)

    grown = growth(lambda: jax.block_until_ready(step(x, w, wt, b)), warmup=200, calls=2000)
    assert grown < BOUND, f"RSS grew by {grown / MIB:.1f} MiB over 2000 calls"


def test_eager_calls_every_dtype_and_layout_are_flat(backend):
    """Eager calls go through each primitive's cached jit; the half types and NHWC run other
    packing code and scratch buffers. Per step the 8 conv outputs hold 2 * (24 + 12 + 6 + 6) KiB
    (float64, float32, float16, bfloat16; both layouts), so leaking just those would grow the
    RSS by 150 * 96 KiB = 14 MiB."""
    rng = np.random.default_rng(1)
    variants = []
    for dtype in (jnp.float32, jnp.float64, jnp.float16, jnp.bfloat16):
        for layout in ("NCHW", "NHWC"):
            shape = (2, 6, 16, 16) if layout == "NCHW" else (2, 16, 16, 6)
            x = jnp.asarray(rng.standard_normal(shape), dtype)
            w = jnp.asarray(
                rng.standard_normal((6, 6, 3, 3) if layout == "NCHW" else (3, 3, 6, 6)), dtype
            )
            variants.append((*on(backend, x, w), layout))

    def step():
        for x, w, layout in variants:
            y = conv2d(x, w, padding=1, layout=layout)
            jax.block_until_ready(max_pool2d(y, 2, layout=layout))

    grown = growth(step, warmup=20, calls=150)
    assert grown < BOUND, f"RSS grew by {grown / MIB:.1f} MiB over 2400 eager calls"


def test_handler_error_path_is_flat(backend):
    """A compiled raw call whose handler rejects its operands (the message is built on every
    call) fails the same way 1000 times without growing; its declared output is 192 KiB, so
    leaking that buffer on the error path would grow the RSS by 188 MiB."""
    import jaxconv  # noqa: F401  (registers the targets)

    attrs = {
        k: np.int64(v)
        for k, v in dict(
            stride_h=1,
            stride_w=1,
            dilation_h=1,
            dilation_w=1,
            pad_top=0,
            pad_bottom=0,
            pad_left=0,
            pad_right=0,
            groups=1,
            layout=0,
        ).items()
    }
    bad = jax.jit(
        lambda x, w, b: jax.ffi.ffi_call(
            "jaxconv_conv2d_fwd", jax.ShapeDtypeStruct((2, 6, 64, 64), jnp.float32)
        )(x, w, b, **attrs)
    )
    x, w, b = on(
        backend,
        jnp.ones((2, 4, 5, 5), jnp.float32),
        jnp.ones((6, 4, 3, 3), jnp.float32),
        jnp.zeros((0,), jnp.float32),
    )

    def step():
        with pytest.raises(Exception, match="does not match the geometry"):
            jax.block_until_ready(bad(x, w, b))

    grown = growth(step, warmup=50, calls=1000)
    assert grown < BOUND, f"RSS grew by {grown / MIB:.1f} MiB over 1000 failing calls"
