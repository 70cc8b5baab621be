"""What jaxconv needs from the installed jax, checked on every supported version.

CI runs the whole suite on the newest supported jax and this file alone on the oldest (see
.ci/run), so it is also the smoke test there: it needs nothing beyond jax, numpy and pytest.

1. The private hooks: jaxconv reaches into two non-public corners of JAX (the registry of
   primitives that need devices while lowering, and the lowering parameters that say whether
   jax.export is lowering). Without them jaxconv still computes the right values, but XLA would
   silently gather sharded operands onto every device (or export would fail), so a jax that
   drops or renames them must fail here, loudly, instead.
2. The smoke run: build and import, one conv and one pool under jit and grad, vmap, and
   sharding over 8 host devices (in a child process, since the device count is fixed when jax
   starts) with the batch kept split.
"""

from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import _sharding

from child import run_python
from reference import assert_close, on, random_array, ref_conv2d, ref_max_pool2d_lax

N_TARGETS = 6  # conv2d fwd / bwd_data / bwd_filter, max_pool2d fwd / fwd_values / bwd


def jax_version() -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", jax.__version__)[:3])


# ----------------------------------------------------------------------------------------------
# 1. Private hooks.


def test_every_primitive_is_in_jax_registry_of_primitives_lowered_with_devices():
    from jax._src import dispatch  # the hook itself: an ImportError here is the loud failure

    registry = dispatch.prim_requires_devices_during_lowering
    assert isinstance(registry, set)
    names = {p.name for p in _sharding.PARTITIONED}
    assert len(names) == N_TARGETS, names
    assert all(name.startswith("jaxconv_") for name in names), names
    assert all(p in registry for p in _sharding.PARTITIONED)


def test_lowering_parameters_still_tell_export_apart():
    """for_export reads ctx.module_context.lowering_parameters.for_export: exported code must
    hold the plain FFI calls (custom_partitioning cannot be serialized)."""
    from jax import export
    from jax._src.interpreters import mlir as mlir_internal

    assert "for_export" in {
        f.name for f in __import__("dataclasses").fields(mlir_internal.LoweringParameters)
    }
    x = jax.ShapeDtypeStruct((2, 3, 8, 8), jnp.float32)
    w = jax.ShapeDtypeStruct((4, 3, 3, 3), jnp.float32)
    exp = export.export(jax.jit(jaxconv.conv2d), disabled_checks=jaxconv.export_safety_checks())(
        x, w
    )
    text = exp.mlir_module()
    assert "jaxconv_conv2d_fwd" in text and "CustomSPMDPartitioning" not in text, text


def test_varying_axes_are_read_inside_shard_map():
    """varying_axes reads the manual axes from the aval's `mat` (jax >= 0.10) or `vma`
    attribute; if a jax renames both, shard_map gradients of replicated weights would silently
    stay per shard."""
    if not hasattr(jax, "shard_map"):
        pytest.skip(f"jax {jax.__version__} has no jax.shard_map")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))  # Auto axes
    seen = []

    def body(x):
        seen.append(_sharding.varying_axes(x))
        return x

    jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=jax.sharding.PartitionSpec("d"),
            out_specs=jax.sharding.PartitionSpec("d"),
        )
    )(jnp.ones((2, 3)))
    assert seen == [frozenset({"d"})]


# ----------------------------------------------------------------------------------------------
# 2. Smoke run on one device.


def test_conv_and_pool_under_jit_and_grad(backend):
    rng = np.random.default_rng(0)
    x, w = on(
        backend,
        random_array(rng, (2, 3, 9, 9), jnp.float32),
        random_array(rng, (4, 3, 3, 3), jnp.float32),
    )

    def loss(conv, pool, x, w):
        return jnp.sum(jnp.sin(pool(jnp.tanh(conv(x, w, padding=((1, 1), (1, 1)))))))

    ours = jax.jit(
        jax.value_and_grad(
            lambda x, w: loss(jaxconv.conv2d, lambda h: jaxconv.max_pool2d(h, 2), x, w), (0, 1)
        )
    )
    ref = jax.jit(
        jax.value_and_grad(
            lambda x, w: loss(
                ref_conv2d, lambda h: ref_max_pool2d_lax(h, (2, 2), (2, 2), ((0, 0), (0, 0))), x, w
            ),
            (0, 1),
        )
    )
    (got, got_grads), (want, want_grads) = ours(x, w), ref(x, w)
    assert_close(got, want)
    for g, r in zip(got_grads, want_grads):
        assert_close(g, r)


def test_vmap_is_one_kernel_call(backend):
    rng = np.random.default_rng(1)
    xs, w = on(
        backend,
        random_array(rng, (3, 2, 3, 8, 8), jnp.float32),
        random_array(rng, (4, 3, 3, 3), jnp.float32),
    )
    fn = jax.vmap(lambda x: jaxconv.conv2d(x, w, padding=((1, 1), (1, 1))))
    hlo = jax.jit(fn).lower(xs).compile().as_text()
    assert hlo.count('custom_call_target="jaxconv_conv2d_fwd"') == 1, hlo
    assert_close(
        jax.jit(fn)(xs), jax.vmap(lambda x: ref_conv2d(x, w, padding=((1, 1), (1, 1))))(xs)
    )


# ----------------------------------------------------------------------------------------------
# 2. Smoke run on 8 host devices (child process: this file run as a script).

DEVICES = 8


@pytest.mark.slow("a child process with 8 host devices compiles a sharded training step")
def test_sharded_training_step_keeps_the_batch_split():
    proc = run_python(
        __file__,
        timeout=600,
        env={
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
            "JAX_PLATFORMS": "cpu",
        },
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == DEVICES
    assert report["all-gather"] == 0, report["evidence"]
    # Every kernel runs on the local batch of 16 / 8 = 2 examples.
    assert report["calls"] >= 3 and report["local_batch_only"], report["evidence"]
    assert 1 <= report["all-reduce"] <= 3, report["evidence"]  # weight grad (+ the loss mean)
    assert report["max_rel_diff"] < 1e-5, report
    # What the registry of primitives lowered with devices buys: under jit on several devices
    # each kernel lowers into custom_partitioning's call, which the SPMD partitioner splits.
    assert report["partitioned_calls_in_lowering"] >= 3, report


def _child():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    assert len(jax.devices()) == DEVICES
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    rng = np.random.default_rng(2)
    x = random_array(rng, (16, 3, 8, 8), jnp.float32)
    w = random_array(rng, (4, 3, 3, 3), jnp.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    ws = jax.device_put(w, NamedSharding(mesh, P()))

    def loss(conv, pool, w, x):
        return jnp.mean(pool(jnp.tanh(conv(x, w, padding=((1, 1), (1, 1))))) ** 2)

    def ours(w, x):
        return loss(jaxconv.conv2d, lambda h: jaxconv.max_pool2d(h, 2), w, x)

    lowered = jax.jit(jax.value_and_grad(ours)).lower(ws, xs)
    partitioned_calls = lowered.as_text().count("CustomSPMDPartitioning")
    exe = lowered.compile()
    hlo = exe.as_text()
    got = exe(ws, xs)
    want = jax.jit(
        jax.value_and_grad(
            lambda w, x: loss(
                ref_conv2d, lambda h: ref_max_pool2d_lax(h, (2, 2), (2, 2), ((0, 0), (0, 0))), w, x
            )
        )
    )(w, x)
    diff = max(
        float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    )
    calls = [line for line in hlo.splitlines() if 'custom_call_target="jaxconv_' in line]
    print(
        json.dumps(
            {
                "devices": len(jax.devices()),
                "all-gather": len(re.findall(r"\ball-gather(?:-start)?\(", hlo)),
                "all-reduce": len(re.findall(r"\ball-reduce(?:-start)?\(", hlo)),
                "calls": len(calls),
                # Operands and results of every call: their leading (batch) dims are 2, never 16.
                "local_batch_only": all(re.search(r"\[16,", line) is None for line in calls)
                and all(re.search(r"\[2,", line) for line in calls),
                "evidence": [
                    re.sub(r", metadata=.*", "", line)[:200]
                    for line in hlo.splitlines()
                    if "jaxconv_" in line or re.search(r"\ball-(gather|reduce)", line)
                ],
                "max_rel_diff": diff,
                "partitioned_calls_in_lowering": partitioned_calls,
            }
        )
    )


if __name__ == "__main__":
    _child()
    sys.exit(0)
