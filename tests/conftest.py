"""Shared pytest configuration: float64 enabled, and a `backend` fixture over the platforms JAX
can see (cpu always, gpu where visible), so every case runs on every backend.

Every test takes `backend` and places its inputs there (`reference.on`). A case that only makes
sense on the CPU (it checks a CPU kernel's instruction-set variants, or costs too much for the
few minutes a lent GPU gives the whole suite) is marked `@pytest.mark.cpu_only(reason)`: its
gpu instance is skipped with that reason, so the skip shows in the report instead of the case
silently running nowhere.
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
            raise pytest.UsageError(f"JAXCONV_TEST_BACKENDS names {missing}, but JAX sees only "
                                    f"{found}")
        found = wanted
    return found


BACKENDS = _platforms()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cpu_only(reason): run only the cpu instance of this test (the `backend` "
        "fixture skips the others, giving the reason)")
    config.addinivalue_line(
        "markers", "slow(reason): a case of tens of seconds or more (host-emulation builds, "
        "child processes with 8 devices or a multi-process cluster, whole-version smoke runs); "
        "`pytest -m 'not slow'` leaves them out for a fast development run")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The platform name; use `on(backend, x)` (reference.py) to place inputs there."""
    marker = request.node.get_closest_marker("cpu_only")
    if marker is not None and request.param != "cpu":
        reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
        pytest.skip(f"cpu only: {reason}")
    return request.param


def pytest_collection_modifyitems(config, items):
    """A cpu_only test that does not take `backend` could not be skipped on a GPU: refuse it."""
    for item in items:
        if item.get_closest_marker("cpu_only") is not None and \
                "backend" not in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(f"{item.nodeid} is marked cpu_only but does not take the "
                                    "`backend` fixture")


def pytest_report_header(config):
    return f"jaxconv test backends: {', '.join(BACKENDS)}"


@pytest.fixture(scope="session")
def conv_emu(tmp_path_factory):
    """tests/cuda_emulation/kernels.cc built against the host emulation (tests/emulation.py):
    the conv and pool kernels with the handlers' planning, one build per session and worker."""
    from emulation import build_emulation
    return build_emulation("kernels.cc", tmp_path_factory.mktemp("conv_emu"))
