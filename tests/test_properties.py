"""Property tests with hypothesis over the whole parameter space: layouts, dtypes, strides,
every padding form, dilation, groups, bias, ceil_mode, empty batches. Values, indices and
gradients are compared with the oracles of tests/reference.py, and argument validation with an
independent statement of what is valid.

Bounded for speed by default (deterministic examples, no example database). A deeper, randomized
run: JAXCONV_HYPOTHESIS_PROFILE=deep pytest tests/test_properties.py
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_edge_cases import assert_same_values_and_vjp, pool_grad_oracle, to_layout, w_to_layout

from jaxconv import conv2d, conv_transpose2d, max_pool2d, max_unpool2d

from reference import (
    explicit_padding,
    on,
    pool_out_size,
    random_array,
    ref_conv2d,
    ref_conv_transpose2d,
    ref_max_pool2d,
    tol,
)

pytestmark = pytest.mark.slow("hypothesis: many examples, each compiled anew")

_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        # `backend` is a plain string: nothing to reset
        HealthCheck.function_scoped_fixture,
    ],
)
settings.register_profile(
    "jaxconv-fast", max_examples=25, derandomize=True, database=None, **_COMMON
)
settings.register_profile("jaxconv-deep", max_examples=400, **_COMMON)
PROFILE_NAME = os.environ.get("JAXCONV_HYPOTHESIS_PROFILE", "fast")
PROFILE = settings.get_profile(f"jaxconv-{PROFILE_NAME}")
# Validation properties run no kernel and cost about a millisecond per example.
CHEAP = settings(PROFILE, max_examples=PROFILE.max_examples * 3)

LAYOUTS = st.sampled_from(["NCHW", "NHWC"])
DTYPES = st.sampled_from([jnp.float32, jnp.float64, jnp.float16, jnp.bfloat16])


# Batch 1 or 2 mostly and sometimes 0: an empty batch compares no values, so it should not
# take the large share that hypothesis gives the low end of a range like integers(0, 2).
BATCH = st.sampled_from([1, 2, 1, 2, 1, 2, 0])


def pair_of(lo, hi):
    return st.tuples(st.integers(lo, hi), st.integers(lo, hi))


@st.composite
def padding_forms(draw, max_pad, strings=True):
    """Any public padding form; returns (argument, ((top, bottom), (left, right)) or None for
    a string, resolved later against the input size)."""
    kinds = ["int", "pair", "nested"] + (["SAME", "VALID", "same", "valid"] if strings else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "int":
        p = draw(st.integers(0, max_pad))
        return p, ((p, p), (p, p))
    if kind == "pair":
        ph, pw = draw(pair_of(0, max_pad))
        return (ph, pw), ((ph, ph), (pw, pw))
    if kind == "nested":
        (t, b), (l_, r) = draw(pair_of(0, max_pad)), draw(pair_of(0, max_pad))
        return ((t, b), (l_, r)), ((t, b), (l_, r))
    return kind, None


def _input_size(draw, k_eff, lo, hi):
    """An input length whose padded size holds the (dilated) kernel at least once."""
    return draw(st.integers(max(1, k_eff - lo - hi), max(1, k_eff - lo - hi) + 6))


# ---------------------------------------------------------------------------------------------
# conv2d


@st.composite
def conv_configs(draw):
    groups = draw(st.integers(1, 3))
    c, o = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel, stride, dilation = draw(pair_of(1, 4)), draw(pair_of(1, 3)), draw(pair_of(1, 3))
    padding, pads = draw(padding_forms(max_pad=3))
    k_eff = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    if pads is None:  # SAME fits any input; VALID needs the kernel inside the input
        lo_hi = [(0, 0) if padding.upper() == "VALID" else (k, k) for k in k_eff]
    else:
        lo_hi = pads
    hw = [_input_size(draw, k, lo, hi) for k, (lo, hi) in zip(k_eff, lo_hi)]
    return dict(
        n=draw(BATCH),
        c=c,
        o=o,
        hw=hw,
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        padding=padding,
        groups=groups,
        bias=draw(st.booleans()),
        layout=draw(LAYOUTS),
        dtype=draw(DTYPES),
        seed=draw(st.integers(0, 2**16)),
    )


@PROFILE
@given(conv_configs())
def test_conv2d_matches_lax(backend, cfg):
    rng = np.random.default_rng(cfg["seed"])
    layout, dtype = cfg["layout"], cfg["dtype"]
    x = to_layout(random_array(rng, (cfg["n"], cfg["c"], *cfg["hw"]), dtype), layout)
    w = w_to_layout(
        random_array(rng, (cfg["o"], cfg["c"] // cfg["groups"], *cfg["kernel"]), dtype), layout
    )
    b = random_array(rng, (cfg["o"],), dtype) if cfg["bias"] else None
    x, w = on(backend, x, w)
    b = None if b is None else on(backend, b)
    kw = dict(stride=cfg["stride"], dilation=cfg["dilation"], groups=cfg["groups"], layout=layout)
    # Strings through lax's own SAME/VALID rule, the other forms spelled out.
    k_eff = [d * (k - 1) + 1 for k, d in zip(cfg["kernel"], cfg["dilation"])]
    ref_padding = explicit_padding(cfg["padding"], cfg["hw"], k_eff, cfg["stride"])
    ours = lambda x, w, *b: conv2d(x, w, *b, padding=cfg["padding"], **kw)
    ref = lambda x, w, *b: ref_conv2d(x, w, *b, padding=ref_padding, **kw)
    assert_same_values_and_vjp(ours, ref, (x, w) + ((b,) if b is not None else ()), rng)


# ---------------------------------------------------------------------------------------------
# conv_transpose2d


@st.composite
def conv_transpose_configs(draw):
    groups = draw(st.integers(1, 3))
    c_in, cout_g = groups * draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel, stride, dilation = draw(pair_of(1, 4)), draw(pair_of(1, 3)), draw(pair_of(1, 2))
    padding, pads = draw(padding_forms(max_pad=2, strings=False))
    out_pad = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    # Output length (h - 1)*s - lo - hi + d*(k - 1) + op + 1 must be >= 1.
    hw = []
    for k, s, d, (lo, hi), op in zip(kernel, stride, dilation, pads, out_pad):
        h_min = 1
        while (h_min - 1) * s - lo - hi + d * (k - 1) + op + 1 < 1:
            h_min += 1
        hw.append(draw(st.integers(h_min, h_min + 4)))
    return dict(
        n=draw(BATCH),
        c_in=c_in,
        cout_g=cout_g,
        hw=hw,
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        padding=padding,
        pads=pads,
        output_padding=out_pad,
        groups=groups,
        bias=draw(st.booleans()),
        layout=draw(LAYOUTS),
        dtype=draw(DTYPES),
        seed=draw(st.integers(0, 2**16)),
    )


@PROFILE
@given(conv_transpose_configs())
def test_conv_transpose2d_matches_reference(backend, cfg):
    rng = np.random.default_rng(cfg["seed"])
    layout, dtype = cfg["layout"], cfg["dtype"]
    x = to_layout(random_array(rng, (cfg["n"], cfg["c_in"], *cfg["hw"]), dtype), layout)
    w = w_to_layout(random_array(rng, (cfg["c_in"], cfg["cout_g"], *cfg["kernel"]), dtype), layout)
    args = (x, w)
    if cfg["bias"]:
        args += (random_array(rng, (cfg["cout_g"] * cfg["groups"],), dtype),)
    args = tuple(on(backend, a) for a in args)
    kw = dict(
        stride=cfg["stride"],
        dilation=cfg["dilation"],
        groups=cfg["groups"],
        output_padding=cfg["output_padding"],
        layout=layout,
    )
    assert_same_values_and_vjp(
        lambda *a: conv_transpose2d(*a, padding=cfg["padding"], **kw),
        lambda *a: ref_conv_transpose2d(*a, padding=cfg["pads"], **kw),
        args,
        rng,
    )


# ---------------------------------------------------------------------------------------------
# max_pool2d (values, indices, gradient) and max_unpool2d


@st.composite
def pool_configs(draw):
    kernel, dilation = draw(pair_of(1, 4)), draw(pair_of(1, 2))
    stride = draw(st.one_of(st.none(), pair_of(1, 3)))
    k_eff = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    kind = draw(st.sampled_from(["int", "nested", "SAME", "VALID"]))
    if kind == "int":
        p = draw(st.integers(0, min(k_eff) // 2))
        padding, pads = p, ((p, p), (p, p))
    elif kind == "nested":
        pads = tuple(tuple(draw(st.integers(0, k // 2)) for _ in range(2)) for k in k_eff)
        padding = pads
    else:
        padding, pads = kind, None
    ceil_mode = draw(st.booleans())
    hw = [
        _input_size(draw, k, *(lh if pads else (0, 0)))
        for k, lh in zip(k_eff, pads or ((0, 0), (0, 0)))
    ]
    # Ties are common in half precision and with small integer grids: draw from a few values.
    values = draw(st.sampled_from(["normal", "ties"]))
    return dict(
        n=draw(BATCH),
        c=draw(st.integers(1, 3)),
        hw=hw,
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        padding=padding,
        ceil_mode=ceil_mode,
        layout=draw(LAYOUTS),
        dtype=draw(DTYPES),
        values=values,
        seed=draw(st.integers(0, 2**16)),
    )


@PROFILE
@given(pool_configs())
def test_max_pool2d_matches_reference(backend, cfg):
    rng = np.random.default_rng(cfg["seed"])
    layout, dtype = cfg["layout"], cfg["dtype"]
    shape = (cfg["n"], cfg["c"], *cfg["hw"])
    if cfg["values"] == "ties":
        x = jnp.asarray(rng.integers(-2, 3, shape), dtype)
    else:
        x = random_array(rng, shape, dtype)
    x = on(backend, to_layout(x, layout))
    stride = cfg["stride"] or cfg["kernel"]
    pads = explicit_padding(
        cfg["padding"],
        cfg["hw"],
        [d * (k - 1) + 1 for k, d in zip(cfg["kernel"], cfg["dilation"])],
        stride,
    )
    kw = dict(
        kernel_size=cfg["kernel"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        ceil_mode=cfg["ceil_mode"],
        layout=layout,
    )
    out_hw = [
        pool_out_size(i, k, s, d, lo, hi, cfg["ceil_mode"])
        for i, k, s, d, (lo, hi) in zip(cfg["hw"], cfg["kernel"], stride, cfg["dilation"], pads)
    ]
    if min(out_hw) < 1:  # e.g. SAME with ceil_mode never gets here; VALID sizes are drawn >= k
        with pytest.raises(ValueError, match="output size"):
            max_pool2d(x, **kw)
        return
    vals, idx = ref_max_pool2d(
        x, cfg["kernel"], stride, pads, cfg["dilation"], cfg["ceil_mode"], layout
    )
    g = on(backend, random_array(rng, vals.shape, dtype))

    @jax.jit
    def run(x, g):
        (y, i), vjp = jax.vjp(lambda x: max_pool2d(x, return_indices=True, **kw), x)
        return y, i, vjp((g, np.zeros(i.shape, jax.dtypes.float0)))[0]

    y, i, dx = run(x, g)
    np.testing.assert_array_equal(np.asarray(i), idx)
    np.testing.assert_array_equal(np.asarray(y, np.float64), vals)
    # Overlapping windows sum several cotangents into one cell (in float32 for the half types,
    # in float64 by the oracle), so this is a sum's tolerance, not an exact selection.
    rtol, atol = tol(dtype)
    np.testing.assert_allclose(
        np.asarray(dx, np.float64), pool_grad_oracle(g, idx, x.shape, layout), rtol=rtol, atol=atol
    )
    # Unpooling puts each pooled value back at its index, zeros elsewhere (where windows overlap,
    # the cell they share receives that same value). max_unpool2d knows no dilation and takes
    # integer padding only.
    if cfg["dilation"] != (1, 1) or isinstance(cfg["padding"], str):
        return
    unpooled = max_unpool2d(
        y,
        i,
        cfg["kernel"],
        cfg["stride"],
        cfg["padding"],
        output_size=tuple(cfg["hw"]),
        layout=layout,
    )
    v_nchw, i_nchw = (np.moveaxis(a, 3, 1) if layout == "NHWC" else a for a in (vals, idx))
    want = np.zeros((cfg["n"], cfg["c"], cfg["hw"][0] * cfg["hw"][1]))
    for n in range(cfg["n"]):
        for c in range(cfg["c"]):
            want[n, c, i_nchw[n, c].ravel()] = v_nchw[n, c].ravel()
    want = to_layout(want.reshape(shape), layout)
    np.testing.assert_array_equal(np.asarray(unpooled, np.float64), np.asarray(want))


# ---------------------------------------------------------------------------------------------
# Validation: conv2d and max_pool2d either raise ValueError at trace time or return the shape
# that an independent statement of validity gives. Parameters are drawn valid and then, most of
# the time, one of them is pushed out of its valid range (zero, negative, too large), so both
# sides of every rule and the output-size corners (ceil_mode's dropped window) are reached.


def _broken(draw, value, options):
    """value, or (with probability ~1/2) one of the invalid options."""
    return draw(st.one_of(st.just(value), st.sampled_from(options)))


@pytest.mark.cpu_only("trace-time validation of abstract shapes: no device is involved")
@CHEAP
@given(st.data())
def test_conv2d_validation_is_exact(backend, data):
    draw = data.draw
    groups = draw(st.integers(1, 3))
    c, o = groups * draw(st.integers(1, 3)), groups * draw(st.integers(0, 2))
    i = c // groups
    kernel, stride, dilation = draw(pair_of(1, 4)), draw(pair_of(1, 3)), draw(pair_of(1, 2))
    pads = (draw(pair_of(0, 2)), draw(pair_of(0, 2)))
    hw = draw(pair_of(1, 7))
    layout = draw(LAYOUTS)
    what = draw(
        st.sampled_from(["none", "groups", "channels", "stride", "dilation", "pads", "kernel"])
    )
    if what == "groups":
        groups = _broken(draw, groups, [0, -1, groups + 1, 4])
    elif what == "channels":
        i = _broken(draw, i, [i + 1, max(i - 1, 1)])
    elif what == "stride":
        stride = (stride[0], _broken(draw, stride[1], [0, -1]))
    elif what == "dilation":
        dilation = (_broken(draw, dilation[0], [0, -2]), dilation[1])
    elif what == "pads":
        pads = ((pads[0][0], _broken(draw, pads[0][1], [-1])), pads[1])
    elif what == "kernel":
        kernel = (kernel[0], _broken(draw, kernel[1], [hw[1] + 2 * pads[1][0] + 3]))
    x = jax.ShapeDtypeStruct(to_layout(np.zeros((1, c, *hw)), layout).shape, jnp.float32)
    w = jax.ShapeDtypeStruct(w_to_layout(np.zeros((o, i, *kernel)), layout).shape, jnp.float32)
    out = [
        (n + lo + hi - d * (k - 1) - 1) // s + 1 if s > 0 else 0
        for n, k, s, d, (lo, hi) in zip(hw, kernel, stride, dilation, pads)
    ]
    valid = (
        groups >= 1
        and c % groups == 0
        and o % groups == 0
        and i * groups == c
        and min(stride) >= 1
        and min(dilation) >= 1
        and min(min(p) for p in pads) >= 0
        and min(out) >= 1
    )
    f = lambda x, w: conv2d(
        x, w, stride=stride, padding=pads, dilation=dilation, groups=groups, layout=layout
    )
    if not valid:
        with pytest.raises(ValueError):
            jax.eval_shape(f, x, w)
        return
    assert jax.eval_shape(f, x, w).shape == to_layout(np.zeros((1, o, *out)), layout).shape


@pytest.mark.cpu_only("trace-time validation of abstract shapes: no device is involved")
@CHEAP
@given(st.data())
def test_max_pool2d_validation_is_exact(backend, data):
    draw = data.draw
    kernel, stride, dilation = draw(pair_of(1, 4)), draw(pair_of(1, 3)), draw(pair_of(1, 2))
    k_eff = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    pads = tuple(tuple(draw(st.integers(0, k // 2)) for _ in range(2)) for k in k_eff)
    hw, ceil_mode, layout = draw(pair_of(1, 6)), draw(st.booleans()), draw(LAYOUTS)
    what = draw(st.sampled_from(["none", "kernel", "stride", "dilation", "pads"]))
    if what == "kernel":
        kernel = (_broken(draw, kernel[0], [0, -1, hw[0] + 2 * pads[0][0] + 1]), kernel[1])
    elif what == "stride":
        stride = (stride[0], _broken(draw, stride[1], [0, -3]))
    elif what == "dilation":
        dilation = (dilation[0], _broken(draw, dilation[1], [0]))
    elif what == "pads":
        pads = (pads[0], (_broken(draw, pads[1][0], [-1, k_eff[1] // 2 + 1]), pads[1][1]))
    x = jax.ShapeDtypeStruct(to_layout(np.zeros((2, 3, *hw)), layout).shape, jnp.float32)
    positive = min(kernel + stride + dilation) >= 1
    k_eff = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    half_ok = all(0 <= p <= k // 2 for k, lh in zip(k_eff, pads) for p in lh)
    out = [
        pool_out_size(n, k, s, d, lo, hi, ceil_mode) if positive else 0
        for n, k, s, d, (lo, hi) in zip(hw, kernel, stride, dilation, pads)
    ]
    f = lambda x: max_pool2d(x, kernel, stride, pads, dilation, ceil_mode, layout=layout)
    if not (positive and half_ok and min(out) >= 1):
        with pytest.raises(ValueError):
            jax.eval_shape(f, x)
        return
    assert jax.eval_shape(f, x).shape == to_layout(np.zeros((2, 3, *out)), layout).shape
