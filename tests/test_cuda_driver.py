"""The import-time driver check (jaxconv/_cuda_driver.py): a CUDA module whose runtime needs a
newer driver than the installed one warns once, with what to do; a compatible pair, no driver
at all, or hidden GPUs stay silent. The decision is a pure function of the two version numbers,
so it is tested here with made-up versions; the module's own two numbers are checked where the
CUDA module was built."""
import importlib.util
import warnings

import pytest

from jaxconv import _cuda_driver

pytestmark = pytest.mark.cpu_only("pure Python on version numbers; no device is involved")


@pytest.mark.parametrize("runtime, driver", [
    (13000, 13000),  # the same version
    (13000, 13020),  # a newer driver
    (12080, 12020),  # older minor of the same major: CUDA minor-version compatibility
    (12080, 13000),  # a CUDA 12 module under a CUDA 13 driver
    (13000, 0),      # no driver installed: no GPU can be used, nothing to warn about
])
def test_compatible_pairs_are_silent(backend, runtime, driver):
    assert _cuda_driver.driver_mismatch(runtime, driver) is None


def test_cuda13_module_under_a_cuda12_driver_says_what_to_do(backend):
    message = _cuda_driver.driver_mismatch(13000, 12080)
    assert message is not None
    for part in ("driver supports CUDA up to 12.8", "CUDA runtime 13.0",
                 "CUDA 13 needs driver >= 580", "toolkit <= 12.x", "update the driver",
                 "CPU targets keep working"):
        assert part in message, (part, message)


def test_version_text(backend):
    assert [_cuda_driver.version_text(v) for v in (12080, 13000, 11040, 12090)] == \
        ["12.8", "13.0", "11.4", "12.9"]


class FakeCudaModule:
    def __init__(self, runtime, driver):
        self._runtime, self._driver = runtime, driver

    def runtime_version(self):
        return self._runtime

    def driver_version(self):
        return self._driver


def test_warns_once_per_process(backend, monkeypatch):
    monkeypatch.setattr(_cuda_driver, "_warned", False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    old_driver = FakeCudaModule(13000, 12040)
    with pytest.warns(RuntimeWarning, match="driver supports CUDA up to 12.4"):
        assert _cuda_driver.warn_if_driver_too_old(old_driver) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # The second import-time check finds the same mismatch but stays quiet.
        assert _cuda_driver.warn_if_driver_too_old(old_driver) is not None


@pytest.mark.parametrize("visible", ["", "-1"])
def test_hidden_gpus_are_not_checked(backend, monkeypatch, visible):
    monkeypatch.setattr(_cuda_driver, "_warned", False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cuda_driver.warn_if_driver_too_old(FakeCudaModule(13000, 12040)) is None


def test_built_module_reports_its_versions(backend):
    """Where the CUDA module was built: its runtime is the toolkit's (CUDA 11 or newer) and the
    driver version is 0 (no driver) or a CUDA version of its own."""
    if importlib.util.find_spec("jaxconv._jaxconv_cuda") is None:
        pytest.skip("the CUDA module was not built in this checkout")
    from jaxconv import _jaxconv_cuda
    assert _jaxconv_cuda.runtime_version() >= 11000
    driver = _jaxconv_cuda.driver_version()
    assert driver == 0 or driver >= 10000, driver
