"""The installed package's metadata: one version, the license, the typing marker.

The version is written once, as jaxconv.__version__; the build reads it from jaxconv/__init__.py
(pyproject.toml: [tool.scikit-build] metadata.version), so the installed distribution's version
and the module's must agree. Both editable and wheel installs are checked by whichever one ran.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import jaxconv

ROOT = Path(__file__).resolve().parent.parent


def test_installed_version_is_the_module_version():
    assert importlib.metadata.version("jaxconv") == jaxconv.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+(\w+\d*)?", jaxconv.__version__), jaxconv.__version__


def test_version_is_written_once():
    """pyproject.toml takes the version from jaxconv/__init__.py instead of repeating it."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M), "version is not dynamic"
    assert not re.search(r"^version\s*=", pyproject, re.M), "pyproject.toml repeats the version"


def test_license_metadata():
    meta = importlib.metadata.metadata("jaxconv")
    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in meta.get_all("License-File")
    assert "Apache License" in (ROOT / "LICENSE").read_text()


def test_package_is_marked_typed():
    """PEP 561: py.typed ships beside the modules, so type checkers read jaxconv's annotations."""
    assert (Path(jaxconv.__file__).parent / "py.typed").is_file()
