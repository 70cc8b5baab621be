"""Benchmark: jaxconv vs lax, side by side in one process.

    python -m jaxconv.bench [--set lenet|resnet50|mobilenet|pool|large|all]
                            [--layout NCHW|NHWC|both] [--dtype float32|bfloat16]
                            [--device cpu|gpu] [--quick] [--json PATH] [--plot PNG]
    python -m jaxconv.bench --from-json RESULTS.json --plot PNG    (redraw a saved run)
    python -m jaxconv.bench --capabilities avx2,avx512,avx512_bf16 [other options]
                            (one child process per CPU capability, then a comparison table)

For every shape, four functions are jax.jit-compiled: jaxconv and lax, forward and forward+backward
(jax.grad of the output's sum w.r.t. the input, and the weights for convolutions). The lax
baselines are what a JAX user would otherwise write: lax.conv_general_dilated, and for max pooling
lax.reduce_window with -inf init (as flax.linen.max_pool does), whose gradient XLA computes with
select_and_scatter. Each function is warmed up, then jaxconv and lax are timed alternately (each
repetition times one call of each, the order flipping every repetition) so that load from other
processes hits both alike; the reported time is the median, every call ends with
block_until_ready. The ratio is lax_ms / jaxconv_ms: above 1 means jaxconv is faster.

Work per call: convolutions count 2*N*OH*OW*O*(C/groups)*KH*KW FLOPs forward and three times that
forward+backward (bwd_data and bwd_filter each cost one forward). Pooling reports GB/s of nominal
traffic: the input read and output written forward, plus the output-sized cotangent read and
input-sized gradient written for forward+backward (jaxconv's int32 indices, written only when a
gradient is taken, are not counted).

--capabilities a,b,... (or "all": every capability this CPU has) runs the same bench once per
CPU kernel capability, each in a child process with JAXCONV_CPU_CAPABILITY set (the variable is
read once per process), then prints per row jaxconv's time and ratio under each capability and
its speed relative to the first one named; lax is timed again in every child, so every ratio is
a same-process ratio. --json then holds {"capabilities", "runs": {capability: that run's
document}, "comparison": rows}.

--json PATH is rewritten after every row (whole, through a temporary file renamed over it), with
"complete": false until the last row: a run that is killed or interrupted (Ctrl-C: exit status
130) leaves the rows it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxconv
from jaxconv._args import LayoutName

SETS = ("lenet", "resnet50", "mobilenet", "pool", "large")


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked layer. Sizes are logical (N, C, H, W); the layout is applied later."""

    set: str
    name: str
    op: str  # "conv" or "pool"
    n: int
    c: int
    h: int
    w: int
    out_channels: int = 0  # conv only
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1

    def out_hw(self) -> tuple[int, int]:
        oh, ow = ((s + 2 * self.padding - self.kernel) // self.stride + 1 for s in (self.h, self.w))
        return oh, ow

    def flops(self) -> int:
        oh, ow = self.out_hw()
        return (
            2
            * self.n
            * oh
            * ow
            * self.out_channels
            * (self.c // self.groups)
            * self.kernel
            * self.kernel
        )

    def pool_bytes(self, itemsize: int) -> int:
        oh, ow = self.out_hw()
        return (self.n * self.c * (self.h * self.w + oh * ow)) * itemsize


def _conv(set_, name, n, c, hw, o, k, stride=1, padding=None, groups=1):
    pad = k // 2 if padding is None else padding
    return Case(set_, name, "conv", n, c, hw, hw, o, k, stride, pad, groups)


def _pool(set_, name, n, c, hw, k, stride, padding=0):
    return Case(set_, name, "pool", n, c, hw, hw, 0, k, stride, padding)


def cases(set_name: str, device: str) -> list[Case]:
    """The shape sets. ResNet-50 and MobileNet use batch 8 on CPU and 32 on GPU."""
    b = 8 if device == "cpu" else 32
    if set_name == "lenet":  # LeNet-5 on 32x32 inputs, batch 64: C1, C3, C5
        return [
            _conv("lenet", "C1 5x5 1->6", 64, 1, 32, 6, 5, padding=0),
            _conv("lenet", "C3 5x5 6->16", 64, 6, 14, 16, 5, padding=0),
            _conv("lenet", "C5 5x5 16->120", 64, 16, 5, 120, 5, padding=0),
        ]
    if set_name == "resnet50":  # stem, then the bottleneck's 3x3 and its 1x1 reduce / expand
        out = [_conv("resnet50", "stem 7x7/2 3->64", b, 3, 224, 64, 7, stride=2)]
        for hw, width in ((56, 64), (28, 128), (14, 256), (7, 512)):
            out.append(_conv("resnet50", f"3x3 {width}->{width} @{hw}", b, width, hw, width, 3))
        for hw, width in ((56, 64), (28, 128), (14, 256), (7, 512)):
            out.append(
                _conv("resnet50", f"1x1 {4 * width}->{width} @{hw}", b, 4 * width, hw, width, 1)
            )
            out.append(
                _conv("resnet50", f"1x1 {width}->{4 * width} @{hw}", b, width, hw, 4 * width, 1)
            )
        return out
    if set_name == "mobilenet":  # MobileNet v1 depthwise 3x3 layers (groups = channels)
        out = []
        for c, hw, stride in (
            (32, 112, 1),
            (64, 112, 2),
            (128, 56, 1),
            (128, 56, 2),
            (256, 28, 1),
            (256, 28, 2),
            (512, 14, 1),
            (512, 14, 2),
            (1024, 7, 1),
        ):
            out.append(
                _conv(
                    "mobilenet",
                    f"dw3x3/{stride} {c} @{hw}",
                    b,
                    c,
                    hw,
                    c,
                    3,
                    stride=stride,
                    groups=c,
                )
            )
        return out
    if set_name == "large":  # large kernels, batch 2: where the CPU may take the FFT
        return [
            _conv("large", "ConvNeXt dw7x7 96 @56", 2, 96, 56, 96, 7, groups=96),
            _conv("large", "ConvNeXt dw7x7 384 @14", 2, 384, 14, 384, 7, groups=384),
            _conv("large", "RepLKNet dw31x31 128 @56", 2, 128, 56, 128, 31, groups=128),
            _conv("large", "RepLKNet dw31x31 256 @28", 2, 256, 28, 256, 31, groups=256),
            _conv("large", "RepLKNet dw27x27 512 @14", 2, 512, 14, 512, 27, groups=512),
            _conv("large", "RepLKNet dw13x13 1024 @7", 2, 1024, 7, 1024, 13, groups=1024),
            _conv("large", "AlexNet 11x11/4 3->64", 2, 3, 224, 64, 11, stride=4, padding=2),
            _conv("large", "dense 11x11 64->64 @56", 2, 64, 56, 64, 11),
            _conv("large", "dense 13x13 64->64 @28", 2, 64, 28, 64, 13),
            _conv("large", "dense 15x15 128->128 @28", 2, 128, 28, 128, 15),
        ]
    if set_name == "pool":
        return [
            _pool("pool", "2x2/2 64 @112", b, 64, 112, 2, 2),
            _pool("pool", "3x3/2 pad1 64 @112", b, 64, 112, 3, 2, padding=1),
            _pool("pool", "LeNet 2x2/2 6 @28", 64, 6, 28, 2, 2),
            _pool("pool", "LeNet 2x2/2 16 @10", 64, 16, 10, 2, 2),
        ]
    raise ValueError(f"unknown set {set_name!r}")


def quick_cases(set_name: str, device: str) -> list[Case]:
    """--quick: the first two layers of each set shrunk to batch 1 and at most 16x16 and 32
    channels, so that a run takes seconds (a smoke test of the harness, not a measurement)."""
    out = []
    for cs in cases(set_name, device)[:2]:
        c = min(cs.c, 32)
        o = min(cs.out_channels, 32)
        groups = c if cs.groups > 1 else 1
        o = c if cs.groups > 1 else o
        hw = min(cs.h, 16)
        out.append(
            dataclasses.replace(
                cs, name=cs.name + " [shrunk]", n=1, c=c, h=hw, w=hw, out_channels=o, groups=groups
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# The functions being compared.


def _dims(layout: str) -> tuple[str, str, str]:
    return ("NCHW", "OIHW", "NCHW") if layout == "NCHW" else ("NHWC", "HWIO", "NHWC")


def _act_shape(n, c, h, w, layout):
    return (n, c, h, w) if layout == "NCHW" else (n, h, w, c)


def _weight_shape(o, i, kh, kw, layout):
    return (o, i, kh, kw) if layout == "NCHW" else (kh, kw, i, o)


def make_functions(cs: Case, layout: LayoutName) -> tuple[Callable, Callable, tuple[int, ...]]:
    """(jaxconv_fn, lax_fn, argnums for the gradient) with the same signature."""
    if cs.op == "conv":
        pad = ((cs.padding, cs.padding), (cs.padding, cs.padding))
        stride = (cs.stride, cs.stride)

        def ours(x, w):
            return jaxconv.conv2d(x, w, stride=stride, padding=pad, groups=cs.groups, layout=layout)

        def theirs(x, w):
            return lax.conv_general_dilated(
                x, w, stride, pad, feature_group_count=cs.groups, dimension_numbers=_dims(layout)
            )

        return ours, theirs, (0, 1)

    k, s, p = cs.kernel, cs.stride, cs.padding
    if layout == "NCHW":
        window, strides, pads = (1, 1, k, k), (1, 1, s, s), ((0, 0), (0, 0), (p, p), (p, p))
    else:
        window, strides, pads = (1, k, k, 1), (1, s, s, 1), ((0, 0), (p, p), (p, p), (0, 0))

    def ours_pool(x):
        return jaxconv.max_pool2d(x, k, s, p, layout=layout)

    def theirs_pool(x):
        return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pads)

    return ours_pool, theirs_pool, (0,)


def make_inputs(cs: Case, layout: str, dtype: Any, device: Any) -> tuple:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(_act_shape(cs.n, cs.c, cs.h, cs.w, layout), dtype=np.float32)
    args = [x]
    if cs.op == "conv":
        fan_in = (cs.c // cs.groups) * cs.kernel * cs.kernel
        w = rng.standard_normal(
            _weight_shape(cs.out_channels, cs.c // cs.groups, cs.kernel, cs.kernel, layout),
            dtype=np.float32,
        ) / math.sqrt(fan_in)
        args.append(w)
    return tuple(jax.device_put(jnp.asarray(a, dtype=dtype), device) for a in args)


def forward_and_backward(fn: Callable, argnums: Sequence[int]) -> Callable:
    """jax.grad of sum(fn(...)) in float32 w.r.t. argnums (inputs, and weights for conv)."""
    return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=tuple(argnums))


# ----------------------------------------------------------------------------------------------
# Timing.


def _call_ms(fn: Callable, args: Sequence[Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) * 1e3


def time_pair(
    ours: Callable,
    theirs: Callable,
    args: Sequence[Any],
    *,
    budget_s: float,
    min_reps: int,
    max_reps: int,
) -> tuple[list[float], list[float]]:
    """Warm up both, then alternate timed calls; returns (ours_ms list, theirs_ms list)."""
    for _ in range(2):  # the first call compiles; the second warms caches and thread pools
        jax.block_until_ready(ours(*args))
        jax.block_until_ready(theirs(*args))
    probe = _call_ms(ours, args) + _call_ms(theirs, args)
    reps = int(min(max_reps, max(min_reps, budget_s * 1e3 / max(probe, 1e-3))))
    ours_ms, theirs_ms = [], []
    for r in range(reps):
        if r % 2 == 0:
            ours_ms.append(_call_ms(ours, args))
            theirs_ms.append(_call_ms(theirs, args))
        else:
            theirs_ms.append(_call_ms(theirs, args))
            ours_ms.append(_call_ms(ours, args))
    return ours_ms, theirs_ms


def _max_abs_diff(a: Any, b: Any) -> float:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(
        float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) if x.size else 0.0
        for x, y in zip(leaves_a, leaves_b)
    )


def _max_abs(a: Any) -> float:
    return max(
        float(jnp.max(jnp.abs(x.astype(jnp.float32)))) if x.size else 0.0
        for x in jax.tree.leaves(a)
    )


def algorithm(cs: Case, layout: Any, mode: str, dtype: Any, device: Any) -> str:
    """The algorithm jaxconv's kernels take for this row: on the CPU the one choice of
    ffi/cpu/conv_algo.cc (direct, winograd2/4, or "fft PxQ/THxTW": transform size and output
    tile), per direction when they differ (fwd / bwd_data / bwd_filter); "-" for pooling."""
    if cs.op != "conv":
        return "-"
    if device.platform != "cpu":
        return device.platform
    from jaxconv import _jaxconv_cpu

    p = cs.padding
    attrs = [cs.stride, cs.stride, 1, 1, p, p, p, p, cs.groups, 0 if layout == "NCHW" else 1]
    x = [cs.n, cs.c, cs.h, cs.w]
    w = [cs.out_channels, cs.c // cs.groups, cs.kernel, cs.kernel]
    dirs = ("fwd",) if mode == "fwd" else ("fwd", "bwd_data", "bwd_filter")
    names = [
        _jaxconv_cpu.conv_algorithm(
            d,
            jnp.dtype(dtype) == jnp.float64,
            x,
            w,
            attrs,
            bfloat16=jnp.dtype(dtype) == jnp.bfloat16,
        )
        for d in dirs
    ]
    return names[0] if len(set(names)) == 1 else " / ".join(names)


def run_case(
    cs: Case,
    layout: Any,
    mode: str,
    dtype: Any,
    device: Any,
    *,
    budget_s: float,
    min_reps: int,
    max_reps: int,
) -> dict[str, Any]:
    ours, theirs, argnums = make_functions(cs, layout)
    if mode == "fwd+bwd":
        ours, theirs = forward_and_backward(ours, argnums), forward_and_backward(theirs, argnums)
    ours, theirs = jax.jit(ours), jax.jit(theirs)
    args = make_inputs(cs, layout, dtype, device)
    ours_ms, theirs_ms = time_pair(
        ours, theirs, args, budget_s=budget_s, min_reps=min_reps, max_reps=max_reps
    )
    # A sanity check that both compute the same thing (it is not the test suite's job here,
    # but a fast wrong kernel must not look like a win).
    ref = theirs(*args)
    err = _max_abs_diff(ours(*args), ref) / max(_max_abs(ref), 1e-30)
    j_ms, l_ms = statistics.median(ours_ms), statistics.median(theirs_ms)
    itemsize = jnp.dtype(dtype).itemsize
    if cs.op == "conv":
        work, unit = cs.flops() * (3 if mode == "fwd+bwd" else 1), "GFLOP/s"
    else:
        work, unit = cs.pool_bytes(itemsize) * (2 if mode == "fwd+bwd" else 1), "GB/s"
    oh, ow = cs.out_hw()
    x_shape = _act_shape(cs.n, cs.c, cs.h, cs.w, layout)
    y_shape = _act_shape(cs.n, cs.out_channels if cs.op == "conv" else cs.c, oh, ow, layout)
    w_shape = (
        _weight_shape(cs.out_channels, cs.c // cs.groups, cs.kernel, cs.kernel, layout)
        if cs.op == "conv"
        else None
    )
    return {
        "set": cs.set,
        "name": cs.name,
        "op": cs.op,
        "layout": layout,
        "mode": mode,
        "dtype": jnp.dtype(dtype).name,
        "x_shape": list(x_shape),
        "w_shape": w_shape and list(w_shape),
        "y_shape": list(y_shape),
        "kernel": cs.kernel,
        "stride": cs.stride,
        "padding": cs.padding,
        "groups": cs.groups,
        "work": work,
        "unit": unit,
        "jaxconv_ms": j_ms,
        "lax_ms": l_ms,
        "jaxconv_rate": work / (j_ms * 1e-3) / 1e9,
        "lax_rate": work / (l_ms * 1e-3) / 1e9,
        "ratio": l_ms / j_ms,
        "reps": len(ours_ms),
        "jaxconv_ms_min": min(ours_ms),
        "lax_ms_min": min(theirs_ms),
        "max_rel_diff": err,
        "algorithm": algorithm(cs, layout, mode, dtype, device),
    }


def geomean(values: Sequence[float]) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarize(results: list[dict]) -> list[dict]:
    """Geometric-mean ratios per (set, layout, mode), plus LeNet+ResNet-50 together (the
    convolution target) where both were run."""
    groups: dict[tuple, list[float]] = {}
    for r in results:
        groups.setdefault((r["set"], r["layout"], r["mode"]), []).append(r["ratio"])
        if r["set"] in ("lenet", "resnet50"):
            groups.setdefault(("lenet+resnet50", r["layout"], r["mode"]), []).append(r["ratio"])
    return [
        {
            "set": s,
            "layout": lay,
            "mode": m,
            "geomean_ratio": geomean(v),
            "n": len(v),
            "min_ratio": min(v),
        }
        for (s, lay, m), v in groups.items()
    ]


# ----------------------------------------------------------------------------------------------
# Machine description for the JSON.


def machine_info() -> dict:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "logical_cpus": os.cpu_count(),
    }
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        pass
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in text.splitlines()
                if line.startswith("model name")
            ),
            None,
        )
        flags = next(
            (
                line.split(":", 1)[1].split()
                for line in text.splitlines()
                if line.startswith("flags")
            ),
            [],
        )
        info["cpu_model"] = model
        info["flags"] = {f: f in flags for f in ("avx", "avx2", "fma", "avx512f", "f16c")}
    except OSError:
        info["cpu_model"] = platform.processor() or None
    # The CPU kernels' instruction set (JAXCONV_CPU_CAPABILITY forces a lower one; compare
    # capabilities by running the bench once per value).
    info["cpu_capability"] = jaxconv._ffi.cpu_capability()
    return info


def versions() -> dict:
    import jaxlib

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jaxconv": jaxconv.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------------------------
# Output.


def _fmt_shape(s: Sequence[int]) -> str:
    return "x".join(str(v) for v in s) if s else "-"


def table(results: list[dict], summary: list[dict]) -> str:
    head = (
        f"{'set':<9} {'layer':<31} {'layout':<6} {'mode':<7} {'x':<16} {'w':<14} "
        f"{'jaxconv ms':>10} {'lax ms':>10} {'jaxconv':>9} {'lax':>9} {'unit':<7} "
        f"{'ratio':>6}  algorithm"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['set']:<9} {r['name']:<31} {r['layout']:<6} {r['mode']:<7} "
            f"{_fmt_shape(r['x_shape']):<16} {_fmt_shape(r['w_shape']):<14} "
            f"{r['jaxconv_ms']:>10.3f} {r['lax_ms']:>10.3f} {r['jaxconv_rate']:>9.1f} "
            f"{r['lax_rate']:>9.1f} {r['unit']:<7} {r['ratio']:>5.2f}x  {r.get('algorithm', '')}"
        )
    lines += ["", "geometric mean of lax_ms / jaxconv_ms (min in brackets):"]
    for s in summary:
        lines.append(
            f"  {s['set']:<15} {s['layout']:<6} {s['mode']:<7} "
            f"{s['geomean_ratio']:5.2f}x  [min {s['min_ratio']:.2f}x, {s['n']} shapes]"
        )
    return "\n".join(lines)


# Colours per (mode, layout): forward in blues, forward+backward in oranges, the layouts a light
# and a dark shade of each, so that the eye groups by mode first.
SERIES_COLOURS = {
    ("fwd", "NCHW"): "#1f77b4",
    ("fwd", "NHWC"): "#9ecae1",
    ("fwd+bwd", "NCHW"): "#d95f02",
    ("fwd+bwd", "NHWC"): "#fdae6b",
}


def plot(doc: dict, path: str) -> Any:
    """Draws doc's results (a --json document) to the image `path` and returns the figure.

    Left: one row per layer (sets in the order run, a gap between sets), the ratio lax_ms /
    jaxconv_ms on a log axis with the parity line at 1 (right of it jaxconv is faster); one
    colour per (mode, layout), the series slightly offset within a row so that none hides
    another. Right: the table of geometric means. The title records machine, device, versions
    and date, so the picture cannot be separated from what it measured.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    results = doc["results"]
    layers: list[tuple[str, str]] = []  # (set, name) in the order first seen
    for r in results:
        if (r["set"], r["name"]) not in layers:
            layers.append((r["set"], r["name"]))
    row, y, prev = {}, 0.0, None
    for key in layers:
        if prev is not None and key[0] != prev:
            y += 0.6  # a gap between shape sets
        row[key], prev, y = y, key[0], y + 1.0
    series = [k for k in SERIES_COLOURS if any((r["mode"], r["layout"]) == k for r in results)]
    series += sorted({(r["mode"], r["layout"]) for r in results} - set(series))

    height = max(3.0, 0.28 * y + 1.6)
    fig, (ax, ax_table) = plt.subplots(
        1, 2, figsize=(13, height), gridspec_kw={"width_ratios": [3, 2]}
    )
    for i, key in enumerate(series):
        rs = [r for r in results if (r["mode"], r["layout"]) == key]
        offset = (i - (len(series) - 1) / 2) * 0.8 / max(len(series), 1)
        ax.scatter(
            [r["ratio"] for r in rs],
            [row[(r["set"], r["name"])] + offset for r in rs],
            s=22,
            color=SERIES_COLOURS.get(key),
            label=f"{key[0]} {key[1]}",
            zorder=3,
            edgecolors="black",
            linewidths=0.3,
        )
    ax.set_xscale("log")
    from matplotlib import ticker

    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.axvline(1.0, color="black", linewidth=1.0, zorder=2, label="parity (1x)")
    ax.set_yticks([row[k] for k in layers], [f"{s}: {n}" for s, n in layers], fontsize=7)
    ax.set_ylim(y - 0.4, -0.6)  # first layer on top
    ax.set_xlabel("lax_ms / jaxconv_ms  (log scale; > 1: jaxconv faster)")
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")

    ax_table.axis("off")
    summary = doc.get("summary") or summarize(results)
    cells = [
        [
            s["set"],
            s["layout"],
            s["mode"],
            f"{s['geomean_ratio']:.2f}x",
            f"{s['min_ratio']:.2f}x",
            str(s["n"]),
        ]
        for s in summary
    ]
    if cells:
        tab = ax_table.table(
            cellText=cells,
            colLabels=["set", "layout", "mode", "geomean", "min", "shapes"],
            loc="upper center",
            cellLoc="left",
        )
        tab.auto_set_font_size(False)
        tab.set_fontsize(7)
        tab.auto_set_column_width(list(range(6)))
        tab.scale(1.0, 1.2)
    ax_table.set_title("geometric mean of the ratio", fontsize=9)

    machine, versions_ = doc.get("machine", {}), doc.get("versions", {})
    device = doc.get("device", {})
    fig.suptitle(
        f"jaxconv vs lax, {results[0]['dtype'] if results else ''}: "
        f"{machine.get('cpu_model') or machine.get('processor', '?')} "
        f"({machine.get('usable_cpus', machine.get('logical_cpus', '?'))} CPUs), "
        f"{device.get('kind', '?')}; jax {versions_.get('jax', '?')}; "
        f"{doc.get('date', '?')[:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def write_json(doc: dict[str, Any], path: str | None) -> None:
    """Writes doc to path as a whole new file (a temporary beside it, then renamed over it), so
    that whoever reads path, at any moment and even after this process is killed, finds the
    previous complete document or the new one, never half of one."""
    if not path:
        return
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jaxconv.bench", description=__doc__.split("\n")[0])
    p.add_argument("--set", default="all", choices=SETS + ("all",))
    p.add_argument("--layout", default="both", choices=("NCHW", "NHWC", "both"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--mode", default="both", choices=("fwd", "fwd+bwd", "both"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes and few repetitions: a seconds-long smoke run",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed calls per function and case (default 1.0, quick 0.02)",
    )
    p.add_argument("--filter", default=None, help="only layers whose name contains this")
    p.add_argument("--json", dest="json_path", default=None, help="write results here")
    p.add_argument(
        "--plot",
        dest="plot_path",
        default=None,
        help="draw the ratio per layer to this image (needs matplotlib)",
    )
    p.add_argument(
        "--capabilities",
        default=None,
        help="comma-separated CPU capabilities (or 'all') to compare, one child process each",
    )
    p.add_argument(
        "--from-json",
        dest="from_json",
        default=None,
        help="run nothing: print the table (and --plot) of a saved --json file",
    )
    return p.parse_args(argv)


def _child_argv(args: argparse.Namespace, json_path: str) -> list[str]:
    """The options of this run for one capability's child (no --capabilities, --plot)."""
    out = ["--set", args.set, "--layout", args.layout, "--dtype", args.dtype]
    out += ["--device", args.device, "--mode", args.mode, "--json", json_path]
    if args.quick:
        out.append("--quick")
    if args.budget is not None:
        out += ["--budget", str(args.budget)]
    if args.filter is not None:
        out += ["--filter", args.filter]
    return out


def compare_rows(runs: dict[str, dict]) -> list[dict]:
    """One row per (set, layer, layout, mode) present in every run: jaxconv_ms and ratio per
    capability, and speedup = first capability's jaxconv_ms / this one's."""
    caps = list(runs)
    key = lambda r: (r["set"], r["name"], r["layout"], r["mode"])
    per = {c: {key(r): r for r in runs[c]["results"]} for c in caps}
    rows = []
    for k in per[caps[0]]:
        if not all(k in per[c] for c in caps):
            continue
        first = per[caps[0]][k]["jaxconv_ms"]
        rows.append(
            {
                "set": k[0],
                "name": k[1],
                "layout": k[2],
                "mode": k[3],
                "dtype": per[caps[0]][k]["dtype"],
                "jaxconv_ms": {c: per[c][k]["jaxconv_ms"] for c in caps},
                "ratio": {c: per[c][k]["ratio"] for c in caps},
                "speedup": {c: first / per[c][k]["jaxconv_ms"] for c in caps},
                "algorithm": {c: per[c][k].get("algorithm", "") for c in caps},
            }
        )
    return rows


def compare_table(rows: list[dict], caps: list[str]) -> str:
    head = f"{'set':<9} {'layer':<31} {'layout':<6} {'mode':<7} " + " ".join(
        f"{c + ' ms (vs lax)':>24}" for c in caps
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = " ".join(
            f"{r['jaxconv_ms'][c]:>10.3f} ({r['ratio'][c]:4.2f}x) {r['speedup'][c]:5.2f}x"
            for c in caps
        )
        lines.append(f"{r['set']:<9} {r['name']:<31} {r['layout']:<6} {r['mode']:<7} {cells}")
    lines += ["", f"per capability: jaxconv ms (lax_ms / jaxconv_ms) speed vs {caps[0]}"]
    for c in caps[1:]:
        sp = [r["speedup"][c] for r in rows]
        if sp:
            lines.append(
                f"  {c} vs {caps[0]}: geomean {geomean(sp):.2f}x, min {min(sp):.2f}x "
                f"({sum(v < 1 for v in sp)} of {len(sp)} rows slower)"
            )
    return "\n".join(lines)


def run_capabilities(args: argparse.Namespace) -> int:
    import subprocess
    import tempfile

    caps = (
        list(jaxconv._ffi.cpu_capabilities())
        if args.capabilities == "all"
        else [c.strip() for c in args.capabilities.split(",") if c.strip()]
    )
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cap in caps:
            path = os.path.join(tmp, f"{cap}.json")
            print(f"== {jaxconv._ffi.CPU_CAPABILITY_ENV}={cap}", file=sys.stderr, flush=True)
            env = {**os.environ, jaxconv._ffi.CPU_CAPABILITY_ENV: cap}
            proc = subprocess.run(
                [sys.executable, "-m", "jaxconv.bench", *_child_argv(args, path)],
                env=env,
                stdout=sys.stderr,  # each child's own table; stdout keeps the comparison
            )
            if proc.returncode != 0:
                print(f"the run under {cap} failed (exit {proc.returncode})", file=sys.stderr)
                return proc.returncode
            with open(path) as f:
                runs[cap] = json.load(f)
    rows = compare_rows(runs)
    print(compare_table(rows, caps))
    if args.json_path:
        write_json(
            {"schema": 1, "capabilities": caps, "runs": runs, "comparison": rows}, args.json_path
        )
        print(f"wrote {args.json_path}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.capabilities:
        return run_capabilities(args)
    if args.from_json:
        with open(args.from_json) as f:
            doc = json.load(f)
        print(table(doc["results"], doc.get("summary") or summarize(doc["results"])))
        if args.plot_path:
            plot(doc, args.plot_path)
            print(f"wrote {args.plot_path}", file=sys.stderr)
        return 0
    try:
        device = jax.devices(args.device)[0]
    except RuntimeError as e:
        print(f"no {args.device} device: {e}", file=sys.stderr)
        return 2
    dtype = jnp.dtype(args.dtype)
    sets = SETS if args.set == "all" else (args.set,)
    layouts = ("NCHW", "NHWC") if args.layout == "both" else (args.layout,)
    modes = ("fwd", "fwd+bwd") if args.mode == "both" else (args.mode,)
    pick = quick_cases if args.quick else cases
    budget = args.budget if args.budget is not None else (0.02 if args.quick else 1.0)
    min_reps, max_reps = (3, 5) if args.quick else (7, 200)
    todo = [
        (cs, lay, m)
        for s in sets
        for cs in pick(s, args.device)
        for lay in layouts
        for m in modes
        if args.filter is None or args.filter in cs.name
    ]

    doc = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python -m jaxconv.bench"] + list(sys.argv[1:] if argv is None else argv)
        ),
        "machine": machine_info(),
        "device": {
            "platform": device.platform,
            "kind": device.device_kind,
            "count": len(jax.devices(args.device)),
        },
        "versions": versions(),
        "config": {
            "sets": list(sets),
            "layouts": list(layouts),
            "modes": list(modes),
            "dtype": dtype.name,
            "quick": args.quick,
            "budget_s": budget,
            "min_reps": min_reps,
            "max_reps": max_reps,
            "statistic": "median",
        },
        # False until every case has run: a run that was killed or interrupted leaves the rows
        # it finished (the file is rewritten whole after each row).
        "complete": False,
        "results": [],
        "summary": [],
    }
    results = doc["results"]
    write_json(doc, args.json_path)
    t_start = time.perf_counter()
    try:
        for i, (cs, lay, mode) in enumerate(todo, 1):
            print(
                f"[{i}/{len(todo)}] {cs.set} {cs.name} {lay} {mode} ...",
                end="",
                file=sys.stderr,
                flush=True,
            )
            r = run_case(
                cs, lay, mode, dtype, device, budget_s=budget, min_reps=min_reps, max_reps=max_reps
            )
            results.append(r)
            doc["summary"] = summarize(results)
            write_json(doc, args.json_path)
            print(
                f" jaxconv {r['jaxconv_ms']:.3f} ms, lax {r['lax_ms']:.3f} ms, {r['ratio']:.2f}x",
                file=sys.stderr,
                flush=True,
            )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted after {len(results)} of {len(todo)} cases"
            + (f"; {args.json_path} holds them" if args.json_path else ""),
            file=sys.stderr,
        )
        return 130
    summary = doc["summary"] = summarize(results)
    print(table(results, summary))
    print(
        f"\n{len(todo)} cases in {time.perf_counter() - t_start:.1f} s on {device.device_kind} "
        f"({device.platform}); ratio = lax_ms / jaxconv_ms, > 1 means jaxconv is faster"
    )
    doc["complete"] = True
    if args.json_path:
        write_json(doc, args.json_path)
        print(f"wrote {args.json_path}", file=sys.stderr)
    if args.plot_path:
        plot(doc, args.plot_path)
        print(f"wrote {args.plot_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
