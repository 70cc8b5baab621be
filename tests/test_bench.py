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

pytestmark = pytest.mark.slow("runs the benchmark harness end to end in a child process")

SETS = ("lenet", "resnet50", "mobilenet", "pool", "large")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run writing both the JSON and the picture: (json path, png path)."""
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    png = path.with_suffix(".png")
    proc = run_python(
        "-m",
        "jaxconv.bench",
        "--quick",
        "--json",
        str(path),
        "--plot",
        str(png),
        env={"JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Progress goes to stderr, the table to stdout.
    assert "[1/" in proc.stderr
    assert "ratio" in proc.stdout and "geometric mean" in proc.stdout
    return path, png


@pytest.fixture(scope="module")
def quick_json(quick_run):
    with open(quick_run[0]) as f:
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
    assert seen == {
        (s, lay, m) for s in SETS for lay in ("NCHW", "NHWC") for m in ("fwd", "fwd+bwd")
    }
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
        ratios = [
            r["ratio"]
            for r in rows
            if r["set"] in members and r["layout"] == layout and r["mode"] == mode
        ]
        assert s["n"] == len(ratios) > 0
        assert s["geomean_ratio"] == pytest.approx(
            math.exp(sum(map(math.log, ratios)) / len(ratios))
        )
        assert s["min_ratio"] == min(ratios)
    assert ("lenet+resnet50", "NCHW", "fwd") in summary


def test_full_shape_sets_match_the_issue():
    """The non-quick sets are the layers the performance targets are stated for."""
    lenet = bench.cases("lenet", "cpu")
    assert [(c.n, c.c, c.h, c.out_channels, c.kernel) for c in lenet] == [
        (64, 1, 32, 6, 5),
        (64, 6, 14, 16, 5),
        (64, 16, 5, 120, 5),
    ]
    resnet = bench.cases("resnet50", "cpu")
    assert all(c.n == 8 for c in resnet)
    stem = resnet[0]
    assert (stem.c, stem.h, stem.out_channels, stem.kernel, stem.stride, stem.padding) == (
        3,
        224,
        64,
        7,
        2,
        3,
    )
    assert {(c.kernel, c.h) for c in resnet[1:]} == {
        (k, hw) for k in (1, 3) for hw in (56, 28, 14, 7)
    }
    mobile = bench.cases("mobilenet", "cpu")
    assert all(c.groups == c.c == c.out_channels and c.kernel == 3 for c in mobile)
    assert {c.stride for c in mobile} == {1, 2}
    pools = bench.cases("pool", "cpu")
    assert {(c.kernel, c.stride) for c in pools} == {(2, 2), (3, 2)}
    for c in resnet + lenet:
        assert c.out_hw() == tuple(
            (s + 2 * c.padding - c.kernel) // c.stride + 1 for s in (c.h, c.w)
        )
    large = bench.cases("large", "cpu")
    depthwise = [(c.kernel, c.h) for c in large if c.groups == c.c == c.out_channels > 1]
    assert depthwise == [(7, 56), (7, 14), (31, 56), (31, 28), (27, 14), (13, 7)]
    dense = [(c.kernel, c.stride, c.h) for c in large if c.groups == 1]
    assert dense == [(11, 4, 224), (11, 1, 56), (13, 1, 28), (15, 1, 28)]


def test_rows_name_the_algorithm_the_cpu_takes(quick_json):
    """Every conv row names the algorithm of ffi/cpu/conv_algo.cc's choice: one name, or one per
    direction (fwd / bwd_data / bwd_filter) for fwd+bwd rows where they differ."""
    known = ("direct", "winograd2", "winograd4", "fft ")
    for r in quick_json["results"]:
        if r["op"] == "pool":
            assert r["algorithm"] == "-"
            continue
        names = r["algorithm"].split(" / ")
        assert len(names) in ((1,) if r["mode"] == "fwd" else (1, 3)), r["algorithm"]
        assert all(n.startswith(known) for n in names), r["algorithm"]


def test_algorithm_column_follows_the_environment(monkeypatch):
    cs = bench.cases("large", "cpu")[2]  # 31x31 depthwise: FFT by default
    import jax

    cpu = jax.devices("cpu")[0]
    assert bench.algorithm(cs, "NHWC", "fwd", "float32", cpu).startswith("fft ")
    monkeypatch.setenv("JAXCONV_CPU_CONV_ALGO", "direct")
    assert bench.algorithm(cs, "NHWC", "fwd+bwd", "float32", cpu) == "direct"


# ----------------------------------------------------------------------------------------------
# --plot and --from-json.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png_with_content(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 600, pixels.shape
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_plot_option_writes_a_picture_of_the_run(quick_run):
    assert_png_with_content(quick_run[1])


def test_plot_draws_every_ratio_on_a_log_axis_with_a_parity_line(quick_json, tmp_path):
    import matplotlib.colors

    doc = quick_json
    fig = bench.plot(doc, str(tmp_path / "p.png"))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert any(list(line.get_xdata()) == [1.0, 1.0] for line in ax.get_lines())  # axvline(1)
    # One scatter series per (mode, layout), each its own colour, holding exactly that
    # series' ratios (x), one point per layer row.
    layers = [t.get_text() for t in ax.get_yticklabels()]
    assert layers == list(dict.fromkeys(f"{r['set']}: {r['name']}" for r in doc["results"]))
    colours = set()
    for key in [("fwd", "NCHW"), ("fwd", "NHWC"), ("fwd+bwd", "NCHW"), ("fwd+bwd", "NHWC")]:
        label = f"{key[0]} {key[1]}"
        (series,) = [c for c in ax.collections if c.get_label() == label]
        want = sorted(r["ratio"] for r in doc["results"] if (r["mode"], r["layout"]) == key)
        assert sorted(series.get_offsets()[:, 0].tolist()) == pytest.approx(want)
        colours.add(matplotlib.colors.to_hex(series.get_facecolor()[0]))
    assert len(colours) == 4
    # The summary table beside the plot lists every geometric mean.
    text = " ".join(
        cell.get_text().get_text() for cell in fig.axes[1].tables[0].get_celld().values()
    )
    for s in doc["summary"]:
        assert f"{s['geomean_ratio']:.2f}x" in text


def test_from_json_redraws_a_saved_run_without_timing_anything(
    quick_run, tmp_path, monkeypatch, capsys
):
    def no_timing(*args, **kwargs):
        raise AssertionError("--from-json must not run the benchmark")

    monkeypatch.setattr(bench, "run_case", no_timing)
    png = tmp_path / "again.png"
    assert bench.main(["--from-json", str(quick_run[0]), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    with open(quick_run[0]) as f:
        doc = json.load(f)
    for r in doc["results"]:
        assert r["name"] in out
    assert "geometric mean" in out
    assert_png_with_content(png)


# ---------------------------------------------------------------------------------------------
# Rows written as they finish: a killed run leaves the rows it finished.


def test_a_killed_run_leaves_valid_json_with_the_rows_it_finished(tmp_path):
    """The JSON is rewritten whole after every row (temporary file + rename), so at any moment
    it parses; killing the process (SIGKILL: no cleanup runs) keeps the finished rows, marked
    incomplete."""
    import os
    import signal
    import subprocess
    import time

    from child import TESTS_DIR

    path = tmp_path / "partial.json"
    # 8 quick cases (lenet's 2 layers x 2 layouts x 2 modes); killed after the first rows.
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxconv.bench", "--quick", "--set", "lenet", "--json", str(path)],
        cwd=TESTS_DIR,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    rows, deadline = [], time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                with open(path) as f:
                    doc = json.load(f)  # never half written
                rows = doc["results"]
                if len(rows) >= 2:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with open(path) as f:
        doc = json.load(f)
    assert doc["complete"] is False
    assert 2 <= len(doc["results"]) < 8, len(doc["results"])
    assert doc["results"][: len(rows)] == rows  # what was read mid-run is still there
    for r in doc["results"]:
        assert r["set"] == "lenet" and r["jaxconv_ms"] > 0 and r["lax_ms"] > 0
    # The summary covers the rows so far.
    assert sum(s["n"] for s in doc["summary"] if s["set"] == "lenet") == len(doc["results"])
    assert not list(tmp_path.glob("partial.json.tmp*"))


def test_a_complete_run_says_so(quick_json):
    assert quick_json["complete"] is True


def test_an_interrupted_run_keeps_its_rows(tmp_path, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) after the second row: exit status 130, the two rows kept."""
    calls = []
    real = bench.run_case

    def run_then_interrupt(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "run_case", run_then_interrupt)
    path = tmp_path / "interrupted.json"
    assert bench.main(["--quick", "--set", "pool", "--json", str(path)]) == 130
    with open(path) as f:
        doc = json.load(f)
    assert doc["complete"] is False and len(doc["results"]) == 2
    assert "interrupted after 2 of" in capsys.readouterr().err
