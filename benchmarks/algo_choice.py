"""Is auto's algorithm choice (ffi/cpu/conv_algo.cc) the fastest? Times every applicable forced
algorithm (JAXCONV_CPU_CONV_ALGO=direct, winograd2, winograd4, fft) and auto on a list of conv
shapes, in one process, and reports the rows where auto is not within --tolerance of the best.

    python benchmarks/algo_choice.py [--shapes convnext|lenet|dense|all] [--layout NCHW,NHWC]
                                     [--mode fwd,fwd+bwd] [--reps 7] [--json out.json]

The variable is read on every call (conv_algo.h), so the algorithms share one jitted function
and are timed alternately, one call of each per repetition, the order rotating, so that load
from other processes hits them alike; the reported time is the median. fwd+bwd is the forward
and the gradient with respect to input and weights (jax.value_and_grad of the output's sum), each
direction taking its own choice. Algorithms that cannot run a shape (Winograd off 3x3 stride 1,
FFT at stride > 1) are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxconv
from jaxconv import _jaxconv_cpu

ENV = "JAXCONV_CPU_CONV_ALGO"


class Shape(NamedTuple):
    name: str
    n: int
    c: int
    o: int
    h: int
    k: int
    groups: int
    stride: int = 1
    padding: int | None = None  # None: k // 2 ("same")


def _shapes(which: str) -> list[Shape]:
    convnext = [
        Shape(f"dw7x7 {c} @{h}", 2, c, c, h, 7, c)
        for c, h in [(96, 56), (192, 28), (384, 14), (768, 7), (96, 28), (192, 14), (384, 7)]
    ] + [
        Shape("dw13x13 1024 @7", 2, 1024, 1024, 7, 13, 1024),
        Shape("dw13x13 384 @7", 2, 384, 384, 7, 13, 384),
    ]
    lenet = [
        Shape("LeNet C1 5x5 1->6 @32", 64, 1, 6, 32, 5, 1, padding=0),
        Shape("LeNet C3 5x5 6->16 @14", 64, 6, 16, 14, 5, 1, padding=0),
    ]
    dense = [
        Shape("dense 3x3 64->64 @56", 2, 64, 64, 56, 3, 1),
        Shape("dense 11x11 64->64 @56", 2, 64, 64, 56, 11, 1),
        Shape("dense 13x13 64->64 @28", 2, 64, 64, 28, 13, 1),
        Shape("dense 15x15 128->128 @28", 2, 128, 128, 28, 15, 1),
    ]
    sets = {"convnext": convnext, "lenet": lenet, "dense": dense}
    return convnext + lenet + dense if which == "all" else sets[which]


def _pad(s: Shape) -> int:
    return s.k // 2 if s.padding is None else s.padding


def _attrs(s: Shape, layout: str) -> list[int]:
    p = _pad(s)
    return [s.stride, s.stride, 1, 1, p, p, p, p, s.groups, 0 if layout == "NCHW" else 1]


def auto_choice(s: Shape, layout: str, mode: str) -> str:
    """auto's pick per direction (as the bench's algorithm column)."""
    dirs = ("fwd",) if mode == "fwd" else ("fwd", "bwd_data", "bwd_filter")
    old = os.environ.pop(ENV, None)
    try:
        names = [
            _jaxconv_cpu.conv_algorithm(
                d, False, [s.n, s.c, s.h, s.h], [s.o, s.c // s.groups, s.k, s.k], _attrs(s, layout)
            )
            for d in dirs
        ]
    finally:
        if old is not None:
            os.environ[ENV] = old
    return names[0] if len(set(names)) == 1 else " / ".join(names)


def candidates(s: Shape) -> list[str]:
    algos = ["direct"]
    if s.k == 3 and s.stride == 1 and s.groups == 1:
        algos += ["winograd2", "winograd4"]
    if s.stride == 1:
        algos.append("fft")
    return algos + ["auto"]


def time_shape(s: Shape, layout: str, mode: str, reps: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    if layout == "NHWC":
        x = rng.standard_normal((s.n, s.h, s.h, s.c))
        w = rng.standard_normal((s.k, s.k, s.c // s.groups, s.o))
    else:
        x = rng.standard_normal((s.n, s.c, s.h, s.h))
        w = rng.standard_normal((s.o, s.c // s.groups, s.k, s.k))
    x = jnp.asarray(x, jnp.float32)
    w = jnp.asarray(w / np.sqrt(s.k * s.k * s.c / s.groups), jnp.float32)

    def f(x: Any, w: Any) -> Any:
        return jaxconv.conv2d(
            x, w, stride=s.stride, padding=_pad(s), groups=s.groups, layout=layout
        )

    if mode == "fwd":
        fn = jax.jit(f)
    else:
        fn = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w)), argnums=(0, 1)))
    algos = candidates(s)
    old = os.environ.get(ENV)
    times: dict[str, list[float]] = {a: [] for a in algos}
    try:
        for a in algos:  # warm-up (the first call compiles)
            os.environ[ENV] = a
            jax.block_until_ready(fn(x, w))
        for r in range(reps):
            order = algos[r % len(algos) :] + algos[: r % len(algos)]
            for a in order:
                os.environ[ENV] = a
                t = time.perf_counter()
                jax.block_until_ready(fn(x, w))
                times[a].append(time.perf_counter() - t)
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old
    return {a: float(np.median(t)) * 1e3 for a, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="all", choices=["convnext", "lenet", "dense", "all"])
    ap.add_argument("--layout", default="NCHW,NHWC")
    ap.add_argument("--mode", default="fwd,fwd+bwd")
    ap.add_argument("--filter", default="", help="only shapes whose name contains this")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tolerance", type=float, default=0.10, help="auto within this of the best")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args()
    rows, misses = [], []
    for s in _shapes(args.shapes):
        if args.filter not in s.name:
            continue
        for layout in args.layout.split(","):
            for mode in args.mode.split(","):
                ms = time_shape(s, layout, mode, args.reps)
                best = min((a for a in ms if a != "auto"), key=ms.get)
                ok = ms["auto"] <= (1 + args.tolerance) * ms[best]
                row = {
                    "shape": s.name,
                    "layout": layout,
                    "mode": mode,
                    "ms": ms,
                    "best": best,
                    "auto_pick": auto_choice(s, layout, mode),
                    "auto_ok": ok,
                }
                rows.append(row)
                if not ok:
                    misses.append(row)
                times = "  ".join(f"{a} {t:8.2f}" for a, t in ms.items())
                print(
                    f"{s.name:28s} {layout} {mode:7s} {times}  best {best:9s} "
                    f"auto={row['auto_pick']}{'' if ok else '  <-- auto not within tolerance'}",
                    flush=True,
                )
    print(f"\n{len(misses)} of {len(rows)} rows: auto more than {args.tolerance:.0%} off the best")
    for m in misses:
        print(f"  {m['shape']} {m['layout']} {m['mode']}: best {m['best']}, auto {m['auto_pick']}")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump({"load": os.getloadavg(), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
