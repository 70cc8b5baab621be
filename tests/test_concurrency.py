"""jaxconv used concurrently: from several Python threads at once, and as independent ops inside
one jit (which XLA is free to run at the same time).

The CPU kernels keep per-thread scratch (packing buffers, index runs, pooling planes) in
`thread_local` storage and split their work over XLA's intra-op thread pool, which every caller
shares. A buffer shared by mistake between two threads, or a work split whose result depends on
which thread claims which tile, shows up here as a result that differs from the one computed
alone. Each thread therefore gets its own inputs (a race would mix them) of two sizes (so the
scratch of some threads grows while others use theirs), and results must be *bitwise* equal to
single-threaded ones: the kernels' summation order is fixed by the work item, not by the thread.
"""

from __future__ import annotations

import threading
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jaxconv

from reference import on, random_array

THREADS = 6
ROUNDS = 3
SIZES = ((2, 8, 12, 12), (4, 16, 20, 20))  # (N, C, H, W): small and large


def _vjp(fn, *args):
    """fn's output and its vjp at a fixed cotangent (the output itself, rotated), so that every
    backward kernel runs and sees data unlike its forward input."""
    out, pullback = jax.vjp(fn, *args)
    return (out, *pullback(jax.tree.map(lambda o: jnp.roll(o, 1), out)))


def _pool_vjp(x):
    y, idx = jaxconv.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    (dx,) = jax.vjp(lambda x: jaxconv.max_pool2d(x, 3, stride=2, padding=1), x)[1](y * 0.5)
    unpooled = jaxconv.max_unpool2d(y, idx, 3, stride=2, padding=1, output_size=x.shape)
    return y, idx, dx, unpooled


# name -> (function of (x, w, w_t, w_dw), in NCHW). Together they launch every target:
# conv fwd / bwd_data / bwd_filter (GEMM and depthwise paths), transposed conv, pool fwd/bwd.
OPS = {
    "conv2d": lambda x, w, w_t, w_dw: _vjp(partial(jaxconv.conv2d, stride=1, padding=1), x, w),
    "conv2d_strided_nhwc": lambda x, w, w_t, w_dw: _vjp(
        partial(jaxconv.conv2d, stride=2, padding=1, layout="NHWC"),
        jnp.transpose(x, (0, 2, 3, 1)),
        jnp.transpose(w, (2, 3, 1, 0)),
    ),
    "depthwise": lambda x, w, w_t, w_dw: _vjp(
        partial(jaxconv.conv2d, padding=1, groups=x.shape[1]), x, w_dw
    ),
    "conv_transpose2d": lambda x, w, w_t, w_dw: _vjp(
        partial(jaxconv.conv_transpose2d, stride=2, padding=1, output_padding=1), x, w_t
    ),
    "max_pool2d": lambda x, w, w_t, w_dw: _pool_vjp(x),
}


def operands(size, seed):
    n, c, h, wd = size
    rng = np.random.default_rng(seed)
    return (
        random_array(rng, (n, c, h, wd), jnp.float32),
        random_array(rng, (2 * c, c, 3, 3), jnp.float32),
        random_array(rng, (c, c // 2, 3, 3), jnp.float32),
        random_array(rng, (c, 1, 3, 3), jnp.float32),
    )


def assert_bitwise_equal(got, want, what):
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (what, g.shape, w.shape)
        # Compare the bits: equal values, signed zeros and NaN payloads included.
        np.testing.assert_array_equal(
            g.view(f"u{g.itemsize}"), w.view(f"u{w.itemsize}"), err_msg=str(what)
        )


def run_threads(work, n_threads):
    """Runs work(thread_index) on n_threads threads released together; re-raises the first
    exception (a failed assertion included) in the calling thread."""
    barrier = threading.Barrier(n_threads)
    errors = []

    def body(t):
        try:
            barrier.wait(timeout=60)
            work(t)
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a thread hangs"
    if errors:
        raise errors[0]


def test_threads_calling_jitted_functions_get_single_threaded_results(backend):
    """THREADS threads each call every op ROUNDS times, each on its own inputs and in its own
    order, all at once; every result equals the one computed alone beforehand."""
    jitted = {name: jax.jit(fn) for name, fn in OPS.items()}
    inputs = [on(backend, *operands(SIZES[t % 2], seed=t)) for t in range(THREADS)]
    alone = [
        {name: jax.block_until_ready(fn(*inputs[t])) for name, fn in jitted.items()}
        for t in range(THREADS)
    ]

    def work(t):
        names = list(jitted)
        order = np.random.default_rng(100 + t)
        for r in range(ROUNDS):
            for name in order.permutation(names):
                got = jax.block_until_ready(jitted[name](*inputs[t]))
                assert_bitwise_equal(got, alone[t][name], (name, "thread", t, "round", r))

    run_threads(work, THREADS)


def test_threads_sharing_one_input_and_one_function(backend):
    """All threads run the same jitted training-like step on the same arrays at once (the
    cached executable and the input buffers are shared)."""
    x, w, w_t, w_dw = on(backend, *operands(SIZES[1], seed=7))

    @jax.jit
    def step(x, w, w_t, w_dw):
        return [fn(x, w, w_t, w_dw) for fn in OPS.values()]

    want = jax.block_until_ready(step(x, w, w_t, w_dw))

    def work(t):
        for r in range(ROUNDS):
            assert_bitwise_equal(step(x, w, w_t, w_dw), want, ("thread", t, "round", r))

    run_threads(work, THREADS)


def test_independent_ops_inside_one_jit_equal_separate_calls(backend):
    """One jit holding every op on two independent input sets (no data flows between them, so
    XLA may schedule the kernels concurrently) gives what each op gives in its own jit."""
    sets = [on(backend, *operands(size, seed=20 + i)) for i, size in enumerate(SIZES)]

    @jax.jit
    def together(sets):
        return [[fn(*args) for fn in OPS.values()] for args in sets]

    hlo = together.lower(sets).compile().as_text()
    # Every op on each input set is its own kernel launch (nothing was merged or deduplicated).
    assert hlo.count('custom_call_target="jaxconv_') >= len(SIZES) * len(OPS) * 2, hlo
    got = together(sets)
    for i, args in enumerate(sets):
        for (name, fn), g in zip(OPS.items(), got[i]):
            assert_bitwise_equal(g, jax.jit(fn)(*args), (name, "input set", i))
