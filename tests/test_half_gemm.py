"""Half-precision convolutions on the CPU's direct (im2col GEMM) path: error bounds against a
float64 reference per direction, and which GEMM runs under which capability.

bfloat16 under the avx512_bf16 capability runs on vdpbf16ps (ffi/cpu/gemm_bf16.cc): bf16 pairs
along the reduction, each product exact in float32, the sum accumulated in float32 (pair order,
denormals flushed); everywhere else half types are widened to float32 and run on the float32
GEMM. Either way the float32 result of a reduction over K terms (the same inputs widened
exactly) is within the recursive-summation bound

    |acc - y| <= (K + s) * u32 * sum |x_i * w_i|,      u32 = 2^-24,

(s: the partial sums of bwd_filter's position splits and K slices, at most a few dozen), and
the one rounding to the storage type adds at most u_T * |y| (u_T = 2^-8 bfloat16, 2^-11
float16). So, stated as max|err| / max|y| for a reduction of K terms:

    max|err| / max|y| <= u_T + (K + 64) * 2^-24 * max(conv(|x|, |w|)) / max|y|

(the second term is about (K + 64) * 2^-24 * sqrt(K) for standard-normal data: 2e-5 at
K = 2304). The tests check the elementwise form of that bound, computing conv(|x|, |w|) in
float64; each runs under the active capability here and under every other one in a child
process (JAXCONV_CPU_CAPABILITY).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv

from child import run_python
from reference import on, ref_conv2d

CAPABILITY_ENV = "JAXCONV_CPU_CAPABILITY"
U_STORAGE = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
U32 = 2.0**-24
SPLIT_SLACK = 64  # partial sums beyond K: K slices, bwd_filter's position splits

# (N, C, O, H, W, kernel, stride, padding): reductions K = C*KH*KW of 27 .. 1152 (past one
# 256-deep K slice, odd K for the pair padding), channel counts off the 16-column panels and the
# 8-row tile, stride 2 (bwd_data phases), 1x1 (NHWC in place).
SHAPES = [
    (2, 3, 17, 9, 11, 3, 1, 1),
    (1, 37, 20, 8, 7, 3, 1, 1),
    (2, 64, 33, 6, 6, 3, 2, 1),
    (1, 128, 24, 5, 5, 3, 1, 1),
    (2, 96, 40, 5, 4, 1, 1, 0),
]


def _ids(s):
    return "n{}c{}o{}_{}x{}_k{}s{}".format(*s[:7])


def _arrays(shape, layout, dtype, seed):
    n, c, o, h, w_, k, _, _ = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w_))
    w = rng.standard_normal((o, c, k, k))
    if layout == "NHWC":
        x, w = x.transpose(0, 2, 3, 1), w.transpose(2, 3, 1, 0)
    # Round to the storage type first: the reference sees exactly the values jaxconv sees.
    x, w = (np.asarray(jnp.asarray(a, dtype).astype(jnp.float64)) for a in (x, w))
    return x, w


def _check_bound(got, ref, ref_abs, k_terms, dtype):
    got = np.asarray(got, np.float64)
    bound = U_STORAGE[dtype] * np.abs(ref) + (k_terms + SPLIT_SLACK) * U32 * ref_abs
    # the storage type's smallest normal: one rounding of a value near zero
    bound += float(jnp.finfo(dtype).tiny)
    excess = np.abs(got - ref) - bound
    assert excess.max() <= 0, (
        f"max |err| {np.abs(got - ref).max():.3g} exceeds the bound at "
        f"{np.unravel_index(excess.argmax(), excess.shape)}"
    )
    return np.abs(got - ref).max() / np.abs(ref).max()


def check_directions(backend, shape, layout, dtype):
    """Forward, bwd_data (input gradient) and bwd_filter (weight gradient) within the bound."""
    n, c, o, h, w_, k, s, p = shape
    x64, w64 = _arrays(shape, layout, dtype, seed=hash((shape, layout)) % 2**32)
    conv = lambda x, w: jaxconv.conv2d(x, w, stride=s, padding=p, layout=layout)
    ref = lambda x, w: ref_conv2d(x, w, stride=(s, s), padding=((p, p), (p, p)), layout=layout)
    x, w = on(backend, jnp.asarray(x64, dtype), jnp.asarray(w64, dtype))
    y = jax.jit(conv)(x, w)
    assert y.dtype == jnp.dtype(dtype)
    y_ref = np.asarray(ref(jnp.asarray(x64), jnp.asarray(w64)))
    y_abs = np.asarray(ref(jnp.abs(jnp.asarray(x64)), jnp.abs(jnp.asarray(w64))))
    _check_bound(y, y_ref, y_abs, c * k * k, dtype)

    # Cotangent: bf16-exact values, so both directions' operands are exact in the storage type.
    r64 = np.asarray(
        jnp.asarray(np.random.default_rng(5).standard_normal(y_ref.shape), dtype).astype(
            jnp.float64
        )
    )
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) * r64.astype(dtype)), (0, 1)))(x, w)
    xa, wa, ra = (jnp.asarray(a) for a in (x64, w64, r64))
    dx_ref, dw_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) * ra), (0, 1))(xa, wa)
    dx_abs, dw_abs = jax.grad(lambda x, w: jnp.sum(ref(x, w) * jnp.abs(ra)), (0, 1))(
        jnp.abs(xa), jnp.abs(wa)
    )
    oh, ow = y_ref.shape[1:3] if layout == "NHWC" else y_ref.shape[2:]
    _check_bound(dx, np.asarray(dx_ref), np.asarray(dx_abs), o * k * k, dtype)
    _check_bound(dw, np.asarray(dw_ref), np.asarray(dw_abs), n * oh * ow, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_half_directions_within_bound(backend, monkeypatch, shape, layout, dtype):
    monkeypatch.setenv("JAXCONV_CPU_CONV_ALGO", "direct")  # the GEMM path, not Winograd
    check_directions(backend, shape, layout, dtype)


def test_bf16_exact_on_small_integers(backend, monkeypatch):
    """Small integers: every product and partial sum is exact in float32 and the result is
    exact in bfloat16 (|y| < 256), so any pair or panel mix-up in the packing shows as a wrong
    value, not as rounding."""
    monkeypatch.setenv("JAXCONV_CPU_CONV_ALGO", "direct")
    rng = np.random.default_rng(11)
    for layout in ("NCHW", "NHWC"):
        x = rng.integers(-2, 3, (2, 7, 6, 5)).astype(np.float64)
        w = rng.integers(-1, 2, (19, 7, 3, 3)).astype(np.float64)
        if layout == "NHWC":
            x, w = x.transpose(0, 2, 3, 1), w.transpose(2, 3, 1, 0)
        y = jaxconv.conv2d(
            *on(backend, jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)),
            padding=1,
            layout=layout,
        )
        y_ref = ref_conv2d(jnp.asarray(x), jnp.asarray(w), padding=((1, 1), (1, 1)), layout=layout)
        np.testing.assert_array_equal(np.asarray(y, np.float64), np.asarray(y_ref))


# ---------------------------------------------------------------------------------------------
# Dispatch: which GEMM runs under which capability.


def test_gemm_kernel_per_capability():
    caps = jaxconv._ffi.cpu_capabilities()
    kinds = jaxconv._ffi.cpu_gemm_kernels()
    assert kinds["float32"] == "float32" and kinds["float64"] == "float64"
    assert kinds["float16"] == "float32"
    want = "vdpbf16ps" if jaxconv._ffi.cpu_capability() == "avx512_bf16" else "float32"
    assert kinds["bfloat16"] == want
    if not os.environ.get(CAPABILITY_ENV):
        assert ("avx512_bf16" in caps) == (kinds["bfloat16"] == "vdpbf16ps")


_CHILD = (
    "import os, jax; jax.config.update('jax_enable_x64', True);"
    "import pytest, jaxconv, test_half_gemm as t;"
    "cap = os.environ['JAXCONV_CPU_CAPABILITY'];"
    "assert jaxconv._ffi.cpu_capability() == cap;"
    "k = jaxconv._ffi.cpu_gemm_kernels()['bfloat16'];"
    "assert k == ('vdpbf16ps' if cap == 'avx512_bf16' else 'float32'), (cap, k);"
    "os.environ['JAXCONV_CPU_CONV_ALGO'] = 'direct';"
    "[t.check_directions('cpu', t.SHAPES[i], lay, d) for i in (0, 2, 3) "
    "for lay in ('NCHW', 'NHWC') for d in ('bfloat16', 'float16')];"
    "print('ok')"
)


def _other_capabilities():
    active = jaxconv._ffi.cpu_capability()
    return [c for c in jaxconv._ffi.cpu_capabilities() if c != active]


@pytest.mark.cpu_only("the capabilities are instruction sets of the CPU kernels")
@pytest.mark.parametrize("capability", _other_capabilities())
def test_bounds_and_dispatch_under_every_capability(backend, capability):
    proc = run_python("-c", _CHILD, env={CAPABILITY_ENV: capability, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
