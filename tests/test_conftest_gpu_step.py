"""What benchmarks/gpu_check.sh's test step relies on in tests/conftest.py, checked in a child
pytest over a small test file with this conftest: JAXCONV_TEST_DEVICE_ONLY=1 keeps only the
tests that take `backend` (and are not cpu_only), and JAXCONV_TEST_PROGRESS gets one start line
and one outcome line per test from the reporting process, under pytest-xdist as on the GPU."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent

SAMPLE = """
import pytest

def test_device_passes(backend):
    assert backend == "cpu"

def test_device_fails(backend):
    assert backend == "not this"

@pytest.mark.cpu_only("host only")
def test_cpu_only_case(backend):
    pass

def test_host_only():
    pass
"""


@pytest.mark.slow("runs a child pytest session under xdist")
def test_device_only_selection_and_progress_lines(tmp_path):
    shutil.copy(TESTS_DIR / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    progress = tmp_path / "progress.log"
    args = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "test_sample.py"]
    try:
        import xdist  # noqa: F401

        args += ["-n", "2", "--dist", "load"]
    except ImportError:
        pass
    env = {
        "JAXCONV_TEST_DEVICE_ONLY": "1",
        "JAXCONV_TEST_BACKENDS": "cpu",
        "JAXCONV_TEST_PROGRESS": str(progress),
        "PYTHONUNBUFFERED": "1",
    }
    import os

    # When this test itself runs in an xdist worker, its environment says so (PYTEST_XDIST_*,
    # which conftest reads to leave progress lines to the controlling process): the child session
    # must not inherit that, or its controller would take itself for a worker and write nothing.
    parent = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    res = subprocess.run(
        args, cwd=tmp_path, env={**parent, **env}, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 1, res.stdout[-2000:]  # one test fails on purpose
    # (under xdist the workers deselect, so the count line has no "2 deselected")
    assert "1 failed, 1 passed" in res.stdout, res.stdout[-2000:]
    assert "test_host_only" not in res.stdout and "test_cpu_only_case" not in res.stdout
    lines = progress.read_text().splitlines()
    started = sorted(line.split()[1] for line in lines if line.startswith("start "))
    assert started == [
        "test_sample.py::test_device_fails[cpu]",
        "test_sample.py::test_device_passes[cpu]",
    ], lines
    ended = sorted(tuple(line.split()[:2]) for line in lines if not line.startswith("start "))
    assert ended == [
        ("failed", "test_sample.py::test_device_fails[cpu]"),
        ("passed", "test_sample.py::test_device_passes[cpu]"),
    ], lines
    for line in lines:
        if not line.startswith("start "):
            assert line.endswith("s") and float(line.split()[2][:-1]) >= 0, line
    # Each test's start precedes its end.
    for name in started:
        assert lines.index(f"start {name}") < next(
            i
            for i, line in enumerate(lines)
            if line.split()[1] == name and not line.startswith("start ")
        ), lines
