"""Shared pytest configuration: float64 enabled, and a `backend` fixture over the platforms JAX
can see (cpu always, gpu where visible), so every case runs on every backend.

Every test takes `backend` and places its inputs there (`reference.on`). A case that only makes
sense on the CPU (it checks a CPU kernel's instruction-set variants, or costs too much for the
few minutes a lent GPU gives the whole suite) is marked `@pytest.mark.cpu_only(reason)`: its
gpu instance is skipped with that reason, so the skip shows in the report instead of the case
silently running nowhere.

Float32 on a GPU. With precision=None (or DEFAULT / HIGH) jaxconv, like lax, lets float32
convolutions run on TF32 tensor cores (10 mantissa bits), while the oracles compute at HIGHEST
and compare at float32 tolerances. So on the gpu backend every test runs under
jax.default_matmul_precision("highest"): the precision its HIGHEST reference asks for, and the
one precision=None then resolves to (allow_tf32 = 0). Tests of TF32 itself are marked
`@pytest.mark.tf32` and keep the default (tests/test_tf32.py bounds their error from TF32's
rounding and the reduction length).

JAXCONV_TEST_DEVICE_ONLY=1 (benchmarks/gpu_check.sh's GPU step) keeps only the tests that take
the `backend` fixture, i.e. that run kernels on a device; host-only tests (the emulation, SASS
reading, pure-Python checks) are deselected (pytest's "N deselected").

JAXCONV_TEST_PROGRESS=PATH appends a line to PATH when each test starts and when it ends
("start <nodeid>", "<outcome> <nodeid> <seconds>s"), written straight to the file by the
process that reports (pytest-xdist's controller, which hears of each test's start and end from
its workers, or pytest alone), so that a run killed at its time limit still says which tests
finished, how, and which were running.
"""

import os

import jax
import pytest

jax.config.update("jax_enable_x64", True)


def _platforms():
    found = ["cpu"]
    try:
        if jax.devices("gpu"):
            found.append("gpu")
    except RuntimeError:
        pass
    # JAXCONV_TEST_BACKENDS=gpu (a comma list) keeps only those, e.g. so that a lent GPU's few
    # minutes go to the gpu instances (benchmarks/gpu_check.sh); naming an absent one fails.
    wanted = os.environ.get("JAXCONV_TEST_BACKENDS")
    if wanted:
        wanted = [w.strip() for w in wanted.split(",") if w.strip()]
        missing = [w for w in wanted if w not in found]
        if missing:
            raise pytest.UsageError(
                f"JAXCONV_TEST_BACKENDS names {missing}, but JAX sees only {found}"
            )
        found = wanted
    return found


BACKENDS = _platforms()


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "cpu_only(reason): run only the cpu instance of this test (the `backend` "
        "fixture skips the others, giving the reason)",
    )
    config.addinivalue_line(
        "markers",
        "slow(reason): a case of tens of seconds or more (host-emulation builds, "
        "child processes with 8 devices or a multi-process cluster, whole-version smoke runs); "
        "`pytest -m 'not slow'` leaves them out for a fast development run",
    )
    config.addinivalue_line(
        "markers",
        "tf32: the test checks TF32 itself; on a GPU it keeps the default matmul "
        "precision instead of running under jax.default_matmul_precision('highest')",
    )


@pytest.fixture(autouse=True)
def _gpu_float32_at_highest(request):
    """On the gpu backend, run the test at the HIGHEST precision of its oracles (module
    docstring); elsewhere, and for @pytest.mark.tf32 tests, change nothing."""
    callspec = getattr(request.node, "callspec", None)
    on_gpu = callspec is not None and callspec.params.get("backend") == "gpu"
    if on_gpu and request.node.get_closest_marker("tf32") is None:
        with jax.default_matmul_precision("highest"):
            yield
    else:
        yield


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The platform name; use `on(backend, x)` (reference.py) to place inputs there."""
    marker = request.node.get_closest_marker("cpu_only")
    if marker is not None and request.param != "cpu":
        reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
        pytest.skip(f"cpu only: {reason}")
    return request.param


def pytest_collection_modifyitems(config, items):
    """A cpu_only test that does not take `backend` could not be skipped on a GPU: refuse it.
    With JAXCONV_TEST_DEVICE_ONLY=1, deselect the tests that run nothing on a device: those
    without the `backend` fixture and the cpu_only ones (they would only report a skip)."""
    for item in items:
        if item.get_closest_marker("cpu_only") is not None and "backend" not in getattr(
            item, "fixturenames", ()
        ):
            raise pytest.UsageError(
                f"{item.nodeid} is marked cpu_only but does not take the `backend` fixture"
            )
    if os.environ.get("JAXCONV_TEST_DEVICE_ONLY") == "1":
        keep, drop = [], []
        for item in items:
            device = (
                "backend" in getattr(item, "fixturenames", ())
                and item.get_closest_marker("cpu_only") is None
            )
            (keep if device else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep


# xdist workers leave the writing to the controller, which receives their reports.
_PROGRESS = (
    None if os.environ.get("PYTEST_XDIST_WORKER") else os.environ.get("JAXCONV_TEST_PROGRESS")
)


def _progress(line: str):
    # One os.write per line on an O_APPEND descriptor: nothing waits in a Python buffer when
    # the process is killed.
    fd = os.open(_PROGRESS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


if _PROGRESS:

    def pytest_runtest_logstart(nodeid, location):
        _progress(f"start {nodeid}")

    def pytest_runtest_logreport(report):
        # One line per test: its failing phase if any, else the call (or the setup's skip).
        if report.failed or (report.when == "call") or (report.when == "setup" and report.skipped):
            outcome = report.outcome if report.when == "call" or not report.failed else "error"
            _progress(f"{outcome} {report.nodeid} {report.duration:.2f}s")


def pytest_report_header(config):
    return f"jaxconv test backends: {', '.join(BACKENDS)}"


@pytest.fixture(scope="session")
def conv_emu(tmp_path_factory):
    """tests/cuda_emulation/kernels.cc built against the host emulation (tests/emulation.py):
    the conv and pool kernels with the handlers' planning, one build per session and worker."""
    from emulation import build_emulation

    return build_emulation("kernels.cc", tmp_path_factory.mktemp("conv_emu"))
