"""Bad arguments fail at trace time with ValueError / TypeError messages that name the argument
and the offending values, before any kernel runs (so also under jit, on abstract values)."""

import importlib.machinery
import re
import shutil
import site
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import conv2d, conv_transpose2d, max_pool2d, max_unpool2d

from child import run_python
from reference import on

F32 = jnp.float32
X = jax.ShapeDtypeStruct((2, 4, 5, 5), F32)  # NCHW activations
W = jax.ShapeDtypeStruct((6, 4, 3, 3), F32)  # OIHW weights
X_NHWC = jax.ShapeDtypeStruct((2, 5, 5, 4), F32)
W_HWIO = jax.ShapeDtypeStruct((3, 3, 4, 6), F32)
WT = jax.ShapeDtypeStruct((4, 2, 3, 3), F32)  # transposed: (C_in, C_out/groups, KH, KW)
IDX = jax.ShapeDtypeStruct((2, 4, 5, 5), jnp.int32)


def sds(shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


def conv(x=X, w=W, b=None, **kw):
    return lambda: jax.eval_shape(lambda x, w, b: conv2d(x, w, b, **kw), x, w, b)


def tconv(x=X, w=WT, b=None, **kw):
    return lambda: jax.eval_shape(lambda x, w, b: conv_transpose2d(x, w, b, **kw), x, w, b)


def pool(x=X, kernel_size=2, **kw):
    return lambda: jax.eval_shape(lambda x: max_pool2d(x, kernel_size, **kw), x)


def unpool(x=X, idx=IDX, kernel_size=2, **kw):
    return lambda: jax.eval_shape(lambda x, i: max_unpool2d(x, i, kernel_size, **kw), x, idx)


# (call, exception type, regex the message must match)
CASES = {
    # rank and layout
    # 3-d x is PyTorch's unbatched form (tests/test_unbatched.py); 2-d and 5-d are errors
    "conv_x_rank2": (
        conv(x=sds((5, 5))),
        ValueError,
        r"x must be a 4-d array \(N, C, H, W\) or 3-d \(C, H, W\), got shape \(5, 5\)",
    ),
    "conv_x_rank5": (
        conv(x=sds((1, 2, 4, 5, 5))),
        ValueError,
        r"x must be a 4-d array .*\(1, 2, 4, 5, 5\)",
    ),
    "conv_w_rank5": (conv(w=sds((6, 4, 3, 3, 1))), ValueError, r"w must be a 4-d array"),
    "conv_layout": (
        conv(layout="NHCW"),
        ValueError,
        r"layout must be 'NCHW' or 'NHWC', got 'NHCW'",
    ),
    "conv_layout_int": (conv(layout=0), ValueError, r"layout .* got 0"),
    # channels and groups
    "conv_channels": (
        conv(w=sds((6, 3, 3, 3))),
        ValueError,
        r"w has 3 input channels per group but x has C=4",
    ),
    "conv_channels_nhwc": (
        conv(x=X_NHWC, w=sds((3, 3, 5, 6)), layout="NHWC"),
        ValueError,
        r"w has 5 input channels .* C=4 .*NHWC",
    ),
    "conv_groups_c": (
        conv(w=sds((6, 1, 3, 3)), groups=3),
        ValueError,
        r"groups=3 must divide the input channels C=4",
    ),
    "conv_groups_o": (
        conv(w=sds((5, 2, 3, 3)), groups=2),
        ValueError,
        r"groups=2 must divide the output channels O=5",
    ),
    "conv_groups_0": (conv(groups=0), ValueError, r"groups must be >= 1, got 0"),
    "conv_groups_float": (conv(groups=1.0), TypeError, r"groups must be an int, got 1.0"),
    "conv_groups_bool": (conv(groups=True), TypeError, r"groups must be an int, got True"),
    # bias
    "conv_bias_len": (conv(b=sds((5,))), ValueError, r"bias must have shape \(6,\), got \(5,\)"),
    "conv_bias_rank": (
        conv(b=sds((6, 1))),
        ValueError,
        r"bias must have shape \(6,\), got \(6, 1\)",
    ),
    "conv_bias_dtype": (
        conv(b=sds((6,), jnp.float16)),
        TypeError,
        r"bias must have the dtype of x \(float32\), got float16",
    ),
    "conv_bias_int": (
        conv(b=sds((6,), jnp.int32)),
        TypeError,
        r"bias must have dtype .* got int32",
    ),
    # stride / dilation / padding
    "conv_stride_0": (conv(stride=0), ValueError, r"stride must be >= 1, got 0"),
    "conv_stride_neg": (conv(stride=(1, -2)), ValueError, r"stride must be >= 1, got \(1, -2\)"),
    "conv_stride_float": (conv(stride=1.5), TypeError, r"stride must be an int or a pair .* 1.5"),
    "conv_stride_bool": (conv(stride=(1, True)), TypeError, r"stride must be .* True"),
    "conv_stride_triple": (conv(stride=(1, 1, 1)), ValueError, r"stride must be .*\(1, 1, 1\)"),
    "conv_stride_huge": (conv(stride=2**40), ValueError, r"stride must fit in int32"),
    "conv_dilation_0": (conv(dilation=(0, 1)), ValueError, r"dilation must be >= 1, got \(0, 1\)"),
    "conv_padding_neg": (conv(padding=-1), ValueError, r"padding must be >= 0, got -1"),
    "conv_padding_neg_nested": (
        conv(padding=((0, -1), (0, 0))),
        ValueError,
        r"padding must be >= 0, got \(\(0, -1\), \(0, 0\)\)",
    ),
    "conv_padding_string": (
        conv(padding="FULL"),
        ValueError,
        r"padding string must be 'SAME' or 'VALID', got 'FULL'",
    ),
    "conv_padding_mixed": (
        conv(padding=((1, 1), 2)),
        TypeError,
        r"padding must be an int, \(ph, pw\).* got \(\(1, 1\), 2\)",
    ),
    "conv_padding_none": (conv(padding=None), TypeError, r"padding must be .* got None"),
    "conv_out_size": (
        conv(w=sds((6, 4, 6, 6))),
        ValueError,
        r"output size would be \(0, 0\) for input \(5, 5\), kernel \(6, 6\)",
    ),
    "conv_out_size_dilated": (conv(dilation=3), ValueError, r"output size would be \(-1, -1\)"),
    "conv_empty_kernel": (
        conv(w=sds((6, 4, 0, 3))),
        ValueError,
        r"non-empty kernel.*\(6, 4, 0, 3\)",
    ),
    "conv_empty_spatial": (conv(x=sds((2, 4, 0, 5))), ValueError, r"non-empty .*\(2, 4, 0, 5\)"),
    # dtypes
    "conv_int": (
        conv(x=sds((2, 4, 5, 5), jnp.int32), w=sds((6, 4, 3, 3), jnp.int32)),
        TypeError,
        r"x must have dtype float32, float64, float16 or bfloat16, got int32",
    ),
    "conv_complex": (
        conv(x=sds((2, 4, 5, 5), jnp.complex64), w=sds((6, 4, 3, 3), jnp.complex64)),
        TypeError,
        r"x must have dtype .* got complex64",
    ),
    "conv_bool": (
        conv(x=sds((2, 4, 5, 5), jnp.bool_)),
        TypeError,
        r"x must have dtype .* got bool",
    ),
    "conv_w_int": (
        conv(w=sds((6, 4, 3, 3), jnp.int8)),
        TypeError,
        r"w must have dtype .* got int8",
    ),
    "conv_mixed": (
        conv(w=sds((6, 4, 3, 3), jnp.bfloat16)),
        TypeError,
        r"x and w must have the same dtype, got x: float32 and w: bfloat16",
    ),
    # transposed convolution
    "tconv_cin": (tconv(w=sds((3, 2, 3, 3))), ValueError, r"w must have C_in=4 as its first dim"),
    "tconv_cin_nhwc": (
        tconv(x=X_NHWC, w=sds((3, 3, 2, 3)), layout="NHWC"),
        ValueError,
        r"w must have C_in=4 as its last dim",
    ),
    "tconv_groups": (
        tconv(groups=3),
        ValueError,
        r"groups=3 must divide the input channels C_in=4",
    ),
    "tconv_output_padding": (
        tconv(output_padding=1),
        ValueError,
        r"output_padding must be smaller than stride or dilation",
    ),
    "tconv_output_padding_neg": (
        tconv(stride=2, output_padding=-1),
        ValueError,
        r"output_padding must be >= 0, got -1",
    ),
    "tconv_padding_string": (
        tconv(padding="SAME"),
        ValueError,
        r"padding must be an int or a pair of ints here, got 'SAME'",
    ),
    "tconv_out_size": (tconv(padding=4), ValueError, r"output size would be \(-1, -1\)"),
    "tconv_bias_len": (tconv(b=sds((4,))), ValueError, r"bias must have shape \(2,\), got \(4,\)"),
    "tconv_empty_out": (tconv(w=sds((4, 0, 3, 3))), ValueError, r"non-empty dims"),
    "tconv_mixed": (tconv(w=sds((4, 2, 3, 3), jnp.float64)), TypeError, r"same dtype"),
    # max pooling
    "pool_rank": (pool(x=sds((5, 5))), ValueError, r"x must be a 4-d array .* or 3-d"),
    "pool_kernel_0": (pool(kernel_size=0), ValueError, r"kernel_size must be >= 1, got 0"),
    "pool_kernel_none": (pool(kernel_size=None), TypeError, r"kernel_size must be .* None"),
    "pool_stride_0": (pool(stride=0), ValueError, r"stride must be >= 1, got 0"),
    "pool_dilation_0": (pool(dilation=0), ValueError, r"dilation must be >= 1, got 0"),
    "pool_padding_neg": (pool(padding=-1), ValueError, r"padding must be >= 0"),
    "pool_padding_half": (
        pool(kernel_size=3, padding=2),
        ValueError,
        r"padding must be at most half the effective kernel size, got "
        r"padding=2 with kernel_size=3",
    ),
    "pool_padding_half_asym": (
        pool(kernel_size=(3, 4), padding=((1, 1), (0, 3))),
        ValueError,
        r"at most half the effective kernel",
    ),
    "pool_padding_string": (pool(padding="foo"), ValueError, r"'SAME' or 'VALID', got 'foo'"),
    "pool_out_size": (pool(kernel_size=6), ValueError, r"output size would be \(0, 0\)"),
    "pool_int": (pool(x=sds((2, 4, 5, 5), jnp.int32)), TypeError, r"x must have dtype .* int32"),
    "pool_bool": (pool(x=sds((2, 4, 5, 5), jnp.bool_)), TypeError, r"x must have dtype .* bool"),
    "pool_ceil_mode": (pool(ceil_mode="yes"), TypeError, r"ceil_mode must be a bool, got 'yes'"),
    "pool_ceil_mode_2": (pool(ceil_mode=2), TypeError, r"ceil_mode must be a bool, got 2"),
    "pool_return_indices": (
        pool(return_indices=None),
        TypeError,
        r"return_indices must be a bool, got None",
    ),
    "pool_layout": (pool(layout="CHW"), ValueError, r"layout must be .* got 'CHW'"),
    "pool_plane_int32": (
        pool(x=sds((1, 1, 50000, 50000))),
        ValueError,
        r"50000x50000 plane: int32 indices",
    ),
    # max unpooling
    "unpool_idx_float": (
        unpool(idx=sds((2, 4, 5, 5))),
        TypeError,
        r"indices must be int32 or int64, got float32",
    ),
    "unpool_idx_uint": (
        unpool(idx=sds((2, 4, 5, 5), jnp.uint32)),
        TypeError,
        r"indices must be int32 or int64, got uint32",
    ),
    "unpool_idx_int16": (unpool(idx=sds((2, 4, 5, 5), jnp.int16)), TypeError, r"got int16"),
    "unpool_idx_shape": (
        unpool(idx=sds((2, 4, 5, 4), jnp.int32)),
        ValueError,
        r"indices must have the shape of x \(2, 4, 5, 5\), got \(2, 4, 5, 4\)",
    ),
    "unpool_x_int": (unpool(x=sds((2, 4, 5, 5), jnp.int32)), TypeError, r"x must have dtype"),
    "unpool_kernel_0": (unpool(kernel_size=0), ValueError, r"kernel_size must be >= 1"),
    "unpool_padding_neg": (unpool(padding=-1), ValueError, r"padding must be >= 0"),
    "unpool_output_size_int": (
        unpool(output_size=10),
        TypeError,
        r"output_size must be \(H, W\) or a 4-d shape, got 10",
    ),
    "unpool_output_size_len3": (
        unpool(output_size=(2, 10, 10)),
        ValueError,
        r"output_size must be \(H, W\) or a 4-d shape",
    ),
    "unpool_output_size_far": (
        unpool(output_size=(20, 20)),
        ValueError,
        r"output_size \(20, 20\) must be within stride \(2, 2\) of the "
        r"default size \(10, 10\)",
    ),
    "unpool_output_size_float": (
        unpool(output_size=(10.0, 10)),
        TypeError,
        r"output_size must be an int",
    ),
}


@pytest.mark.cpu_only("trace-time validation of abstract values: no device is involved")
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_argument(backend, name):
    call, exc, pattern = CASES[name]
    with pytest.raises(exc) as info:
        call()
    assert re.search(pattern, str(info.value)), str(info.value)


@pytest.mark.cpu_only("trace-time validation of abstract values: no device is involved")
def test_errors_raise_at_trace_time_under_jit(backend):
    """Validation runs on abstract shapes: nothing is compiled or executed before it fails."""
    f = jax.jit(lambda x, w: conv2d(x, w, stride=0))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        f.trace(X, W)
    g = jax.jit(lambda x: max_pool2d(x, 3, padding=2))
    with pytest.raises(ValueError, match="at most half"):
        g.trace(X)


@pytest.mark.cpu_only("trace-time validation of abstract values: no device is involved")
def test_python_list_input_is_named(backend):
    with pytest.raises(TypeError, match="x must be an array, got list"):
        conv2d(np.ones((1, 1, 3, 3)).tolist(), jnp.ones((1, 1, 1, 1)))


def test_accepted_spellings(backend):
    """The forms the errors above reject have accepted neighbours that give the same geometry."""
    x = on(backend, jnp.arange(2 * 4 * 5 * 5, dtype=F32).reshape(2, 4, 5, 5))
    a = max_pool2d(x, 2, ceil_mode=np.bool_(True))
    b = max_pool2d(x, (2, 2), stride=[2, 2], ceil_mode=1)
    np.testing.assert_array_equal(a, b)
    w = on(backend, jnp.ones((6, 4, 3, 3), F32))
    y1 = conv2d(x, w, stride=np.int64(2), padding="same", layout="nchw")
    y2 = conv2d(x, w, stride=(2, 2), padding=((1, 1), (1, 1)))
    np.testing.assert_array_equal(y1, y2)


# ---------------------------------------------------------------------------------------------
# max_unpool2d indices out of range: not knowable at trace time. They are dropped (the value goes
# nowhere), the same in eager mode and under jit; a negative index is dropped too (it would
# otherwise wrap around), as is an int64 index past int32 (2**32 + 7 would wrap to 7 in a cast).


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_unpool_out_of_range_indices_are_dropped(backend, jit, layout):
    n, c, h, w = 1, 2, 2, 2
    vals = jnp.arange(1, n * c * h * w + 1, dtype=F32).reshape(n, c, h, w)
    plane = 4 * 4  # kernel 2, stride 2 -> a 4x4 output plane
    idx = np.array([[[[0, plane], [-1, 5]], [[2**32 + 7, 15], [-plane, 3]]]], np.int64)
    want = np.zeros((n, c, plane), np.float32)
    for ci in range(c):
        for v, i in zip(np.asarray(vals)[0, ci].ravel(), idx[0, ci].ravel()):
            if 0 <= i < plane:
                want[0, ci, i] = v
    want = want.reshape(n, c, 4, 4)
    if layout == "NHWC":
        vals, idx, want = (np.moveaxis(np.asarray(a), 1, 3) for a in (vals, idx, want))
    f = lambda v, i: max_unpool2d(v, i, 2, layout=layout)
    got = (jax.jit(f) if jit else f)(*on(backend, jnp.asarray(vals), jnp.asarray(idx)))
    np.testing.assert_array_equal(np.asarray(got), want)


def _import_copied_checkout(tmp_path, extension_bytes=None):
    """Imports a copy of jaxconv's Python files in a fresh interpreter, with no compiled CPU
    extension or with `extension_bytes` in its place; returns the child's last stderr line."""
    shutil.copytree(
        Path(jaxconv.__file__).parent,
        tmp_path / "jaxconv",
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    if extension_bytes is not None:
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        (tmp_path / "jaxconv" / f"_jaxconv_cpu{suffix}").write_bytes(extension_bytes)
    # -S: no site hooks, so neither an installed jaxconv nor an editable install's import
    # redirect can step in; jax itself is still found on the plain site-packages paths.
    code = (
        f"import sys; sys.path[:0] = [{str(tmp_path)!r}]; "
        f"sys.path += {site.getsitepackages()!r}; import jaxconv"
    )
    proc = run_python("-S", "-c", code, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.cpu_only("imports a copied checkout in a child process; no device is involved")
def test_unbuilt_source_checkout_says_how_to_install(backend, tmp_path):
    """A source checkout without its compiled extension (what `python -m` finds first when run
    from the repository root after a plain `pip install .`) fails to import with an ImportError
    that says how to install, not with a riddle about a circular import."""
    last = _import_copied_checkout(tmp_path)
    assert last.startswith(
        "ImportError: jaxconv's compiled CPU extension (_jaxconv_cpu) is "
        f"missing from {tmp_path / 'jaxconv'}"
    ), last
    assert "pip install -e ." in last


@pytest.mark.cpu_only("imports a copied checkout in a child process; no device is involved")
def test_extension_that_does_not_load_keeps_its_own_error(backend, tmp_path):
    """An extension file that is there but cannot be loaded is not blamed on the checkout:
    the loader's own message comes through."""
    last = _import_copied_checkout(tmp_path, extension_bytes=b"not a shared object")
    assert last.startswith("ImportError: "), last
    assert "missing from" not in last and "_jaxconv_cpu" in last, last
