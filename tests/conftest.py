"""Shared pytest configuration: float64 enabled, and a `backend` fixture over the platforms JAX
can see (cpu always, gpu where visible), so every case runs on every backend."""
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
    return found


BACKENDS = _platforms()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The platform name; use `on(backend, x)` (reference.py) to place inputs there."""
    return request.param


def pytest_report_header(config):
    return f"jaxconv test backends: {', '.join(BACKENDS)}"
