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


@pytest.mark.parametrize(
    "runtime, driver",
    [
        (13000, 13000),  # the same version
        (13000, 13020),  # a newer driver
        (12080, 12020),  # older minor of the same major: CUDA minor-version compatibility
        (12080, 13000),  # a CUDA 12 module under a CUDA 13 driver
        (13000, 0),  # no driver installed: no GPU can be used, nothing to warn about
    ],
)
def test_compatible_pairs_are_silent(backend, runtime, driver):
    assert _cuda_driver.driver_mismatch(runtime, driver) is None


def test_cuda13_module_under_a_cuda12_driver_says_what_to_do(backend):
    message = _cuda_driver.driver_mismatch(13000, 12080)
    assert message is not None
    for part in (
        "driver supports CUDA up to 12.8",
        "CUDA runtime 13.0",
        "CUDA 13 needs driver >= 580",
        "toolkit <= 12.x",
        "update the driver",
        "CPU targets keep working",
    ):
        assert part in message, (part, message)


def test_version_text(backend):
    assert [_cuda_driver.version_text(v) for v in (12080, 13000, 11040, 12090)] == [
        "12.8",
        "13.0",
        "11.4",
        "12.9",
    ]


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


# ---- the import-time architecture check (warn_if_gpu_unsupported) -------------------------------
DEFAULT_SASS, DEFAULT_PTX = ["80", "90"], ["80"]  # the default build, "80;90-real"


@pytest.mark.parametrize(
    "capability, sass, ptx, runs",
    [
        ((8, 0), DEFAULT_SASS, DEFAULT_PTX, True),  # A100: sm_80 SASS
        ((8, 6), DEFAULT_SASS, DEFAULT_PTX, True),  # RTX 30xx / A10: sm_80 SASS runs on 8.x, x >= 0
        ((8, 9), DEFAULT_SASS, DEFAULT_PTX, True),  # L4 / L40
        ((9, 0), DEFAULT_SASS, DEFAULT_PTX, True),  # H100 / H200: sm_90 SASS
        ((10, 0), DEFAULT_SASS, DEFAULT_PTX, True),  # B200: no SASS, compute_80 PTX is compiled
        ((12, 0), DEFAULT_SASS, DEFAULT_PTX, True),  # RTX 50xx: likewise
        ((7, 5), DEFAULT_SASS, DEFAULT_PTX, False),  # T4: PTX of 8.0 cannot run on 7.5
        ((8, 0), ["90"], [], False),  # CI's "90-real" on an A100
        ((8, 6), ["90"], [], False),
        ((9, 0), ["80"], [], False),  # SASS never crosses a major version
        ((10, 0), ["90"], [], False),  # nor does SASS run on a newer major
        ((8, 6), ["86"], [], True),
        ((8, 0), ["86"], [], False),  # SASS of a newer minor does not run
        ((9, 0), ["90a"], [], True),  # arch-specific: exactly 9.0
        ((10, 0), [], ["90a"], False),
        ((10, 0), [], ["90"], True),  # PTX-only build ("90-virtual")
    ],
)
def test_which_gpus_run_which_builds(backend, capability, sass, ptx, runs):
    assert _cuda_driver.runs_on(capability, sass, ptx) is runs


def test_architecture_spec_is_the_cmake_value(backend):
    assert _cuda_driver.architecture_spec(["80", "90"], ["80"]) == "80;90-real"
    assert _cuda_driver.architecture_spec(["90"], []) == "90-real"
    assert (
        _cuda_driver.architecture_spec(["120", "90a"], ["100"]) == "90a-real;100-virtual;120-real"
    )
    with pytest.raises(ValueError, match="not a CUDA architecture"):
        _cuda_driver.parse_architecture("native")


def test_runnable_gpus_are_silent(backend):
    assert (
        _cuda_driver.architecture_mismatch([(9, 0), (8, 6), (12, 0)], DEFAULT_SASS, DEFAULT_PTX)
        is None
    )
    assert _cuda_driver.architecture_mismatch([], ["90"], []) is None  # no GPU


def test_a_gpu_without_code_is_told_what_to_build(backend):
    message = _cuda_driver.architecture_mismatch([(9, 0), (8, 6)], ["90"], [])
    assert message is not None
    for part in (
        "built for 90-real",
        "GPU 1 (compute capability 8.6) cannot run",
        "cudaErrorNoKernelImageForDevice",
        'JAXCONV_CUDA_ARCHITECTURES="90-real;86-real" pip install',
    ):
        assert part in message, (part, message)
    assert "GPU 0" not in message  # the H100 beside it runs the module


def test_a_t4_is_told_it_cannot_be_supported(backend):
    message = _cuda_driver.architecture_mismatch([(7, 5)], DEFAULT_SASS, DEFAULT_PTX)
    assert message is not None
    for part in (
        "built for 80;90-real",
        "GPU 0 (compute capability 7.5)",
        "need compute capability 8.0 or newer",
        "7.5 cannot be supported",
        "jax.devices('cpu')",
    ):
        assert part in message, (part, message)
    assert "pip install" not in message  # no build helps


class FakeArchModule:
    def __init__(self, capabilities, sass=("90",), ptx=()):
        self._caps, self._archs = capabilities, {"sass": list(sass), "ptx": list(ptx)}

    def cuda_architectures(self):
        return self._archs

    def device_capabilities(self):
        return self._caps


def test_architecture_warning_once_and_only_with_a_jax_cuda_plugin(backend, monkeypatch):
    monkeypatch.setattr(_cuda_driver, "_warned_arch", False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    a100 = FakeArchModule([(8, 0)])
    # Without JAX's CUDA plugin JAX cannot use the GPU: the driver is not even asked.
    monkeypatch.setattr(_cuda_driver, "_jax_cuda_plugin_installed", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cuda_driver.warn_if_gpu_unsupported(a100) is None
    monkeypatch.setattr(_cuda_driver, "_jax_cuda_plugin_installed", lambda: True)
    with pytest.warns(RuntimeWarning, match=r"GPU 0 \(compute capability 8.0\) cannot run"):
        assert _cuda_driver.warn_if_gpu_unsupported(a100) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cuda_driver.warn_if_gpu_unsupported(a100) is not None  # quiet the second time
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _cuda_driver.warn_if_gpu_unsupported(a100) is None


def test_built_module_reports_its_architectures(backend):
    """Where the CUDA module was built: it reports the architectures CMake compiled (numbers of
    at least 80), and the GPUs it sees (none on a machine without a driver)."""
    if importlib.util.find_spec("jaxconv._jaxconv_cuda") is None:
        pytest.skip("the CUDA module was not built in this checkout")
    from jaxconv import _jaxconv_cuda

    archs = _jaxconv_cuda.cuda_architectures()
    assert set(archs) == {"sass", "ptx"} and archs["sass"] + archs["ptx"], archs
    for entry in archs["sass"] + archs["ptx"]:
        assert _cuda_driver.parse_architecture(entry)[:2] >= (8, 0), archs
    caps = _jaxconv_cuda.device_capabilities()
    assert all(len(c) == 2 for c in caps), caps
    if _jaxconv_cuda.driver_version() == 0:
        assert caps == []
