"""The FFI handlers defend themselves: raw calls through jax.ffi.ffi_call with inconsistent
shapes, attributes or dtypes raise a Python exception carrying the handler's message, and never
crash the process.

Every raw call runs in a child process (this file run as a script). The parent feeds it all case
names; the child announces each case before running it and reports its outcome after, so if a
handler crashes the child, exactly that case is recorded as a crash and a fresh child carries on
with the rest. A segfault therefore fails one test, not the run.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from child import run_python

pytestmark = pytest.mark.slow(
    "every raw call runs in a child process (this file as a script), a fresh one after each crash"
)

F32, F16, F64 = "float32", "float16", "float64"

# Attributes of a plain 3x3 stride-1 convolution and of a 2x2/2 pool (names as ConvGeometry.attrs
# and PoolGeometry.attrs in jaxconv/_args.py give them; the lowering in jaxconv/_primitive.py
# passes them all as int64).
CONV = dict(
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
)
POOL = dict(
    kernel_h=2,
    kernel_w=2,
    stride_h=2,
    stride_w=2,
    dilation_h=1,
    dilation_w=1,
    pad_top=0,
    pad_bottom=0,
    pad_left=0,
    pad_right=0,
    ceil_mode=0,
    layout=0,
)
X, W, Y = (2, 4, 5, 5), (6, 4, 3, 3), (2, 6, 3, 3)  # x (*) w = y, NCHW / OIHW
PX, PY = (2, 4, 5, 5), (2, 4, 2, 2)  # pool input / output

FWD, BWD_DATA, BWD_FILTER = (
    "jaxconv_conv2d_fwd",
    "jaxconv_conv2d_bwd_data",
    "jaxconv_conv2d_bwd_filter",
)
POOL_FWD, POOL_BWD = "jaxconv_max_pool2d_fwd", "jaxconv_max_pool2d_bwd"
POOL_VALUES = "jaxconv_max_pool2d_fwd_values"


def bad(target, args, outs, attrs, pattern):
    """A raw call expected to fail with `pattern` in the message. args/outs: (shape, dtype)."""
    return dict(target=target, args=args, outs=outs, attrs=attrs, pattern=pattern)


def with_(base, **changes):
    return {**base, **changes}


def without(base, key):
    return {k: v for k, v in base.items() if k != key}


NO_BIAS = ((0,), F32)
# name -> raw call and the message the handler must answer with.
BAD = {
    # conv fwd: buffers
    "fwd_output_shape": bad(
        FWD,
        [(X, F32), (W, F32), NO_BIAS],
        [((2, 6, 4, 3), F32)],
        CONV,
        r"output shape \(2, 6, 4, 3\) does not match the geometry "
        r"\(2, 6, 3, 3\)",
    ),
    "fwd_output_channels": bad(
        FWD,
        [(X, F32), (W, F32), NO_BIAS],
        [((2, 5, 3, 3), F32)],
        CONV,
        r"output shape .* does not match",
    ),
    "fwd_output_rank": bad(
        FWD,
        [(X, F32), (W, F32), NO_BIAS],
        [((2, 6, 9), F32)],
        CONV,
        r"output must have rank 4, got rank 3",
    ),
    "fwd_input_rank": bad(
        FWD,
        [((4, 5, 5), F32), (W, F32), NO_BIAS],
        [(Y, F32)],
        CONV,
        r"input must have rank 4, got rank 3",
    ),
    "fwd_weight_rank": bad(
        FWD,
        [(X, F32), ((6, 4, 3, 3, 1), F32), NO_BIAS],
        [(Y, F32)],
        CONV,
        r"weights must have rank 4, got rank 5",
    ),
    "fwd_channels": bad(
        FWD,
        [(X, F32), ((6, 3, 3, 3), F32), NO_BIAS],
        [(Y, F32)],
        CONV,
        r"weight input channels \* groups != input channels",
    ),
    "fwd_groups_c": bad(
        FWD,
        [(X, F32), ((6, 1, 3, 3), F32), NO_BIAS],
        [(Y, F32)],
        with_(CONV, groups=3),
        r"input channels are not divisible by groups",
    ),
    "fwd_groups_o": bad(
        FWD,
        [(X, F32), ((5, 2, 3, 3), F32), NO_BIAS],
        [((2, 5, 3, 3), F32)],
        with_(CONV, groups=2),
        r"output channels are not divisible by groups",
    ),
    "fwd_empty_spatial": bad(
        FWD,
        [((2, 4, 0, 5), F32), (W, F32), NO_BIAS],
        [(Y, F32)],
        CONV,
        r"input has an empty channel or spatial dim",
    ),
    "fwd_empty_kernel": bad(
        FWD,
        [(X, F32), ((6, 4, 0, 3), F32), NO_BIAS],
        [(Y, F32)],
        CONV,
        r"weights have an empty dimension",
    ),
    "fwd_output_size_zero": bad(
        FWD,
        [(X, F32), ((6, 4, 7, 7), F32), NO_BIAS],
        [((2, 6, 1, 1), F32)],
        CONV,
        r"output spatial size would be <= 0",
    ),
    # conv fwd: attributes
    "fwd_stride_0": bad(
        FWD,
        [(X, F32), (W, F32), NO_BIAS],
        [(Y, F32)],
        with_(CONV, stride_w=0),
        r"stride must be >= 1",
    ),
    "fwd_stride_negative": bad(
        FWD,
        [(X, F32), (W, F32), NO_BIAS],
        [(Y, F32)],
        with_(CONV, stride_h=-1),
        r"stride must be >= 1",
    ),
    "fwd_dilation_0": bad(
        FWD,
        [(X, F32), (W, F32), NO_BIAS],
        [(Y, F32)],
        with_(CONV, dilation_h=0),
        r"dilation must be >= 1",
    ),
    "fwd_groups_0": bad(
        FWD,
        [(X, F32), (W, F32), NO_BIAS],
        [(Y, F32)],
        with_(CONV, groups=0),
        r"groups must be >= 1",
    ),
    "fwd_layout": bad(
        FWD,
        [(X, F32), (W, F32), NO_BIAS],
        [(Y, F32)],
        with_(CONV, layout=2),
        r"layout must be 0 \(NCHW\) or 1 \(NHWC\)",
    ),
    "fwd_missing_attribute": bad(
        FWD,
        [(X, F32), (W, F32), NO_BIAS],
        [(Y, F32)],
        without(CONV, "groups"),
        r"missing int64 attribute 'groups'",
    ),
    "fwd_int32_attribute": bad(
        FWD,
        [(X, F32), (W, F32), NO_BIAS],
        [(Y, F32)],
        with_(CONV, pad_top=("int32", 0)),
        r"int64 attribute 'pad_top' \(absent or of another type\)",
    ),
    "fwd_float_attribute": bad(
        FWD,
        [(X, F32), (W, F32), NO_BIAS],
        [(Y, F32)],
        with_(CONV, stride_h=("float64", 1.0)),
        r"attribute 'stride_h'",
    ),
    # Huge pads that cancel out would give a "consistent" 3x3 output through int64 overflow.
    "fwd_attribute_overflow": bad(
        FWD,
        [(X, F32), (W, F32), NO_BIAS],
        [(Y, F32)],
        with_(CONV, pad_top=2**62, pad_bottom=-(2**62)),
        r"integer attributes must fit in int32",
    ),
    "fwd_dilation_overflow": bad(
        FWD,
        [(X, F32), (W, F32), NO_BIAS],
        [(Y, F32)],
        with_(CONV, dilation_h=2**62, pad_top=-(2**62)),
        r"must fit in int32",
    ),
    # conv fwd: dtypes and bias
    "fwd_mixed_dtypes": bad(
        FWD,
        [(X, F32), (W, F16), NO_BIAS],
        [(Y, F32)],
        CONV,
        r"all floating-point operands must share one dtype",
    ),
    "fwd_output_dtype": bad(
        FWD, [(X, F32), (W, F32), NO_BIAS], [(Y, F64)], CONV, r"share one dtype"
    ),
    "fwd_int_dtype": bad(
        FWD,
        [(X, "int32"), (W, "int32"), ((0,), "int32")],
        [(Y, "int32")],
        CONV,
        r"dtype must be float32, float64, float16 or bfloat16",
    ),
    "fwd_complex_dtype": bad(
        FWD,
        [(X, "complex64"), (W, "complex64"), ((0,), "complex64")],
        [(Y, "complex64")],
        CONV,
        r"dtype must be float32",
    ),
    "fwd_bias_length": bad(
        FWD,
        [(X, F32), (W, F32), ((5,), F32)],
        [(Y, F32)],
        CONV,
        r"bias must be a vector of length 0 or 6",
    ),
    "fwd_bias_rank": bad(
        FWD, [(X, F32), (W, F32), ((6, 1), F32)], [(Y, F32)], CONV, r"bias must be a vector"
    ),
    "fwd_bias_dtype": bad(
        FWD, [(X, F32), (W, F32), ((6,), F16)], [(Y, F32)], CONV, r"share one dtype"
    ),
    "fwd_too_few_operands": bad(
        FWD,
        [(X, F32), (W, F32)],
        [(Y, F32)],
        CONV,
        r"Wrong number of arguments: expected 3 but got 2",
    ),
    "fwd_too_many_results": bad(
        FWD,
        [(X, F32), (W, F32), NO_BIAS],
        [(Y, F32), (Y, F32)],
        CONV,
        r"Wrong number of results: expected 1 but got 2",
    ),
    "fwd_nhwc_as_nchw": bad(
        FWD,
        [((2, 5, 5, 4), F32), ((3, 3, 4, 6), F32), NO_BIAS],
        [((2, 3, 3, 6), F32)],
        CONV,
        r"input channels",
    ),
    # conv bwd_data (dy, w, bias) -> dx and bwd_filter (x, dy) -> dw
    "bwd_data_dy_shape": bad(
        BWD_DATA,
        [((2, 6, 4, 3), F32), (W, F32), NO_BIAS],
        [(X, F32)],
        CONV,
        r"jaxconv_conv2d_bwd_data: output shape \(2, 6, 4, 3\) does not "
        r"match",
    ),
    "bwd_data_dx_channels": bad(
        BWD_DATA,
        [(Y, F32), (W, F32), NO_BIAS],
        [((2, 3, 5, 5), F32)],
        CONV,
        r"weight input channels \* groups != input channels",
    ),
    "bwd_data_bias_length": bad(
        BWD_DATA,
        [(Y, F32), (W, F32), ((6,), F32)],
        [(X, F32)],
        CONV,
        r"bias must be a vector of length 0 or 4",
    ),
    "bwd_data_mixed": bad(
        BWD_DATA, [(Y, F16), (W, F32), NO_BIAS], [(X, F32)], CONV, r"share one dtype"
    ),
    "bwd_filter_dy_shape": bad(
        BWD_FILTER,
        [(X, F32), ((2, 6, 3, 4), F32)],
        [(W, F32)],
        CONV,
        r"jaxconv_conv2d_bwd_filter: output shape .* does not match",
    ),
    "bwd_filter_dw_rank": bad(
        BWD_FILTER,
        [(X, F32), (Y, F32)],
        [((6, 36), F32)],
        CONV,
        r"weights must have rank 4, got rank 2",
    ),
    "bwd_filter_stride": bad(
        BWD_FILTER,
        [(X, F32), (Y, F32)],
        [(W, F32)],
        with_(CONV, stride_h=2),
        r"output shape .* does not match",
    ),
    # max pool fwd x -> (y, int32 indices)
    "pool_output_shape": bad(
        POOL_FWD,
        [(PX, F32)],
        [((2, 4, 3, 2), F32), ((2, 4, 3, 2), "int32")],
        POOL,
        r"output/indices shapes do not match the geometry "
        r"\(2, 4, 2, 2\)",
    ),
    "pool_indices_shape": bad(
        POOL_FWD,
        [(PX, F32)],
        [(PY, F32), ((2, 4, 2, 1), "int32")],
        POOL,
        r"output/indices shapes do not match",
    ),
    "pool_indices_int64": bad(
        POOL_FWD, [(PX, F32)], [(PY, F32), (PY, "int64")], POOL, r"indices must be int32"
    ),
    "pool_output_dtype": bad(
        POOL_FWD, [(PX, F32)], [(PY, F16), (PY, "int32")], POOL, r"share one dtype"
    ),
    "pool_int_input": bad(
        POOL_FWD, [(PX, "int32")], [(PY, "int32"), (PY, "int32")], POOL, r"dtype must be float32"
    ),
    "pool_rank": bad(
        POOL_FWD, [((4, 5, 5), F32)], [(PY, F32), (PY, "int32")], POOL, r"input must have rank 4"
    ),
    "pool_kernel_0": bad(
        POOL_FWD,
        [(PX, F32)],
        [(PY, F32), (PY, "int32")],
        with_(POOL, kernel_w=0),
        r"kernel_size must be >= 1",
    ),
    "pool_stride_0": bad(
        POOL_FWD,
        [(PX, F32)],
        [(PY, F32), (PY, "int32")],
        with_(POOL, stride_h=0),
        r"stride must be >= 1",
    ),
    "pool_dilation_0": bad(
        POOL_FWD,
        [(PX, F32)],
        [(PY, F32), (PY, "int32")],
        with_(POOL, dilation_w=0),
        r"dilation must be >= 1",
    ),
    "pool_negative_padding": bad(
        POOL_FWD,
        [(PX, F32)],
        [((2, 4, 4, 4), F32), ((2, 4, 4, 4), "int32")],
        with_(POOL, kernel_h=1, kernel_w=1, stride_h=1, stride_w=1, pad_top=5, pad_bottom=-6),
        r"padding must be >= 0",
    ),
    "pool_layout": bad(
        POOL_FWD,
        [(PX, F32)],
        [(PY, F32), (PY, "int32")],
        with_(POOL, layout=-1),
        r"layout must be 0 \(NCHW\) or 1 \(NHWC\)",
    ),
    "pool_missing_ceil_mode": bad(
        POOL_FWD,
        [(PX, F32)],
        [(PY, F32), (PY, "int32")],
        without(POOL, "ceil_mode"),
        r"attribute 'ceil_mode'",
    ),
    "pool_kernel_overflow": bad(
        POOL_FWD,
        [(PX, F32)],
        [(PY, F32), (PY, "int32")],
        with_(POOL, kernel_h=2**40),
        r"must fit in int32",
    ),
    "pool_empty_spatial": bad(
        POOL_FWD,
        [((2, 4, 0, 5), F32)],
        [(PY, F32), (PY, "int32")],
        POOL,
        r"input has an empty spatial dim",
    ),
    "pool_one_result": bad(
        POOL_FWD, [(PX, F32)], [(PY, F32)], POOL, r"Wrong number of results: expected 2 but got 1"
    ),
    # values-only max pool fwd x -> y: the forward's checks, without the indices
    "pool_values_output_shape": bad(
        POOL_VALUES,
        [(PX, F32)],
        [((2, 4, 3, 2), F32)],
        POOL,
        r"jaxconv_max_pool2d_fwd_values: output shape "
        r"\(2, 4, 3, 2\) does not match the geometry "
        r"\(2, 4, 2, 2\)",
    ),
    "pool_values_output_layout": bad(
        POOL_VALUES,
        [(PX, F32)],
        [(PY, F32)],
        with_(POOL, layout=1),
        r"output shape \(2, 2, 4, 2\) does not match the geometry "
        r"\(2, 5, 2, 2\)",
    ),
    "pool_values_output_dtype": bad(
        POOL_VALUES,
        [(PX, F32)],
        [(PY, F16)],
        POOL,
        r"jaxconv_max_pool2d_fwd_values: all floating-point "
        r"operands must share one dtype",
    ),
    "pool_values_int_input": bad(
        POOL_VALUES,
        [(PX, "int32")],
        [(PY, "int32")],
        POOL,
        r"jaxconv_max_pool2d_fwd_values: dtype must be float32",
    ),
    "pool_values_rank": bad(
        POOL_VALUES,
        [((4, 5, 5), F32)],
        [(PY, F32)],
        POOL,
        r"jaxconv_max_pool2d_fwd_values: input must have rank 4",
    ),
    "pool_values_output_rank": bad(
        POOL_VALUES, [(PX, F32)], [((2, 4, 4), F32)], POOL, r"output must have rank 4, got rank 3"
    ),
    "pool_values_stride_0": bad(
        POOL_VALUES,
        [(PX, F32)],
        [(PY, F32)],
        with_(POOL, stride_w=0),
        r"jaxconv_max_pool2d_fwd_values: stride must be >= 1",
    ),
    "pool_values_missing_ceil_mode": bad(
        POOL_VALUES,
        [(PX, F32)],
        [(PY, F32)],
        without(POOL, "ceil_mode"),
        r"jaxconv_max_pool2d_fwd_values: .*attribute "
        r"'ceil_mode'",
    ),
    "pool_values_kernel_overflow": bad(
        POOL_VALUES, [(PX, F32)], [(PY, F32)], with_(POOL, kernel_h=2**40), r"must fit in int32"
    ),
    "pool_values_indices_result": bad(
        POOL_VALUES,
        [(PX, F32)],
        [(PY, F32), (PY, "int32")],
        POOL,
        r"Wrong number of results: expected 1 but got 2",
    ),
    # max pool bwd (dy, int32 indices) -> dx
    "pool_bwd_indices_float": bad(
        POOL_BWD,
        [(PY, F32), (PY, F32)],
        [(PX, F32)],
        POOL,
        r"jaxconv_max_pool2d_bwd: indices must be int32",
    ),
    "pool_bwd_indices_int64": bad(
        POOL_BWD, [(PY, F32), (PY, "int64")], [(PX, F32)], POOL, r"indices must be int32"
    ),
    "pool_bwd_indices_shape": bad(
        POOL_BWD,
        [(PY, F32), ((2, 4, 1, 2), "int32")],
        [(PX, F32)],
        POOL,
        r"output/indices shapes do not match",
    ),
    "pool_bwd_dy_shape": bad(
        POOL_BWD,
        [((2, 4, 3, 3), F32), (PY, "int32")],
        [(PX, F32)],
        POOL,
        r"output/indices shapes do not match",
    ),
    "pool_bwd_mixed": bad(
        POOL_BWD, [(PY, F16), (PY, "int32")], [(PX, F32)], POOL, r"share one dtype"
    ),
}

# Raw calls that are valid but reach corners Python never produces; the child compares them with
# lax and reports the largest error.
GOOD = [
    "conv_negative_pads",
    "bwd_data_negative_pads",
    "pool_bwd_out_of_range_indices",
    "conv_nhwc_layout_code",
    "bwd_filter_empty_batch",
    "fuzz_conv_attributes",
    "fuzz_pool_attributes",
]

# Checks the harness itself: this case kills its child with SIGSEGV.
SELFTEST = ["selftest_segfault"]


# ---------------------------------------------------------------------------------------------
# Child side.


def _attrs(attrs):
    import numpy as np

    out = {}
    for k, v in attrs.items():
        out[k] = np.dtype(v[0]).type(v[1]) if isinstance(v, tuple) else np.int64(v)
    return out


def _run_bad(case):
    import jax
    import jax.numpy as jnp

    args = [jnp.ones(shape, dtype) for shape, dtype in case["args"]]
    outs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in case["outs"]]
    res = jax.ffi.ffi_call(case["target"], outs if len(outs) > 1 else outs[0])(
        *args, **_attrs(case["attrs"])
    )
    jax.block_until_ready(res)


def _run_good(name) -> float:
    """Returns max |raw - reference|."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    rng = np.random.default_rng(0)
    hi = lax.Precision.HIGHEST

    def call(target, outs, *args, **attrs):
        return jax.ffi.ffi_call(target, outs)(*args, **_attrs(attrs))

    if name in ("conv_negative_pads", "bwd_data_negative_pads"):
        # Negative pads crop the input (what conv_transpose2d's output_padding produces inside).
        pads = ((-1, 2), (1, -2))
        x = jnp.asarray(rng.standard_normal((2, 4, 7, 8)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((6, 2, 3, 2)), jnp.float32)
        attrs = dict(
            CONV,
            stride_h=2,
            stride_w=1,
            dilation_w=2,
            pad_top=-1,
            pad_bottom=2,
            pad_left=1,
            pad_right=-2,
            groups=2,
        )
        ref = lambda x: lax.conv_general_dilated(
            x, w, (2, 1), pads, rhs_dilation=(1, 2), feature_group_count=2, precision=hi
        )
        y_ref, vjp = jax.vjp(ref, x)
        if name == "conv_negative_pads":
            y = call(
                FWD,
                jax.ShapeDtypeStruct(y_ref.shape, jnp.float32),
                x,
                w,
                jnp.zeros((0,), jnp.float32),
                **attrs,
            )
            return float(jnp.max(jnp.abs(y - y_ref)))
        dy = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)
        dx = call(
            BWD_DATA,
            jax.ShapeDtypeStruct(x.shape, jnp.float32),
            dy,
            w,
            jnp.zeros((0,), jnp.float32),
            **attrs,
        )
        return float(jnp.max(jnp.abs(dx - vjp(dy)[0])))
    if name == "conv_nhwc_layout_code":
        x = jnp.asarray(rng.standard_normal((2, 5, 6, 3)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 2, 3, 4)), jnp.float32)
        y_ref = lax.conv_general_dilated(
            x, w, (1, 1), "VALID", precision=hi, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        y = call(
            FWD,
            jax.ShapeDtypeStruct(y_ref.shape, jnp.float32),
            x,
            w,
            jnp.zeros((0,), jnp.float32),
            **dict(CONV, layout=1),
        )
        return float(jnp.max(jnp.abs(y - y_ref)))
    if name == "pool_bwd_out_of_range_indices":
        # Indices outside the plane (negative, or >= H*W) receive nothing; valid ones accumulate.
        dy = jnp.arange(1, 9, dtype=jnp.float32).reshape(1, 2, 2, 2)
        idx = jnp.array([[[[0, -1], [25, 0]], [[24, 2**31 - 1], [-(2**31), 7]]]], jnp.int32)
        dx = call(POOL_BWD, jax.ShapeDtypeStruct((1, 2, 5, 5), jnp.float32), dy, idx, **POOL)
        want = np.zeros((1, 2, 25), np.float32)
        want[0, 0, 0] = 1 + 4
        want[0, 1, 24] = 5
        want[0, 1, 7] = 8
        return float(np.max(np.abs(np.asarray(dx).reshape(1, 2, 25) - want)))
    if name == "bwd_filter_empty_batch":
        # N = 0: dw is a sum over nothing.
        dw = call(
            BWD_FILTER,
            jax.ShapeDtypeStruct(W, jnp.float32),
            jnp.ones((0,) + X[1:], jnp.float32),
            jnp.ones((0,) + Y[1:], jnp.float32),
            **CONV,
        )
        return float(jnp.max(jnp.abs(dw)))
    if name == "fuzz_conv_attributes":
        return _fuzz_conv(rng)
    if name == "fuzz_pool_attributes":
        return _fuzz_pool(rng)
    raise KeyError(name)


# Seeded fuzzing of attribute combinations Python never produces: pads of either sign on each
# side (a negative pad crops), any stride/dilation/groups/layout. Whenever lax's convolution has
# a non-empty output, the three raw targets must match it (fwd) and its VJP (bwd_data,
# bwd_filter); whenever it has none, fwd must raise.
FUZZ_CONFIGS = 16


def _fuzz_conv(rng) -> float:
    import jax
    import jax.numpy as jnp
    from jax import lax

    worst = 0.0
    for _ in range(FUZZ_CONFIGS):
        groups = int(rng.integers(1, 3))
        n, c, o = (
            int(rng.integers(1, 3)),
            groups * int(rng.integers(1, 3)),
            groups * int(rng.integers(1, 3)),
        )
        h, w, kh, kw = (int(v) for v in rng.integers(1, 6, 4))
        stride, dil = (
            [int(v) for v in rng.integers(1, 4, 2)],
            [int(v) for v in rng.integers(1, 3, 2)],
        )
        pads = [(int(a), int(b)) for a, b in rng.integers(-3, 4, (2, 2))]
        layout = int(rng.integers(0, 2))
        dn = ("NCHW", "OIHW", "NCHW") if layout == 0 else ("NHWC", "HWIO", "NHWC")
        x_shape = (n, c, h, w) if layout == 0 else (n, h, w, c)
        w_shape = (o, c // groups, kh, kw) if layout == 0 else (kh, kw, c // groups, o)
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float64)
        wt = jnp.asarray(rng.standard_normal(w_shape), jnp.float64)
        attrs = dict(
            CONV,
            stride_h=stride[0],
            stride_w=stride[1],
            dilation_h=dil[0],
            dilation_w=dil[1],
            pad_top=pads[0][0],
            pad_bottom=pads[0][1],
            pad_left=pads[1][0],
            pad_right=pads[1][1],
            groups=groups,
            layout=layout,
        )
        out_hw = [
            (i + lo + hi - d * (k - 1) - 1) // s + 1
            for i, k, s, d, (lo, hi) in zip((h, w), (kh, kw), stride, dil, pads)
        ]
        call = lambda target, shape, *args: jax.ffi.ffi_call(
            target, jax.ShapeDtypeStruct(shape, jnp.float64)
        )(*args, **_attrs(attrs))
        none = jnp.zeros((0,), jnp.float64)
        if min(out_hw) < 1:
            y_shape = (n, o, 1, 1) if layout == 0 else (n, 1, 1, o)
            try:
                jax.block_until_ready(call(FWD, y_shape, x, wt, none))
            except Exception as e:
                if "output spatial size would be <= 0" not in str(e):
                    return float("inf")
                continue
            return float("inf")  # an empty convolution must not run
        ref = lambda x, wt: lax.conv_general_dilated(
            x,
            wt,
            stride,
            pads,
            rhs_dilation=dil,
            feature_group_count=groups,
            dimension_numbers=dn,
            precision=lax.Precision.HIGHEST,
        )
        y_ref, vjp = jax.vjp(ref, x, wt)
        dy = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float64)
        dx_ref, dw_ref = vjp(dy)
        y = call(FWD, y_ref.shape, x, wt, none)
        dx = call(BWD_DATA, x_shape, dy, wt, none)
        dw = call(BWD_FILTER, w_shape, x, dy)
        for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
            worst = max(worst, float(jnp.max(jnp.abs(got - want), initial=0.0)))
    return worst


def _fuzz_pool(rng) -> float:
    """Raw max pool with any non-negative pads (more than half a window included, so windows
    entirely in padding occur): values and indices against the NumPy loop oracle, and the
    values-only target's y bitwise equal to the indexed target's."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(__file__))
    from reference import pool_out_size, ref_max_pool2d

    worst = 0.0
    for _ in range(FUZZ_CONFIGS):
        n, c = (int(v) for v in rng.integers(1, 3, 2))
        h, w = (int(v) for v in rng.integers(1, 7, 2))
        kernel, stride = (
            [int(v) for v in rng.integers(1, 4, 2)],
            [int(v) for v in rng.integers(1, 4, 2)],
        )
        dil = [int(v) for v in rng.integers(1, 3, 2)]
        pads = [(int(a), int(b)) for a, b in rng.integers(0, 4, (2, 2))]
        ceil_mode, layout = int(rng.integers(0, 2)), int(rng.integers(0, 2))
        out_hw = [
            pool_out_size(i, k, s, d, lo, hi, ceil_mode)
            for i, k, s, d, (lo, hi) in zip((h, w), kernel, stride, dil, pads)
        ]
        if min(out_hw) < 1:
            continue
        names = "NCHW" if layout == 0 else "NHWC"
        x_shape = (n, c, h, w) if layout == 0 else (n, h, w, c)
        y_shape = (n, c, *out_hw) if layout == 0 else (n, *out_hw, c)
        x = jnp.asarray(rng.integers(-3, 4, x_shape), jnp.float32)  # ties on purpose
        attrs = dict(
            kernel_h=kernel[0],
            kernel_w=kernel[1],
            stride_h=stride[0],
            stride_w=stride[1],
            dilation_h=dil[0],
            dilation_w=dil[1],
            pad_top=pads[0][0],
            pad_bottom=pads[0][1],
            pad_left=pads[1][0],
            pad_right=pads[1][1],
            ceil_mode=ceil_mode,
            layout=layout,
        )
        y, idx = jax.ffi.ffi_call(
            POOL_FWD,
            (jax.ShapeDtypeStruct(y_shape, jnp.float32), jax.ShapeDtypeStruct(y_shape, jnp.int32)),
        )(x, **_attrs(attrs))
        y_values = jax.ffi.ffi_call(POOL_VALUES, jax.ShapeDtypeStruct(y_shape, jnp.float32))(
            x, **_attrs(attrs)
        )
        if not np.array_equal(np.asarray(y_values).view(np.uint32), np.asarray(y).view(np.uint32)):
            return float("inf")
        vals, want_idx = ref_max_pool2d(x, kernel, stride, pads, dil, bool(ceil_mode), names)
        if not np.array_equal(np.asarray(idx), want_idx):
            return float("inf")
        worst = max(
            worst,
            float(
                np.max(
                    np.abs(np.asarray(y, np.float64) - vals), initial=0.0, where=np.isfinite(vals)
                )
            ),
        )
        if not np.array_equal(np.isneginf(np.asarray(y)), np.isneginf(vals)):
            return float("inf")
    return worst


def _child(names):
    import jax

    jax.config.update("jax_enable_x64", True)
    # Raw calls run on the parent's `backend`: the inputs are uncommitted, so they and the call
    # go to the default device.
    jax.config.update("jax_default_device", jax.devices(os.environ["JAXCONV_TEST_BACKEND"])[0])
    import jaxconv  # noqa: F401  (registers the targets)

    for name in names:
        print(f"START {name}", flush=True)
        # Attribute values compare equal across types (np.int32(0) == np.int64(0)), so a cached
        # executable from an earlier case would hide an attribute-type error: start clean.
        jax.clear_caches()
        if name == "selftest_segfault":
            import ctypes

            ctypes.string_at(0)  # reads address 0: SIGSEGV
        try:
            if name in BAD:
                _run_bad(BAD[name])
                result = dict(outcome="no error")
            else:
                result = dict(outcome="ok", error=_run_good(name))
        except Exception as e:
            result = dict(outcome="exception", type=type(e).__name__, message=str(e))
        print("RESULT " + json.dumps(dict(name=name, **result)), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent side.


def _run_isolated(names, backend, timeout=240):
    """Runs the cases on `backend` in child processes; a case whose child dies is recorded as a
    crash."""
    results, pending = {}, list(names)
    while pending:
        proc = run_python(
            __file__,
            *pending,
            timeout=timeout,
            env={"PYTHONFAULTHANDLER": "", "JAXCONV_TEST_BACKEND": backend},
        )
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                started = line.split(" ", 1)[1]
            elif line.startswith("RESULT "):
                r = json.loads(line.split(" ", 1)[1])
                results[r["name"]] = r
                started = None
        if started is not None:  # died inside this case
            results[started] = dict(
                name=started,
                outcome="crash",
                returncode=proc.returncode,
                stderr=proc.stderr[-2000:],
            )
        elif proc.returncode != 0:
            pytest.fail(f"child failed outside any case (rc {proc.returncode}):\n{proc.stderr}")
        pending = [n for n in pending if n not in results]
    return results


_RESULTS: dict[str, dict] = {}  # backend -> results of every case, run once per backend


@pytest.fixture
def raw_results(backend):
    # The self-test goes first so that everything after it needs the restarted child.
    if backend not in _RESULTS:
        _RESULTS[backend] = _run_isolated(SELFTEST + sorted(BAD) + GOOD, backend)
    return _RESULTS[backend]


@pytest.mark.parametrize("name", sorted(BAD))
def test_inconsistent_call_raises(raw_results, name):
    r = raw_results[name]
    assert r["outcome"] == "exception", r
    # JaxRuntimeError (an alias of XlaRuntimeError in older jaxlibs) carrying our message.
    assert r["type"] in ("JaxRuntimeError", "XlaRuntimeError"), r
    assert "INVALID_ARGUMENT" in r["message"], r
    import re

    assert re.search(BAD[name]["pattern"], r["message"]), r["message"]


@pytest.mark.parametrize("name", GOOD)
def test_valid_raw_corner_matches_reference(raw_results, name):
    r = raw_results[name]
    assert r["outcome"] == "ok", r
    assert r["error"] < 1e-4, r


def test_harness_isolates_a_segfault(raw_results):
    """The self-test case kills its child; it is recorded as a crash and the others still ran."""
    r = raw_results["selftest_segfault"]
    assert r["outcome"] == "crash" and r["returncode"] != 0, r
    assert all(n in raw_results for n in list(BAD) + GOOD)


if __name__ == "__main__":
    _child(sys.argv[1:])
