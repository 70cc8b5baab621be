"""The FFI attribute contract as the C++ decoder (ffi/ffi_common.h) reads it: the target names
registrations() returns, and the conv targets' `allow_tf32` attribute (optional, 0 or 1; the CPU
ignores it, the CUDA kernels may use TF32 tensor cores for float32 when it is 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxconv  # noqa: F401  (registers the FFI targets)
from jaxconv import _jaxconv_cpu

CONV = dict(
    stride_h=1,
    stride_w=2,
    dilation_h=1,
    dilation_w=1,
    pad_top=1,
    pad_bottom=0,
    pad_left=0,
    pad_right=1,
    groups=1,
    layout=0,
)
TARGETS = {
    "jaxconv_conv2d_fwd",
    "jaxconv_conv2d_bwd_data",
    "jaxconv_conv2d_bwd_filter",
    "jaxconv_max_pool2d_fwd",
    "jaxconv_max_pool2d_fwd_values",
    "jaxconv_max_pool2d_bwd",
}


def test_registrations_name_every_target():
    assert set(_jaxconv_cpu.registrations()) == TARGETS


def _raw_fwd(backend, x, w, **attrs):
    """A raw call of the forward conv target (NCHW, no bias) on `backend`."""
    dev = jax.devices(backend)[0]
    x, w = jax.device_put(x, dev), jax.device_put(w, dev)
    bias = jax.device_put(jnp.zeros((0,), x.dtype), dev)
    y = jax.eval_shape(lambda a, b: _oracle(a, b), x, w)
    return jax.ffi.ffi_call("jaxconv_conv2d_fwd", y)(
        x, w, bias, **{k: np.int64(v) if isinstance(v, int) else v for k, v in attrs.items()}
    )


def _oracle(x, w):
    return lax.conv_general_dilated(
        x,
        w,
        (CONV["stride_h"], CONV["stride_w"]),
        ((CONV["pad_top"], CONV["pad_bottom"]), (CONV["pad_left"], CONV["pad_right"])),
        precision=lax.Precision.HIGHEST,
    )


def _operands():
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((2, 3, 7, 6), np.float32),
        rng.standard_normal((4, 3, 3, 2), np.float32),
    )


@pytest.mark.parametrize("allow_tf32", [None, 0, 1])
def test_allow_tf32_is_accepted(backend, allow_tf32):
    x, w = _operands()
    attrs = dict(CONV) if allow_tf32 is None else dict(CONV, allow_tf32=allow_tf32)
    y = _raw_fwd(backend, x, w, **attrs)
    # TF32 keeps 10 mantissa bits: with allow_tf32=1 a GPU may round each product's operands.
    tol = 2e-2 if (allow_tf32 == 1 and backend == "gpu") else 1e-5
    np.testing.assert_allclose(np.asarray(y), np.asarray(_oracle(x, w)), rtol=tol, atol=tol)


def test_cpu_ignores_allow_tf32():
    x, w = _operands()
    full = _raw_fwd("cpu", x, w, **dict(CONV, allow_tf32=0))
    tf32 = _raw_fwd("cpu", x, w, **dict(CONV, allow_tf32=1))
    np.testing.assert_array_equal(np.asarray(full), np.asarray(tf32))


def test_allow_tf32_out_of_range_is_rejected(backend):
    x, w = _operands()
    with pytest.raises(Exception, match=r"jaxconv_conv2d_fwd: allow_tf32 must be 0 or 1"):
        jax.block_until_ready(_raw_fwd(backend, x, w, **dict(CONV, allow_tf32=2)))


def test_allow_tf32_of_another_type_is_rejected(backend):
    x, w = _operands()
    jax.clear_caches()  # a cached executable would not decode the attributes again
    with pytest.raises(
        Exception,
        match=r"jaxconv_conv2d_fwd: missing int64 attribute "
        r"'allow_tf32' \(absent or of another type\)",
    ):
        jax.block_until_ready(_raw_fwd(backend, x, w, **dict(CONV, allow_tf32=np.int32(1))))
