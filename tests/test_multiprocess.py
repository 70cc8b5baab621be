"""jaxconv across two JAX processes: one data-parallel training step under multi-process `jit`.

Two child processes (this file run as a script) form one JAX cluster on localhost through
`jax.distributed.initialize` (coordinator on 127.0.0.1 at a free port, CPU collectives over
gloo), each with 2 CPU devices, so the global batch is split over 4 devices in 2 processes.
Each computes the loss and gradients of a small conv / max-pool / conv_transpose model with the
batch sharded over all 4 devices; the weight gradients need an all-reduce across the processes.
The parent computes the same step in one process on one device and asserts that both children
return its gradients (float64, to rounding) and the same bits as each other, and that the
children's compiled step ran jaxconv's kernels on per-device shards with a cross-process
all-reduce. Both children are killed if they outlive the time limit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

PROCESSES = 2
LOCAL_DEVICES = 2
N = 8  # global batch: N // (PROCESSES * LOCAL_DEVICES) = 2 examples per device
TIMEOUT_S = 300  # for the whole cluster: both children are killed past it


# ----------------------------------------------------------------------------------------------
# The model and data, shared by the children and the one-process reference.


def make_data():
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.standard_normal((6, 3, 3, 3)) * 0.3,
        "b1": rng.standard_normal(6) * 0.1,
        "w2": rng.standard_normal((6, 4, 3, 3)) * 0.3,
    }
    x = rng.standard_normal((N, 3, 12, 12))
    target = rng.standard_normal((N, 4, 12, 12))
    return params, x, target


def loss_fn(params, x, target):
    import jax.numpy as jnp

    import jaxconv

    y = jaxconv.conv2d(x, params["w1"], params["b1"], padding=1)
    y = jaxconv.max_pool2d(jnp.tanh(y), 2)
    # (N, 6, 6, 6) -> (N, 4, 12, 12): the transposed convolution doubles the side.
    y = jaxconv.conv_transpose2d(y, params["w2"], stride=2, padding=1, output_padding=1)
    return jnp.mean((y - target) ** 2)


# ----------------------------------------------------------------------------------------------
# The test (parent).


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow("two child processes form a JAX cluster and compile a sharded step")
@pytest.mark.cpu_only("the cluster is made of CPU processes; one run is enough")
def test_two_process_data_parallel_step_equals_one_process(backend, tmp_path):
    import jax

    # The one-process reference: the whole batch on one device.
    params, x, target = make_data()
    want_loss, want_grads = jax.jit(jax.value_and_grad(loss_fn))(params, x, target)

    port = _free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_ENABLE_X64": "1",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
    }
    procs = []
    logs = [(tmp_path / f"process{pid}.log").open("w") for pid in range(PROCESSES)]
    try:
        for pid in range(PROCESSES):
            out = tmp_path / f"process{pid}.json"
            # Started in tests/ (as tests/child.py explains): the installed jaxconv is imported.
            procs.append(
                (
                    subprocess.Popen(
                        [sys.executable, __file__, str(port), str(pid), str(out)],
                        cwd=Path(__file__).parent,
                        env=env,
                        # A file, not a pipe: a pipe that fills while the parent waits on the
                        # other child would stall both.
                        stdout=logs[pid],
                        stderr=subprocess.STDOUT,
                        text=True,
                    ),
                    out,
                )
            )
        deadline = time.monotonic() + TIMEOUT_S
        for proc, _ in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for proc, _ in procs:  # a child still running after a failure or the timeout
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    for pid, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, (tmp_path / f"process{pid}.log").read_text()[-4000:]

    results = [json.loads(out.read_text()) for _, out in procs]
    for res in results:
        assert res["process_count"] == PROCESSES
        assert res["devices"] == PROCESSES * LOCAL_DEVICES
        np.testing.assert_allclose(res["loss"], float(want_loss), rtol=1e-12)
        for name, want in want_grads.items():
            np.testing.assert_allclose(
                np.array(res["grads"][name]), np.asarray(want), rtol=1e-10, atol=1e-14, err_msg=name
            )
        # Each jaxconv kernel works on one device's shard of the batch (2 of 8 examples), and
        # the weight gradients are summed over all devices of both processes by all-reduce.
        assert res["all_reduce"], "no all-reduce in the compiled step"
        assert "all-gather" not in res["collectives"], res["collectives"]
        for target in (
            "jaxconv_conv2d_fwd",
            "jaxconv_conv2d_bwd_data",
            "jaxconv_conv2d_bwd_filter",
            "jaxconv_max_pool2d_fwd",
            "jaxconv_max_pool2d_bwd",
        ):
            assert target in res["kernels"], (target, res["kernels"])
        assert res["x_shard_shape"] == [N // (PROCESSES * LOCAL_DEVICES), 3, 12, 12]
    # The processes hold one replicated result: the same bits in both.
    assert results[0]["grads"] == results[1]["grads"]


# ----------------------------------------------------------------------------------------------
# A child process: `python test_multiprocess.py PORT PROCESS_ID OUT_JSON`.


def _child(port: int, process_id: int, out: str) -> None:
    import re

    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    jax.config.update("jax_enable_x64", True)
    # CPU collectives across processes: gloo (the default since jax 0.5; older versions had
    # none by default). The option is absent where jax has no choice to make.
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        pass
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=PROCESSES,
        process_id=process_id,
        initialization_timeout=120,
    )
    try:
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        batch = NamedSharding(mesh, PartitionSpec("data"))
        replicated = NamedSharding(mesh, PartitionSpec())

        # Every process makes the same global data and hands over the part its devices hold.
        params, x, target = make_data()

        def put(value, sharding):
            return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

        params = {k: put(v, replicated) for k, v in params.items()}
        x, target = put(x, batch), put(target, batch)
        step = jax.jit(jax.value_and_grad(loss_fn), out_shardings=replicated)
        loss, grads = step(params, x, target)
        hlo = step.lower(params, x, target).compile().as_text()
        kernels = sorted(set(re.findall(r'custom_call_target="(jaxconv_\w+)"', hlo)))
        collectives = sorted(
            set(
                re.findall(
                    r"\b(all-reduce|all-gather|all-to-all|collective-permute)(?:-start)?\(", hlo
                )
            )
        )
        result = {
            "process_count": jax.process_count(),
            "devices": jax.device_count(),
            "loss": float(loss.addressable_data(0)),
            "grads": {k: np.asarray(v.addressable_data(0)).tolist() for k, v in grads.items()},
            "kernels": kernels,
            "collectives": collectives,
            "all_reduce": "all-reduce" in collectives,
            "x_shard_shape": list(x.addressable_shards[0].data.shape),
        }
        Path(out).write_text(json.dumps(result))
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
