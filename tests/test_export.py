"""jax.export of code that calls jaxconv: export, serialize, deserialize, run, same results.

jaxconv's kernels are custom calls without JAX's compatibility guarantee, so export needs
`disabled_checks=jaxconv.export_safety_checks()`, and the process that runs the artifact must
`import jaxconv` (importing registers the targets). Sharded export is in test_sharding.py.
"""

from __future__ import annotations

import textwrap
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxconv

from child import run_python
from reference import (
    assert_close,
    lowering_platform,
    on,
    random_array,
    ref_conv2d,
    ref_conv_transpose2d,
    ref_max_pool2d_lax,
)

LAYOUTS = ["NCHW", "NHWC"]


def network(conv, convt, pool, layout):
    """conv(+bias) -> relu -> max-pool -> transposed conv: every kernel in one function."""

    def f(x, w, b, w_t):
        h = jax.nn.relu(conv(x, w, b, padding=((1, 1), (1, 1)), layout=layout))
        return convt(pool(h, layout=layout), w_t, stride=(2, 2), layout=layout)

    return f


def _ref_pool(x, layout):
    return ref_max_pool2d_lax(x, (2, 2), (2, 2), ((0, 0), (0, 0)), layout=layout)


def operands(backend, layout, dtype, n=2):
    rng = np.random.default_rng(0)
    x = random_array(rng, (n, 3, 8, 8), dtype)
    w = random_array(rng, (4, 3, 3, 3), dtype)
    b = random_array(rng, (4,), dtype)
    w_t = random_array(rng, (4, 2, 2, 2), dtype)
    if layout == "NHWC":
        x = jnp.transpose(x, (0, 2, 3, 1))
        w, w_t = (jnp.transpose(a, (2, 3, 1, 0)) for a in (w, w_t))
    return on(backend, x, w, b, w_t)


def ours(layout):
    return network(
        jaxconv.conv2d, jaxconv.conv_transpose2d, partial(jaxconv.max_pool2d, kernel_size=2), layout
    )


def ref(layout):
    return network(ref_conv2d, ref_conv_transpose2d, _ref_pool, layout)


def exporter(fn, backend):
    """export.export for `backend`'s platform (by default export targets the default backend,
    which is the gpu wherever one is visible)."""
    return export.export(
        jax.jit(fn),
        platforms=[lowering_platform(backend)],
        disabled_checks=jaxconv.export_safety_checks(),
    )


def specs(*args):
    """Shapes and dtypes only: exporting from arrays placed with device_put (committed) makes
    serialize(vjp_order=1) fail inside jax 0.10 ("empty NamedSharding")."""
    return [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]


def roundtrip(fn, backend, *args, **serialize_kw):
    exp = exporter(fn, backend)(*specs(*args))
    return export.deserialize(exp.serialize(**serialize_kw))


@pytest.mark.parametrize("layout, dtype", [("NCHW", jnp.float32), ("NHWC", jnp.float64)])
def test_export_serialize_deserialize_run(backend, layout, dtype):
    args = operands(backend, layout, dtype)
    restored = roundtrip(ours(layout), backend, *args)
    got = restored.call(*args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(ours(layout))(*args)))
    assert_close(got, jax.jit(ref(layout))(*args))
    # The artifact holds the kernels themselves, one custom call each.
    module = restored.mlir_module()
    for target in ("conv2d_fwd", "max_pool2d_fwd_values", "conv2d_bwd_data"):
        assert module.count(f"stablehlo.custom_call @jaxconv_{target}(") == 1, target


def test_export_without_safety_checks_names_our_target(backend):
    """What a user sees without export_safety_checks() (quoted in the README)."""
    args = operands(backend, "NCHW", jnp.float32)
    with pytest.raises(
        ValueError,
        match="Cannot serialize code with custom calls whose targets "
        "have no compatibility guarantees",
    ) as info:
        export.export(jax.jit(ours("NCHW")), platforms=[lowering_platform(backend)])(*args)
    assert "jaxconv_conv2d_fwd" in str(info.value)


def test_export_of_a_training_gradient(backend):
    """jit(grad) exports too: the artifact holds the backward kernels."""
    layout = "NHWC"
    args = operands(backend, layout, jnp.float64)
    loss = lambda f: lambda *a: jnp.sum(jnp.tanh(f(*a)))
    grads = lambda f: jax.grad(loss(f), argnums=(0, 1, 2, 3))
    restored = roundtrip(grads(ours(layout)), backend, *args)
    for g, r in zip(restored.call(*args), jax.jit(grads(ref(layout)))(*args)):
        assert_close(g, r)
    module = restored.mlir_module()
    for target in ("conv2d_bwd_filter", "max_pool2d_bwd"):
        assert f"@jaxconv_{target}(" in module, target


def test_deserialized_function_is_differentiable(backend):
    """serialize(vjp_order=1) carries the VJP: grad of the restored function equals ours."""
    layout = "NCHW"
    args = operands(backend, layout, jnp.float64)
    restored = roundtrip(ours(layout), backend, *args, vjp_order=1)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    got = jax.jit(jax.grad(loss(restored.call), argnums=(0, 1, 2, 3)))(*args)
    want = jax.jit(jax.grad(loss(ref(layout)), argnums=(0, 1, 2, 3)))(*args)
    for g, r in zip(got, want):
        assert_close(g, r)


def test_export_with_symbolic_batch_size(backend):
    """Shape polymorphism over N: the geometry never depends on N, so one artifact serves
    every batch size (H, W and channels stay fixed)."""
    layout = "NCHW"
    x, w, b, w_t = operands(backend, layout, jnp.float32)
    (n,) = export.symbolic_shape("n")
    exp = exporter(ours(layout), backend)(
        jax.ShapeDtypeStruct((n,) + x.shape[1:], x.dtype), *specs(w, b, w_t)
    )
    restored = export.deserialize(exp.serialize())
    for batch in (1, 5):
        args = operands(backend, layout, jnp.float32, n=batch)
        assert_close(restored.call(*args), jax.jit(ref(layout))(*args))


@pytest.mark.slow("a fresh Python process imports jax and jaxconv and runs the artifact")
def test_artifact_runs_in_a_fresh_process_after_import_jaxconv(backend, tmp_path):
    """A new process can deserialize the artifact, but running it needs `import jaxconv`
    first: before, XLA knows no jaxconv_* target."""
    args = operands(backend, "NCHW", jnp.float32)
    exp = exporter(ours("NCHW"), backend)(*specs(*args))
    (tmp_path / "net.bin").write_bytes(exp.serialize())
    np.savez(
        tmp_path / "io.npz",
        *[np.asarray(a) for a in args],
        want=np.asarray(jax.jit(ours("NCHW"))(*args)),
    )
    script = textwrap.dedent("""
        import sys
        import numpy as np
        from jax import export
        data = np.load("io.npz")
        args = [data[f"arr_{i}"] for i in range(4)]
        restored = export.deserialize(open("net.bin", "rb").read())
        try:
            restored.call(*args)
            print("ran without jaxconv")
        except Exception as err:  # XLA: no registered implementation for the custom call
            print("before import:", type(err).__name__, str(err).splitlines()[0])
        import jaxconv  # registers the targets
        got = restored.call(*args)
        np.testing.assert_array_equal(np.asarray(got), data["want"])
        print("after import: ok")
    """)
    proc = run_python("-c", script, cwd=tmp_path, env={"JAX_PLATFORMS": lowering_platform(backend)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("before import:") and "jaxconv_" in lines[0], lines
    assert lines[-1] == "after import: ok", lines
