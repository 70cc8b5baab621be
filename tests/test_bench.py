"""The benchmark harness runs end to end (--quick) and writes well-formed JSON.

No speed assertions: timings on shared CI machines say nothing. What is checked is the harness's
contract: every requested (set, layout, mode) case is present with positive times, positive
finite ratios that equal lax_ms / jaxconv_ms, work counts that match the shapes, summaries that
are the geometric means of the rows, the machine/device/version record, and jaxconv's results
agreeing with lax's on every benchmarked case.
"""
import json
import math
import sys

import pytest

from jaxconv import bench
from child import run_python

SETS = ("lenet", "resnet50", "mobilenet", "pool")


@pytest.fixture(scope="module")
def quick_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = run_python("-m", "jaxconv.bench", "--quick", "--json", str(path),
                      env={"JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Progress goes to stderr, the table to stdout.
    assert "[1/" in proc.stderr
    assert "ratio" in proc.stdout and "geometric mean" in proc.stdout
    with open(path) as f:
        return json.load(f)


def test_header_records_machine_device_and_versions(quick_json):
    doc = quick_json
    assert doc["schema"] == 1
    assert doc["date"][:2] == "20"
    machine = doc["machine"]
    assert machine["logical_cpus"] >= 1
    if sys.platform.startswith("linux"):
        assert isinstance(machine["cpu_model"], str)
        assert set(machine["flags"]) >= {"avx2", "fma"}
        assert all(isinstance(v, bool) for v in machine["flags"].values())
    assert doc["device"]["platform"] == "cpu"
    for key in ("jax", "jaxlib", "python", "jaxconv"):
        assert isinstance(doc["versions"][key], str) and doc["versions"][key]
    assert doc["config"]["quick"] is True
    assert doc["config"]["dtype"] == "float32"


def test_every_case_present_with_positive_finite_ratios(quick_json):
    rows = quick_json["results"]
    seen = {(r["set"], r["layout"], r["mode"]) for r in rows}
    assert seen == {(s, lay, m) for s in SETS for lay in ("NCHW", "NHWC")
                    for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["jaxconv_ms"] > 0 and r["lax_ms"] > 0, r
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        assert r["ratio"] == pytest.approx(r["lax_ms"] / r["jaxconv_ms"])
        assert r["reps"] >= 3
        assert math.isfinite(r["jaxconv_rate"]) and r["jaxconv_rate"] > 0
        # jaxconv and lax computed the same values (forward) and gradients (fwd+bwd).
        assert r["max_rel_diff"] < 1e-3, r


def test_work_counts_follow_the_shapes(quick_json):
    for r in quick_json["results"]:
        factor = 1 if r["mode"] == "fwd" else (3 if r["op"] == "conv" else 2)
        if r["op"] == "conv":
            assert r["unit"] == "GFLOP/s"
            y, w = r["y_shape"], r["w_shape"]
            if r["layout"] == "NCHW":
                n, o, oh, ow = y
                _, cg, kh, kw = w
            else:
                n, oh, ow, o = y
                kh, kw, cg, _ = w
            assert r["work"] == factor * 2 * n * o * oh * ow * cg * kh * kw
        else:
            assert r["unit"] == "GB/s"
            assert r["work"] == factor * 4 * (math.prod(r["x_shape"]) + math.prod(r["y_shape"]))


def test_summary_is_the_geometric_mean_of_the_rows(quick_json):
    rows = quick_json["results"]
    summary = {(s["set"], s["layout"], s["mode"]): s for s in quick_json["summary"]}
    for (set_, layout, mode), s in summary.items():
        members = ("lenet", "resnet50") if set_ == "lenet+resnet50" else (set_,)
        ratios = [r["ratio"] for r in rows
                  if r["set"] in members and r["layout"] == layout and r["mode"] == mode]
        assert s["n"] == len(ratios) > 0
        assert s["geomean_ratio"] == pytest.approx(math.exp(sum(map(math.log, ratios))
                                                            / len(ratios)))
        assert s["min_ratio"] == min(ratios)
    assert ("lenet+resnet50", "NCHW", "fwd") in summary


def test_full_shape_sets_match_the_issue():
    """The non-quick sets are the layers the performance targets are stated for."""
    lenet = bench.cases("lenet", "cpu")
    assert [(c.n, c.c, c.h, c.out_channels, c.kernel) for c in lenet] == [
        (64, 1, 32, 6, 5), (64, 6, 14, 16, 5), (64, 16, 5, 120, 5)]
    resnet = bench.cases("resnet50", "cpu")
    assert all(c.n == 8 for c in resnet)
    stem = resnet[0]
    assert (stem.c, stem.h, stem.out_channels, stem.kernel, stem.stride, stem.padding) == (
        3, 224, 64, 7, 2, 3)
    assert {(c.kernel, c.h) for c in resnet[1:]} == {(k, hw) for k in (1, 3)
                                                     for hw in (56, 28, 14, 7)}
    mobile = bench.cases("mobilenet", "cpu")
    assert all(c.groups == c.c == c.out_channels and c.kernel == 3 for c in mobile)
    assert {c.stride for c in mobile} == {1, 2}
    pools = bench.cases("pool", "cpu")
    assert {(c.kernel, c.stride) for c in pools} == {(2, 2), (3, 2)}
    for c in resnet + lenet:
        assert c.out_hw() == tuple((s + 2 * c.padding - c.kernel) // c.stride + 1
                                   for s in (c.h, c.w))
