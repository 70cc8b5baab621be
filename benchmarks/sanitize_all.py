"""Runs every jaxconv GPU kernel once on small shapes, for compute-sanitizer (memcheck,
racecheck) in benchmarks/gpu_check.sh: conv2d forward, bwd_data and bwd_filter (narrow and wide
output-channel tiles, strides with bwd_data phases, groups, depthwise, few input channels, a
reduction long enough to split bwd_filter into partial sums), transposed convolution, and max
pooling forward (with indices, and values-only without a gradient) and backward; both layouts;
float32 at default and HIGHEST precision, bfloat16, float16 and float64. Shapes are small
because the sanitizers slow kernels down 10-100x.

Usage: python benchmarks/sanitize_all.py [--device gpu|cpu] [--dtypes float32,bfloat16]
(cpu: a dry run of the same calls; --dtypes: a subset, for the slower racecheck)
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import jaxconv  # noqa: E402

# (name, N, C, H, W, O, kernel, stride, padding, dilation, groups)
CONVS = [
    ("narrow_3x3", 2, 3, 9, 9, 8, 3, 1, 1, 1, 1),
    ("wide_strided", 1, 8, 11, 10, 70, 3, 2, 1, 1, 1),
    ("grouped_dilated", 2, 4, 9, 8, 6, (3, 2), (2, 1), 2, (1, 2), 2),
    ("depthwise", 2, 16, 10, 10, 16, 3, 1, 1, 1, 16),
    ("stride3_phases", 1, 4, 10, 10, 4, 3, 3, 0, 1, 1),
    ("split_bwd_filter", 4, 3, 32, 32, 5, 3, 1, 1, 1, 1),
]
DTYPES = [
    ("float32", None),
    ("float32", "highest"),
    ("bfloat16", None),
    ("float16", None),
    ("float64", None),
]


def conv_case(name, n, c, h, w, o, kernel, stride, padding, dilation, groups, layout, dtype):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    rng = np.random.default_rng(0)
    xs = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
    ws = (o, c // groups, kh, kw) if layout == "NCHW" else (kh, kw, c // groups, o)
    x = jnp.asarray(rng.standard_normal(xs), dtype)
    wt = jnp.asarray(rng.standard_normal(ws), dtype)
    b = jnp.asarray(rng.standard_normal(o), dtype)
    kw_ = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, layout=layout)

    def loss(x, wt, b):
        y = jaxconv.conv2d(x, wt, b, **kw_)
        return jnp.sum(y.astype(jnp.float32 if dtype != "float64" else jnp.float64) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (x, wt, b)


def transpose_and_pool_case(layout, dtype):
    rng = np.random.default_rng(1)
    xs = (2, 6, 7, 9) if layout == "NCHW" else (2, 7, 9, 6)
    ws = (6, 4, 4, 4) if layout == "NCHW" else (4, 4, 4, 6)
    x = jnp.asarray(rng.standard_normal(xs), dtype)
    wt = jnp.asarray(rng.standard_normal(ws), dtype)

    def loss(x, wt):
        y = jaxconv.conv_transpose2d(x, wt, stride=2, padding=1, output_padding=1, layout=layout)
        p = jaxconv.max_pool2d(y, 3, stride=2, padding=1, ceil_mode=True, layout=layout)
        return jnp.sum(p.astype(jnp.float32 if dtype != "float64" else jnp.float64) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (x, wt)


def pool_values_case(layout, dtype):
    """max_pool2d without a gradient: the values-only forward (jaxconv_max_pool2d_fwd_values),
    on channel counts that take the 128-bit NHWC lanes (8) and the element lanes (5)."""
    rng = np.random.default_rng(2)
    cases = []
    for c in (8, 5):
        xs = (2, c, 9, 11) if layout == "NCHW" else (2, 9, 11, c)
        x = jnp.asarray(rng.standard_normal(xs), dtype)
        fn = jax.jit(
            lambda x: jaxconv.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, layout=layout)
        )
        cases.append((fn, (x,)))
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="gpu", choices=("gpu", "cpu"))
    parser.add_argument(
        "--dtypes",
        default=",".join(sorted({d for d, _ in DTYPES})),
        help="comma list of dtypes to run (default: all)",
    )
    args = parser.parse_args(argv)
    wanted = set(args.dtypes.split(","))
    device = jax.devices(args.device)[0]
    calls = 0
    with jax.default_device(device):
        for dtype, precision in [(d, p) for d, p in DTYPES if d in wanted]:
            with jax.default_matmul_precision(precision or "default"):
                for layout in ("NCHW", "NHWC"):
                    for case in CONVS:
                        fn, operands = conv_case(*case, layout, dtype)
                        grads = jax.block_until_ready(fn(*operands))
                        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads), case[0]
                        calls += 1
                    fn, operands = transpose_and_pool_case(layout, dtype)
                    jax.block_until_ready(fn(*operands))
                    calls += 1
                    for fn, operands in pool_values_case(layout, dtype):
                        y = jax.block_until_ready(fn(*operands))
                        assert bool(jnp.all(jnp.isfinite(y))), "values-only pool"
                        calls += 1
    print(
        f"sanitize_all: {calls} calls on {device.device_kind} "
        f"({device.platform}), every result finite"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
